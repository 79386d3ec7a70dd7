"""The warm node: one long-lived worker process per device that holds the model, the data and the replica for
the whole run, and the local channel through which Flower's per-message ClientApp hands it each message.

Why: Flower 1.42 runs every message in a fresh `flwr-clientapp` process, so a ClientApp that scores by itself
loads the model, tokenizes its data and reads its replica again for every round. Here the ClientApp only
forwards: it imports neither llama_cpp nor ggfwd's training code, opens one loopback connection to this node's
worker, sends the message and returns the reply. The worker is the only place that scores.

Processes of one `ggfwd join` (the supervisor, `supervise`):

    ggfwd join ──┬── worker       python -m ggfwd.federation.worker NODE_FOLDER   (restarted when it dies)
                 ├── SuperNode    flower-supernode --isolation process ... (through `launch`)
                 └── SuperExec    flower-superexec ... (through `launch`) ── one flwr-clientapp per message

The channel is a TCP connection on 127.0.0.1 (portable: Termux, macOS, Linux; no socket-path length limits).
The worker binds an ephemeral port and writes it to NODE_FOLDER/worker.json; the per-node secret (32 random
bytes, made by `join` at each start) is in NODE_FOLDER/worker.key, readable only by its owner. One exchange:

    worker -> client   16-byte nonce (fresh per connection)
    client -> worker   b"GGWK" | body length (u64) | HMAC-SHA256(secret, nonce | b"q" | body) | body
    worker -> client   b"GGWK" | body length (u64) | HMAC-SHA256(secret, nonce | b"r" | body) | body

The length is checked against the bound before a byte of the body is read (`MAX_REQUEST`, `MAX_REPLY`), the MAC
before the body is parsed; a frame that fails either is refused by closing the connection, with nothing decoded
and nothing changed. The reply's MAC lets the ClientApp know it talked to its own worker, not to whatever took
the port after the worker died. A body is

    kind (u8) | text length (u32) | record count (u32) | text (UTF-8) | (record length (u64) | record bytes)*

where the text is the run settings (request) or an error's reason (reply), and the records are exactly the
federation's records (`messages.encode`) that the Flower message carried: no pickle, nothing evaluated.

The worker serves one connection at a time (a SuperNode hands over one message at a time), exits when its
parent (`join`) is gone (and on Linux/Android every child of `join` gets SIGTERM when `join` dies, even by SIGKILL), and keeps the replica on disk as well as in memory (`node.Node`), so a restarted worker
catches up from broadcasts or a snapshot exactly as a node did before it was warm.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

MAGIC = b"GGWK"
_HEAD = struct.Struct("<4sQ")
_BODY = struct.Struct("<BII")
_REC = struct.Struct("<Q")
NONCE = 16
MAC = 32
MAX_REQUEST = (1 << 30) + (1 << 20)  # a snapshot of a large adapter, with its instruction and run settings
MAX_REPLY = 1 << 20  # a report is < 20 KiB
MAX_TEXT = 256 * 1024  # run settings (handshake.MAX_RUN_SETTINGS characters) or a reason
MAX_RECORDS = 1024
KINDS = ("hello", "train", "report", "need", "error")
WORKER_FILE = "worker.json"
SECRET_FILE = "worker.key"
IO_TIMEOUT = 60.0  # seconds the worker waits for a frame's bytes


class ChannelError(Exception):
    """A frame refused (too large, wrong MAC, malformed) or a connection that broke."""


# ----------------------------------------------------------------------------- frames
def pack(kind: str, text: str, records) -> bytes:
    raw = text.encode("utf-8")
    parts = [_BODY.pack(KINDS.index(kind), len(raw), len(records)), raw]
    for r in records:
        parts += [_REC.pack(len(r)), bytes(r)]
    return b"".join(parts)


def unpack(body: bytes) -> tuple[str, str, list[bytes]]:
    if len(body) < _BODY.size:
        raise ChannelError("a frame shorter than its header")
    code, n_text, n_rec = _BODY.unpack_from(body)
    if code >= len(KINDS) or n_text > MAX_TEXT or n_rec > MAX_RECORDS:
        raise ChannelError("a frame with an unknown kind or too many records or characters")
    at = _BODY.size + n_text
    if at > len(body):
        raise ChannelError("a frame cut short")
    try:
        text = body[_BODY.size:at].decode("utf-8")
    except UnicodeDecodeError:
        raise ChannelError("a frame whose text is not UTF-8") from None
    records = []
    for _ in range(n_rec):
        if at + _REC.size > len(body):
            raise ChannelError("a frame cut short")
        (n,) = _REC.unpack_from(body, at)
        at += _REC.size
        if n > len(body) - at:
            raise ChannelError("a record longer than its frame")
        records.append(body[at:at + n])
        at += n
    if at != len(body):
        raise ChannelError("bytes after a frame's last record")
    return KINDS[code], text, records


def _mac(secret: bytes, nonce: bytes, tag: bytes, body: bytes) -> bytes:
    return hmac.new(secret, nonce + tag + body, hashlib.sha256).digest()


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ChannelError("the connection closed")
        buf += chunk
    return bytes(buf)


def send_frame(sock: socket.socket, secret: bytes, nonce: bytes, tag: bytes, body: bytes) -> None:
    sock.sendall(_HEAD.pack(MAGIC, len(body)) + _mac(secret, nonce, tag, body) + body)


def recv_frame(sock: socket.socket, secret: bytes, nonce: bytes, tag: bytes, limit: int) -> bytes:
    magic, n = _HEAD.unpack(_recv(sock, _HEAD.size))
    if magic != MAGIC:
        raise ChannelError("not a ggfwd worker frame")
    if n > limit:
        raise ChannelError(f"a frame of {n} bytes, over the {limit}-byte bound")
    mac = _recv(sock, MAC)
    body = _recv(sock, n)
    if not hmac.compare_digest(mac, _mac(secret, nonce, tag, body)):
        raise ChannelError("a frame with a wrong node secret")
    return body


# ----------------------------------------------------------------------------- the ClientApp's side
def read_secret(folder: Path) -> bytes:
    secret = (Path(folder) / SECRET_FILE).read_bytes()
    if len(secret) != 32:
        raise ChannelError("the node secret is not 32 bytes")
    return secret


def worker_port(folder: Path) -> int:
    try:
        port = json.loads((Path(folder) / WORKER_FILE).read_text(encoding="utf-8"))["port"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ChannelError("the node worker is not running (no worker.json)") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ChannelError("worker.json names no port")
    return port


def call(folder, kind: str, run_text: str, records, timeout: float = 3600.0,
         wait: float = 30.0) -> tuple[str, str, list[bytes]]:
    """Hand one message to the node's worker and return its reply (kind, text, records). Waits up to `wait`
    seconds for a worker being (re)started; ChannelError when it cannot be reached or answers out of bounds."""
    folder = Path(folder)
    end = time.monotonic() + wait
    while True:
        try:
            secret = read_secret(folder)
            sock = socket.create_connection(("127.0.0.1", worker_port(folder)), timeout=5)
            break
        except (OSError, ChannelError) as exc:
            if time.monotonic() > end:
                raise ChannelError(f"the node worker cannot be reached: {exc}") from None
            time.sleep(0.1)
    with sock:
        sock.settimeout(timeout)
        try:
            nonce = _recv(sock, NONCE)
            send_frame(sock, secret, nonce, b"q", pack(kind, run_text, records))
            return unpack(recv_frame(sock, secret, nonce, b"r", MAX_REPLY))
        except OSError as exc:
            raise ChannelError(f"the node worker connection failed: {exc}") from None


# ----------------------------------------------------------------------------- the worker
def _handle(node, kind: str, text: str, records: list[bytes]) -> tuple[str, str, list[bytes]]:
    from ..errors import UserError
    from .messages import MessageError

    try:
        if kind == "hello" and not records:
            return "hello", "", [node.hello(text)]
        if kind == "train":
            reply, out = node.train(text, records)
            return reply, "", out
        return "error", f"a '{kind}' request with {len(records)} records", []
    except (UserError, MessageError, KeyError) as exc:  # refused, with a reason the server logs
        return "error", " ".join(str(exc).split())[:500], []
    except Exception as exc:  # noqa: BLE001  (a fault in scoring: answer it, start the session afresh)
        node.close()
        return "error", f"node worker: {type(exc).__name__}: {' '.join(str(exc).split())}"[:500], []


def serve(folder: Path, log=print) -> None:
    """The worker's loop: accept, authenticate, handle, answer; exits when the parent process is gone."""
    from ..files import atomic_write
    from .node import NODE_FILE, Node

    folder = Path(folder)
    secret = read_secret(folder)
    node = Node(folder / NODE_FILE)
    parent = os.getppid()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(1.0)
        port = server.getsockname()[1]
        atomic_write(folder / WORKER_FILE, lambda f: f.write(json.dumps({"port": port, "pid": os.getpid()}).encode()))
        log(f"node worker {os.getpid()} listening on 127.0.0.1:{port}")
        try:
            while os.getppid() == parent:
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(IO_TIMEOUT)
                    nonce = secrets.token_bytes(NONCE)
                    try:
                        conn.sendall(nonce)
                        kind, text, records = unpack(recv_frame(conn, secret, nonce, b"q", MAX_REQUEST))
                    except (ChannelError, OSError) as exc:
                        log(f"refused a connection: {exc}")
                        continue
                    started = time.perf_counter()
                    reply = _handle(node, kind, text, records)
                    log(f"{kind}: {reply[0]} in {time.perf_counter() - started:.3f} s"
                        + (f" ({reply[1]})" if reply[1] else ""))
                    try:
                        send_frame(conn, secret, nonce, b"r", pack(*reply))
                    except OSError as exc:
                        log(f"the reply could not be sent: {exc}")
                if kind == "hello" and reply[0] == "hello":  # warm up for the first round, after answering
                    started = time.perf_counter()
                    node.prepare(text)
                    log(f"prepared the run in {time.perf_counter() - started:.3f} s")
        finally:
            node.close()


