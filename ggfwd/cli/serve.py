"""`ggfwd serve`, `ggfwd join` and `ggfwd certs`: a federation across processes and machines, on Flower.

`serve` starts a Flower SuperLink and launches ggfwd's Flower app on it (`flwr run` of the bundle shipped in
the package, with runtime dependency installation off and Flower's settings in a folder of the run); it waits
for the run, showing the rounds as they are committed, and stops what it started. The SuperLink serves only its
Fleet API on --host:--port; its Control and runtime APIs listen on a loopback port of their own
(`federation/launch.py`). `join` writes the node's settings into its node folder and supervises three processes
until the SuperNode ends: the node worker that holds the model, data and replica (`federation/worker.py`,
restarted if it dies), a Flower SuperNode, and the SuperExec that forks its per-message ClientApps, which only
forward each message to the worker. `certs` makes a CA, a server certificate and node keys for a LAN.

Every path option is resolved against the folder the command is run from before anything starts, since Flower's
processes run in other folders.

flwr is imported only by the processes these start (`ggfwd.federation.flower_app`, `ggfwd.federation.launch`);
this module checks that it is installed and otherwise says how to install it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from ..errors import UserError
from .options import LR_SCALE_MAX_OPTION, LR_SCALING_OPTION, MEMORY_OPTION, SPREAD_OPTION, flag

err = Console(stderr=True)
BUNDLE = Path(__file__).resolve().parent.parent / "federation" / "flower_bundle"
_SERVE_OPTIONS = ("steps", "lr", "eps", "directions", "batch_size", "optimizer", "seed", "average_decay",
                  "eval_every", "checkpoint_every", "clip", "lr_scaling", "lr_scale_max",
                  "spread")


# ----------------------------------------------------------------------------- helpers
def _need_flower() -> None:
    import importlib.util

    if sys.version_info < (3, 11):
        raise UserError("ggfwd serve/join need Flower, which needs Python >= 3.11")
    if importlib.util.find_spec("flwr") is None:
        raise UserError("ggfwd serve/join need Flower: pip install 'ggfwd[federated]'")


def _tool(name: str) -> str:
    """A console script installed beside this Python (Flower's), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise UserError(f"{name} not found: pip install 'ggfwd[federated]'")
    return found


def _env(flwr_home: Path) -> dict:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # Flower spawns its tools
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no post to Flower's servers from every ClientApp process
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")  # no look-up of a newer flwr
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")  # a message's process starts within 0.1 s (Flower: 1)
    return env


def _launch(kind: str, option: str, value: str, args: list[str]) -> list[str]:
    """Flower's SuperLink, SuperNode or SuperExec started through `ggfwd.federation.launch` (see there why)."""
    return [sys.executable, "-m", "ggfwd.federation.launch", kind, option, value, "--", *args]


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quote(path: Path) -> str:
    text = str(path)
    if "'" in text or "\n" in text:
        raise UserError(f"a path with a quote or a line break cannot be passed to Flower: {text}")
    return f"'{text}'"


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--server takes HOST:PORT, got '{text}'")
    return host.strip("[]"), int(port)


def _wait_port(host: str, port: int, proc: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise UserError(f"flower-superlink exited ({proc.returncode}): {_tail(log)}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise UserError(f"flower-superlink did not listen on {host}:{port} within {seconds:.0f} s")


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [x for x in path.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(" ".join(x.split()) for x in lines[-n:])[-600:]


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _certs_files(certs: Path) -> dict[str, Path]:
    certs = certs.resolve()  # Flower's processes run in the run folder: a relative path would point elsewhere
    files = {"ca": certs / "ca.pem", "cert": certs / "server.pem", "key": certs / "server.key"}
    for path in files.values():
        if not path.is_file():
            raise UserError(f"--certs {certs} lacks {path.name} (make them with: ggfwd certs {certs})")
    return files


def _connection(home: Path, address: str, files: dict | None) -> None:
    """$FLWR_HOME/config.toml: the SuperLink connection `flwr run` and `flwr supernode register` use."""
    from ..files import atomic_write

    conn = [f'address = "{address}"']
    conn += ["insecure = true"] if files is None else [f"root-certificates = {json.dumps(str(files['ca'].resolve()))}"]
    atomic_write(home / "config.toml", lambda f: f.write(
        ('[superlink]\ndefault = "ggfwd"\n\n[superlink.ggfwd]\n' + "\n".join(conn) + "\n").encode()))


def _register(keys: list[Path], link_cmd: list[str], home: Path, env: dict, files: dict, log: Path) -> None:
    """Register the nodes' public keys in the SuperLink's database through a SuperLink on a private loopback
    port, so that the public one never runs without them (a node refused once does not try again)."""
    port = _free_loopback_port()
    _connection(home, f"127.0.0.1:{port}", files)
    with open(log, "ab") as logf:
        link = subprocess.Popen([*link_cmd, "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=logf,
                                stderr=subprocess.STDOUT, cwd=home)
    try:
        _wait_port("127.0.0.1", port, link, log)
        for key in keys:
            r = subprocess.run([_tool("flwr"), "supernode", "register", str(key.resolve()), "ggfwd"], env=env,
                               cwd=home, capture_output=True, text=True, timeout=120)
            said = " ".join((r.stdout + r.stderr).split())
            if r.returncode != 0 and "already" not in said.lower():
                raise UserError(f"registering {key.name} failed: {said[-300:]}")
    finally:
        _stop(link)


def _on_sigterm(*_):
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------- serve
def serve_command(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Base GGUF model (default: the demo Gemma-3-270M); every node needs the same file."),
    eval_data: Optional[Path] = typer.Option(None, "--data-eval", "--eval-data", help="Evaluation data, scored at the server."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Built-in task name or a task file \\[default: sst2]."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Rounds (one update each) \\[default: 200; 30 in the demo]."),
    clients: int = typer.Option(100, "--clients", help="Client ids 0..N-1 that nodes may hold; selection draws over them."),
    clients_per_round: int = typer.Option(4, "--clients-per-round", help="Nodes instructed per round (among those connected)."),
    min_nodes: Optional[int] = typer.Option(None, "--min-nodes", help="Nodes to wait for before the first round \\[default: --clients-per-round]."),
    wait: float = typer.Option(600.0, "--wait", help="Seconds to wait for --min-nodes nodes."),
    deadline: float = typer.Option(300.0, "--deadline", help="Seconds a round waits for reports (with --mode async: a job's reply, and an update); later ones are discarded."),
    mode: str = typer.Option("sync", "--mode", help="sync: rounds of selected nodes; async: every node works back to back, an update per --clients-per-round reports (needs --max-staleness)."),
    max_staleness: int = typer.Option(0, "--max-staleness", help="Reports count while at most this many updates old, and with client memory every update reuses each node's latest report that long (0: off)."),
    client_memory: bool = typer.Option(True, "--client-memory/--no-client-memory", help="With --max-staleness: keep every node's latest report for later updates (MIFA), or count each report once at its staleness weight (FedBuff)."),
    max_lag: int = typer.Option(1000, "--max-lag", help="Most rounds a node (or a joiner) replays from the run's history of broadcasts; further behind, or when the history is larger, it gets the trained values."),
    weighting: str = typer.Option("examples", "--weighting", help="Nodes' weights in a round's update: examples (by the training-set size a node reports, capped at 4x the round's median), equal, or directions."),
    clip: Optional[float] = typer.Option(None, "--clip", help="Limit scalars to CLIP x the median client's median |s| (0: off) \\[default: 0; 5 in the demo]."),
    host: str = typer.Option("0.0.0.0", "--host", help="Address the SuperLink's Fleet API listens on (0.0.0.0: every interface); its Control API listens on loopback only."),
    port: int = typer.Option(9092, "--port", help="Port of the SuperLink (nodes join HOST:PORT)."),
    certs: Optional[Path] = typer.Option(None, "--certs", help="Folder with ca.pem, server.pem, server.key (ggfwd certs DIR)."),
    insecure: bool = flag("--insecure", help="Serve without TLS (test networks only)."),
    node_keys: Optional[Path] = typer.Option(None, "--node-keys", help="Folder of node public keys (*.pub): only these nodes may join (needs TLS)."),
    eval_limit: Optional[int] = typer.Option(None, min=1, help="Use only the first N evaluation examples."),
    min_words: Optional[int] = typer.Option(None, min=0, help="Nodes train only on examples of at least N words \\[default: 0]."),
    rank: Optional[int] = typer.Option(None, help="Rank of the fresh adapter \\[default: 8]."),
    alpha: Optional[float] = typer.Option(None, help="Alpha of the fresh adapter \\[default: 16]."),
    targets: Optional[str] = typer.Option(None, help="Comma-separated weight patterns \\[default: attn_q,attn_v]."),
    max_tokens: Optional[int] = typer.Option(None, help="Longest example in tokens \\[default: 128]."),
    lr: Optional[float] = typer.Option(None, help="Base learning rate, for one direction \\[default: 0.02]."),
    lr_scaling: Optional[str] = LR_SCALING_OPTION,
    lr_scale_max: Optional[float] = LR_SCALE_MAX_OPTION,
    spread: Optional[str] = SPREAD_OPTION,
    eps: Optional[float] = typer.Option(None, help="Perturbation size \\[default: 0.1]."),
    directions: Optional[int] = typer.Option(None, help="Directions per node and round \\[default: 1]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Examples per node and round \\[default: 16; 8 in the demo]."),
    optimizer: Optional[str] = typer.Option(None, help="sgd or adam."),
    seed: Optional[int] = typer.Option(None, help="Run seed: selection, batches and directions derive from it."),
    average_decay: Optional[float] = typer.Option(None, "--average", help="Evaluate and save a moving average of the adapter (0: off)."),
    eval_every: Optional[int] = typer.Option(None, help="Evaluate every N rounds (0: only at start and end)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Commit a checkpoint every N rounds and at the end \\[default: 1]."),
    threads: Optional[int] = typer.Option(None, min=1, help="Compute threads for the server's evaluation."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/serve-TIMESTAMP)."),
    resume: bool = flag("--resume", help="Continue the run in --out from its last checkpoint."),
):
    from ..federation.handshake import run_settings
    from ..federation.coordinator import SERVE_FILE
    from ..federation.remote import RemoteConfig
    from ..federation.simulate import SAVED_BEFORE
    from ..run import inputs_given as given_inputs, plan_run
    from .federate import DEMO

    steps = rounds
    given = {k: v for k, v in locals().items() if k in _SERVE_OPTIONS and v is not None}
    # the ServerApp runs in another folder: every path is made absolute here
    if task is not None and Path(task).is_file():
        task = str(Path(task).resolve())
    model, eval_data = (p.resolve() if p is not None else None for p in (model, eval_data))
    out = out.resolve() if out is not None else None
    inputs_given = given_inputs({"model": model, "eval_data": eval_data, "task": task, "min_words": min_words,
                                  "eval_limit": eval_limit, "rank": rank, "alpha": alpha, "targets": targets,
                                  "max_tokens": max_tokens})
    if insecure == (certs is not None):
        raise UserError("give --certs DIR (TLS, made by ggfwd certs) or --insecure")
    if node_keys is not None:
        node_keys = node_keys.resolve()
        if insecure:
            raise UserError("--node-keys (node authentication) needs TLS: drop --insecure")
        keys = sorted(node_keys.glob("*.pub")) if node_keys.is_dir() else []
        if not keys:
            raise UserError(f"--node-keys {node_keys} holds no *.pub files")
    files = _certs_files(certs) if certs is not None else None
    if not 0 < port < 65536:
        raise UserError(f"--port must lie in 1..65535, got {port}")
    fresh = RemoteConfig(clients, clients_per_round, deadline, max_lag,
                         min_nodes if min_nodes is not None else min(clients_per_round, clients), wait, weighting,
                         mode, max_staleness, client_memory)
    if not resume:  # checked before the model is looked for
        fresh.check()
    run = plan_run("serve", given, inputs_given, out, resume, DEMO)
    config, inputs = run.config, run.inputs
    inputs.data, inputs.train_limit = None, None  # the nodes hold the training data
    if run.state is not None:
        remote = RemoteConfig(**{**SAVED_BEFORE, **run.state["remote"], "deadline": deadline, "wait": wait})
        if min_nodes is not None:
            remote.min_nodes = min_nodes
    else:
        remote = fresh
    remote.check()
    _need_flower()
    out = run.out.resolve()  # Flower's processes run in other folders
    out.mkdir(parents=True, exist_ok=True)
    home = out / "flower"
    app = home / "app"
    shutil.rmtree(app, ignore_errors=True)
    shutil.copytree(BUNDLE, app, ignore=shutil.ignore_patterns("__pycache__"))
    from ..files import atomic_write

    spec = {"config": asdict(config), "inputs": inputs.to_dict(), "remote": asdict(remote), "threads": threads,
            "resume": run.state is not None}
    atomic_write(out / SERVE_FILE, lambda f: f.write(json.dumps(spec, indent=1).encode()))
    settings = run_settings(config, inputs, remote.stale())
    overrides = f"run-dir = {json.dumps(str(out.resolve()))}\nggfwd-run = {json.dumps(settings)}\n"
    atomic_write(home / "run-config.toml", lambda f: f.write(overrides.encode()))
    (out / "server-error.txt").unlink(missing_ok=True)
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # where this machine reaches the Fleet API
    env = _env(home)
    # the SuperLink's state in the run folder: registered nodes outlive a restart of `ggfwd serve` (a SuperNode
    # that the SuperLink no longer knows stops)
    link_args = ["--database", str(home / "superlink.db"), "--disable-runtime-dependency-installation"]
    link_args += ["--insecure"] if insecure else ["--ssl-ca-certfile", str(files["ca"]), "--ssl-certfile",
                                                  str(files["cert"]), "--ssl-keyfile", str(files["key"])]
    if node_keys is not None:
        link_args.append("--enable-supernode-auth")
    link_cmd = [_tool("flower-superlink"), *link_args]
    control = _free_loopback_port()  # Control and runtime APIs: loopback only
    link_log, run_log = home / "superlink.log", home / "flwr-run.log"
    link = flwr_run = None
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if node_keys is not None:  # registered before any node can reach the SuperLink
            _register(keys, link_cmd, home, env, files, link_log)
        _connection(home, f"127.0.0.1:{control}", files)
        with open(link_log, "ab") as logf:
            link = subprocess.Popen(_launch("superlink", "--public", f"{host}:{port}",
                                            [*link_args, "--host", "127.0.0.1", "--port", str(control)]),
                                    env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=home)
        _wait_port("127.0.0.1", control, link, link_log)
        _wait_port(local, port, link, link_log)
        err.print(f"[bold]ggfwd serve[/] -> {out}  (SuperLink's Fleet API on {host}:{port}, "
                  f"{'TLS' if not insecure else 'no TLS'}{', node keys ' + str(len(keys)) if node_keys else ''}; "
                  f"nodes join with: ggfwd join --server HOST:{port} ...)")
        with open(run_log, "ab") as logf:
            flwr_run = subprocess.Popen([_tool("flwr"), "run", str(app), "ggfwd", "--stream", "--run-config",
                                         str(home / "run-config.toml")], env=env, stdout=logf,
                                        stderr=subprocess.STDOUT, cwd=home)
        _follow(out, flwr_run, config.steps)
    except KeyboardInterrupt:
        err.print("stopped; resume with: ggfwd serve --out " + str(out) + " --resume ...")
        raise typer.Exit(130)
    finally:
        _stop(flwr_run)
        _stop(link)
        signal.signal(signal.SIGTERM, previous)
    error = out / "server-error.txt"
    if error.exists():
        raise UserError(f"the server stopped: {error.read_text(encoding='utf-8').strip()}")
    state = json.loads((out / "state.json").read_text()) if (out / "state.json").exists() else {}
    if state.get("step") != config.steps:
        raise UserError(f"the Flower run ended at round {state.get('step', 0)} of {config.steps}: "
                        f"{_tail(run_log)} (logs in {home})")
    err.print(f"done: {state['step']} rounds; adapter: {out / 'adapter.gguf'}   metrics: {out / 'metrics.jsonl'}")


def _follow(out: Path, proc: subprocess.Popen, rounds: int) -> None:
    """Print each committed round from metrics.jsonl until the run's `flwr run` ends."""
    seen, metrics = 0, out / "metrics.jsonl"
    while True:
        done = proc.poll() is not None
        if metrics.exists():
            lines = metrics.read_text(encoding="utf-8").splitlines()
            for line in lines[seen:]:
                try:
                    r = json.loads(line)
                except ValueError:
                    break  # being written
                seen += 1
                if r.get("step", 0) == 0:
                    continue
                acc = f"  eval acc {r['eval_accuracy']:.1%}" if "eval_accuracy" in r else ""
                err.print(f"round {r['step']}/{rounds}: nodes {r.get('nodes')}, accepted {r.get('accepted')}"
                          f"{', lost ' + str(r['lost']) if r.get('lost') else ''}, {r.get('round_seconds', 0):.1f} s{acc}")
        if done:
            return
        time.sleep(0.5)


# ----------------------------------------------------------------------------- join
def join_command(
    server: str = typer.Option(..., "--server", help="HOST:PORT of the SuperLink started by ggfwd serve."),
    data: Path = typer.Option(..., "--data", "-d", help="This device's private training data (JSONL or TSV)."),
    profile: str = typer.Option(..., "--profile", help="This device's profile (ggfwd devices list), reported to the server."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="This device's copy of the run's base model (default: the demo Gemma-3-270M)."),
    client_id: Optional[int] = typer.Option(None, "--client-id", min=0, help="Ask for this client id (default: the server assigns one, kept in --state)."),
    ca: Optional[Path] = typer.Option(None, "--ca", help="The CA certificate (ca.pem from ggfwd certs) the server's certificate is checked against."),
    insecure: bool = flag("--insecure", help="Connect without TLS (the server must run with --insecure)."),
    key: Optional[Path] = typer.Option(None, "--key", help="This node's private key (node-N.key from ggfwd certs), when the server authenticates nodes."),
    state: Path = typer.Option(Path("ggfwd-node"), "--state", help="Node folder: settings, this node's adapter replica, Flower's files."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Task file or name (default: the run's)."),
    threads: Optional[int] = typer.Option(None, min=1, help="Compute threads (default: physical cores)."),
    memory: Optional[str] = MEMORY_OPTION,
    local_port: int = typer.Option(9094, "--local-port", help="Port of this node's local Flower runtime API (distinct per node on one host)."),
    poll: float = typer.Option(0.25, "--poll", help="Seconds the SuperNode waits between asking the server for a message (Flower's own: 3)."),
):
    from ..federation.node import NodeSettings
    from ..profiles import load_profile
    from ..session import check_memory

    host, port = _address(server)
    if insecure == (ca is not None):
        raise UserError("give --ca ca.pem (TLS) or --insecure")
    if ca is not None and not ca.is_file():
        raise UserError(f"--ca file not found: {ca}")
    # the SuperNode, its ClientApp processes and the node worker run in other folders: every path is made absolute
    ca, key, state, data, model = (p.resolve() if p is not None else None for p in (ca, key, state, data, model))
    if task is not None and Path(task).is_file():
        task = str(Path(task).resolve())
    if not 0.01 <= poll <= 3:
        raise UserError(f"--poll must lie in [0.01, 3] seconds, got {poll}")
    if key is not None and (insecure or not key.is_file()):
        raise UserError("--key needs TLS (--ca) and an existing private key file")
    if not 0 < local_port < 65536:
        raise UserError(f"--local-port must lie in 1..65535, got {local_port}")
    load_profile(profile)
    check_memory(memory or "standard")
    if model is None:
        from ..demo import demo_model

        model = demo_model()
    settings = NodeSettings(str(model), str(data), profile, client_id, threads, task, memory or "standard")
    settings.check()
    _need_flower()
    state.mkdir(parents=True, exist_ok=True)
    path = settings.write(state)
    home = state / "flower"
    home.mkdir(exist_ok=True)
    args = ["--superlink", f"{host}:{port}", "--port", str(local_port), "--isolation", "process",
            "--node-config", f"ggfwd-node={_quote(path.resolve())}"]
    args += ["--insecure"] if insecure else ["--root-certificates", str(ca)]
    if key is not None:
        args += ["--auth-supernode-private-key", str(key)]
    err.print(f"[bold]ggfwd join[/] {host}:{port} as {profile} with {data} ({'TLS' if not insecure else 'no TLS'}"
              f"{', node key' if key else ''}); node folder {state}; node worker log {state / 'worker.log'}")
    sys.stdout.flush()
    sys.stderr.flush()
    from ..federation.worker import supervise

    superexec = lambda pid: _launch("superexec", "--zygote", "yes", [  # noqa: E731
        "--insecure", "--runtime-api-address", f"127.0.0.1:{local_port}", "--parent-pid", str(pid)])
    code = supervise(state, _launch("supernode", "--poll", str(poll), args), _env(home),
                     say=lambda line: err.print(f"ggfwd join: {line}"), superexec_cmd=superexec)
    if code:
        raise typer.Exit(code)


# ----------------------------------------------------------------------------- certs
def certs_command(
    folder: Path = typer.Argument(..., help="Folder to write ca.pem, ca.key, server.pem, server.key (and node keys) into."),
    hosts: List[str] = typer.Option([], "--host", help="A name or IP address nodes use to reach the server (repeatable); localhost and 127.0.0.1 are always included."),
    nodes: int = typer.Option(0, "--nodes", min=0, max=1000, help="Also make N node key pairs (node-I.key, node-I.pub) for node authentication."),
    days: int = typer.Option(365, "--days", min=1, max=3650, help="Validity of the certificates."),
):
    from ..federation.certs import make_certs

    written = make_certs(folder, hosts, nodes, days)
    err.print(f"wrote {', '.join(p.name for p in written)} to {folder}; serve with --certs {folder}, "
              f"nodes join with --ca {folder / 'ca.pem'}" + (f" and --key node-I.key (serve --node-keys {folder})"
                                                            if nodes else ""))
