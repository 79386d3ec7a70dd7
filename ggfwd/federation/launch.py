"""How `ggfwd serve` and `ggfwd join` start Flower's SuperLink, SuperNode and SuperExec: Flower's own code, with
four changes that Flower 1.42 has no flag for.

    python -m ggfwd.federation.launch superlink --public HOST:PORT -- FLOWER-SUPERLINK-ARGS
    python -m ggfwd.federation.launch supernode --poll SECONDS -- FLOWER-SUPERNODE-ARGS
    python -m ggfwd.federation.launch superexec --zygote yes|no -- FLOWER-SUPEREXEC-ARGS

**superlink: the Control API stays off the network.** Flower 1.42 serves its Fleet API (what SuperNodes use),
Control API (submit and stop runs, i.e. run code on the coordinator) and runtime API (what the ServerApp uses) on
one HTTP port, and the Control API has no authentication unless OIDC is configured
(`superlink/config_loader.py:load_control_authn_plugin`); its `--control-api-address` flag only places a legacy
gRPC Control API that is off by default, while the HTTP one stays on the shared port. So the SuperLink is
started here as Flower builds it (`_parse_superlink_lifespan_config`, `main.create_app`, its lifespan, its
uvicorn settings) with the FLOWER-SUPERLINK-ARGS' `--host 127.0.0.1 --port LOOP` (the port `flwr run`, the
SuperExec and the ServerApp use), and one uvicorn server listens on two sockets: that loopback one, and the
public HOST:PORT, on which an ASGI guard in front of Flower's app answers 403 to every path that is not one of
the Fleet API's routes (read from Flower's fleet router). TLS and node authentication are Flower's, unchanged:
both sockets use the same certificate, and Fleet requests pass through Flower's middleware as before. Nothing is
proxied: the guard is one comparison per request.

**supernode: a short poll.** Flower 1.42's SuperNode sleeps a hard-coded 3 s after every pull that brings no
message (`supernode/start_client_internal.py`), and 0.5 s between checks for a ClientApp's reply: with rounds
of a few seconds this is most of a round. Here the module's `time` is given a `sleep` capped at `--poll`
seconds, everything else being the standard `time`; the SuperNode then runs as `flower-supernode` would. If
Flower's module no longer looks as expected, the SuperNode runs unchanged (and says so in its log).

**superexec: a ClientApp process in milliseconds, not seconds.** Flower starts a fresh `flwr-clientapp` process
for every message (`supercore/superexec/executor/subprocess_executor.py`); importing flwr alone takes 1-2.5 s of
a small machine's CPU, every round. `ggfwd join` runs its SuperNode with `--isolation process` and this SuperExec
beside it. Before Flower starts anything, it imports Flower's ClientApp runtime and ggfwd's ClientApp module,
then forks a *zygote*: a single-threaded copy that waits on a socket pair. The SuperExec's executor builds the
`flwr-clientapp ...` command line as always; where it would `Popen` it, the command line goes to the zygote,
which forks a child that runs Flower's `flwr-clientapp` entry point with those arguments. Each message still
gets a fresh process running Flower's own code (same token, same runtime API, same exit); it only skips the
interpreter start and the imports. The zygote is forked before any thread exists, so no lock is inherited held;
it exits when the SuperExec does (if it is gone, the SuperExec goes back to Flower's own `Popen`). Other task
types are started as Flower does; without `fork` (Windows) the SuperExec runs unchanged.

**Everywhere: a short back-off for objects not there yet.** A Flower message travels as a head and its objects,
pushed after it; a receiver that asks for an object before it has arrived backs off 1 s, then 2, 4, up to 10 s
(`supercore/inflatable/inflatable_utils.py`). Once the polls above are short, that race is the common case: a
ClientApp started within 0.1 s asks for the message before its SuperNode has stored its objects, and a
ServerApp pulling every 20 ms asks for a reply's objects while the SuperNode is still pushing them: seconds
per round, measured. `short_object_backoff` makes the first retry wait 20 ms, doubling up to 0.25 s, with the
same overall time limit (tries unbounded within it); the SuperNode, every ClientApp (through the zygote) and the
ServerApp (`flower_app`) use it.

All four reach into private Flower interfaces of the 1.42 series; the tests run them on real processes, and each
falls back to Flower's unchanged behaviour (or, for the guard, refuses to serve) where Flower no longer looks as
expected.
"""

from __future__ import annotations

import socket
import sys
import time as _time


def short_object_backoff() -> None:
    """Flower's object pulls in this process retry after 20 ms (doubling up to 0.25 s), not 1 s (up to 10 s)."""
    try:
        from flwr.supercore.inflatable import inflatable_utils as u
    except ImportError:
        return
    for fn in (u.pull_objects, u.pull_and_inflate_object_from_tree):
        defaults = getattr(fn, "__kwdefaults__", None)
        if defaults and {"initial_backoff", "backoff_cap", "max_tries_per_object"} <= set(defaults):
            defaults.update(initial_backoff=0.02, backoff_cap=0.25, max_tries_per_object=None)


class _ShortSleep:
    """The `time` module, with `sleep` capped."""

    def __init__(self, cap: float):
        self.cap = cap

    def __getattr__(self, name):
        return getattr(_time, name)

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.cap))


class FleetOnly:
    """ASGI guard: on the public port, only the Fleet API's paths reach Flower's app; anything else gets 403."""

    def __init__(self, app, public_port: int, allowed: set[str]):
        self.app, self.port, self.allowed = app, public_port, frozenset(allowed)

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            server = scope.get("server") or (None, None)
            if server[1] == self.port and (scope["type"] != "http" or scope.get("path") not in self.allowed):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = b"only the Fleet API is served on this port\n"
                headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 403, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise SystemExit(f"error: --public takes HOST:PORT, got '{text}'")
    return (host.strip("[]") or "0.0.0.0"), int(port)