# ----------------------------------------------------------------------------- the supervisor (`ggfwd join`)
def new_secret(folder: Path) -> None:
    """A fresh per-node secret in FOLDER/worker.key, readable only by its owner."""
    path = Path(folder) / SECRET_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))


def _die_with_parent() -> None:
    """In a child of `join` (Linux, Android): SIGTERM when `join` dies, even by SIGKILL. Elsewhere nothing."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_worker(folder: Path, env: dict | None = None) -> subprocess.Popen:
    (Path(folder) / WORKER_FILE).unlink(missing_ok=True)
    log = open(Path(folder) / "worker.log", "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "ggfwd.federation.worker", str(folder)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    finally:
        log.close()


def supervise(folder: Path, supernode_cmd: list[str], env: dict, say=print, superexec_cmd=None) -> int:
    """Run the worker and the SuperNode (and, when `superexec_cmd(supernode_pid)` is given, the SuperExec that
    starts its ClientApps) side by side until the SuperNode ends (its exit code is returned); restart the worker
    whenever it dies. SIGTERM / SIGINT stop them all."""
    folder = Path(folder)
    new_secret(folder)
    stopping = []

    def on_signal(signum, _frame):
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    worker = start_worker(folder, env)
    started, restarts = time.monotonic(), 0
    tie = _die_with_parent if sys.platform.startswith("linux") else None  # elsewhere the SuperExec follows the
    procs = [subprocess.Popen(supernode_cmd, env=env, stdin=subprocess.DEVNULL, preexec_fn=tie)]  # SuperNode only
    if superexec_cmd is not None:
        procs.append(subprocess.Popen(superexec_cmd(procs[0].pid), env=env, stdin=subprocess.DEVNULL, preexec_fn=tie))
    try:
        while not stopping:
            for proc in procs:
                code = proc.poll()
                if code is not None:
                    return code
            if worker.poll() is not None:
                restarts += 1
                say(f"node worker exited ({worker.returncode}); restarting it (restart {restarts})")
                if time.monotonic() - started < 5:
                    time.sleep(2)  # it dies at once: do not spin
                worker, started = start_worker(folder, env), time.monotonic()
            time.sleep(0.2)
        return 128 + stopping[0]
    finally:
        for proc in (*procs, worker):
            if proc.poll() is None:
                proc.terminate()
        for proc in (*procs, worker):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: list[str]) -> int:
    from ..errors import UserError

    if len(argv) != 1:
        print("usage: python -m ggfwd.federation.worker NODE_FOLDER", file=sys.stderr)
        return 2

    def log(line: str) -> None:
        print(time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d} " + line, flush=True)

    try:
        serve(Path(argv[0]), log)
    except (OSError, ChannelError, UserError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