def superlink(public: str, args: list[str]) -> None:
    import importlib

    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.superlink.main import create_app
    from flwr.superlink.routers.fleet.router import router as fleet_router

    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")
    host, port = _address(public)
    sys.argv = ["flower-superlink", *args]
    config = fs._parse_superlink_lifespan_config()  # noqa: SLF001  (Flower's own parsing and checks)
    if config.host not in ("127.0.0.1", "localhost", "::1") or config.port == port:
        raise SystemExit("error: the SuperLink's own --host must be loopback and its --port not the public one")
    allowed = {route.path for route in fleet_router.routes}
    if not allowed or not all(p.startswith("/v1/fleet/") for p in allowed):
        raise SystemExit("error: this Flower's Fleet API routes are not the expected /v1/fleet/...: not serving")
    app = FleetOnly(create_app(config, fs.SuperLinkLifespan), port, allowed)
    sockets = [_bind(config.host, config.port), _bind(host, port)]
    scheme = "http" if config.ssl_certfile is None else "https"
    fs.log(fs.INFO, "ggfwd: Fleet API only on %s://%s:%s; Control and runtime APIs on %s://%s:%s (loopback only)",
           scheme, host, port, scheme, config.host, config.port)
    server = uvicorn.Server(uvicorn.Config(
        app=app, reload=False, access_log=False, log_config=get_uvicorn_log_config(fs.console_handler.level),
        ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile, workers=1))
    server.run(sockets=sockets)


def supernode(poll: float, args: list[str]) -> None:
    from flwr.supernode import start_client_internal as sci
    from flwr.supernode.cli import flower_supernode

    short_object_backoff()
    if getattr(sci, "time", None) is _time:
        sci.time = _ShortSleep(poll)
    else:
        print("ggfwd: this Flower's SuperNode loop is not the expected one; its own poll interval stays",
              file=sys.stderr)
    sys.argv = ["flower-supernode", *args]
    flower_supernode()


_ZYGOTE_MAX = 64 * 1024  # bytes of one command line sent to the zygote


def _zygote(sock: socket.socket, entry) -> None:
    """Fork a child per command line received; exit when the other end closes. Never returns."""
    import json
    import os
    import signal
    import struct

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    while True:
        try:
            head = sock.recv(4, socket.MSG_WAITALL)
            (n,) = struct.unpack("<I", head) if len(head) == 4 else (None,)
            data = sock.recv(n, socket.MSG_WAITALL) if n is not None and n <= _ZYGOTE_MAX else b""
            argv = json.loads(data) if n and len(data) == n else None
        except (OSError, ValueError):
            argv = None
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            os._exit(0)
        if os.fork() == 0:
            sock.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = 0
            try:
                sys.argv = argv
                entry()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)


class _ForkingSubprocess:
    """Stands in for the `subprocess` module inside Flower's subprocess executor: `flwr-clientapp` command lines
    go to the zygote, anything else to the real `subprocess.Popen`."""

    def __init__(self, sock: socket.socket):
        import subprocess

        self._real, self._sock = subprocess, sock

    def __getattr__(self, name):
        return getattr(self._real, name)

    def Popen(self, args, **kwargs):  # noqa: N802  (the name Flower calls)
        import json
        import struct

        if isinstance(args, list) and args and args[0] == "flwr-clientapp" and not kwargs:
            data = json.dumps(args).encode()
            if len(data) <= _ZYGOTE_MAX and self._sock is not None:
                try:
                    self._sock.sendall(struct.pack("<I", len(data)) + data)
                    return None
                except OSError:  # the zygote is gone: start processes as Flower does from now on
                    self._sock = None
        return self._real.Popen(args, **kwargs)


def superexec(zygote: bool, args: list[str]) -> None:
    import importlib
    import os

    from flwr.supercore.cli import flower_superexec
    from flwr.supernode.cli import flwr_clientapp

    if zygote and hasattr(os, "fork") and hasattr(socket, "socketpair"):  # POSIX; elsewhere Flower's own Popen
        importlib.import_module("ggfwd.federation.flower_app")  # the ClientApp's module, imported once
        import httpx

        httpx.Client().close()  # the HTTP stack Flower's runtime client imports on first use (httpcore, h11)
        short_object_backoff()
        executor = importlib.import_module("flwr.supercore.superexec.executor.subprocess_executor")
        ours, theirs = socket.socketpair()
        if os.fork() == 0:
            ours.close()
            _zygote(theirs, flwr_clientapp)
        theirs.close()
        executor.subprocess = _ForkingSubprocess(ours)
    sys.argv = ["flower-superexec", *args]
    flower_superexec()


def main(argv: list[str]) -> None:
    options = {"superlink": "--public", "supernode": "--poll", "superexec": "--zygote"}
    if len(argv) < 4 or argv[0] not in options or argv[3] != "--" or argv[1] != options[argv[0]]:
        raise SystemExit("usage: python -m ggfwd.federation.launch superlink --public HOST:PORT -- ARGS | "
                         "supernode --poll SECONDS -- ARGS | superexec --zygote yes|no -- ARGS")
    if argv[0] == "superlink":
        superlink(argv[2], argv[4:])
    elif argv[0] == "superexec":
        superexec(argv[2] == "yes", argv[4:])
    else:
        try:
            poll = float(argv[2])
        except ValueError:
            poll = -1.0
        if not 0.01 <= poll <= 3.0:
            raise SystemExit(f"error: --poll must lie in [0.01, 3] seconds, got {argv[2]}")
        supernode(poll, argv[4:])


if __name__ == "__main__":
    main(sys.argv[1:])
