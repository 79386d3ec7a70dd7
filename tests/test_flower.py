"""ggfwd serve / join on real Flower processes (flower-superlink, flower-supernode, their SuperExecs and the
node workers) on 127.0.0.1, with a tiny model scored by llama.cpp: 8 SuperNodes reach the in-process
federation's adapter bitwise; a node killed mid-round does not stall the round past its deadline; a node worker
killed mid-round is restarted and the node trains again; a restarted server resumes from its checkpoint; with TLS
and node authentication an unregistered node is refused; the README's LAN commands run as written from a fresh
folder; the Control API refuses a connection that comes from the network; the worker refuses a frame with a
wrong node secret or over its size bound.

Every process a test starts is stopped by its pid at the end, pass or fail (with Flower's own children, some of
which it starts in sessions of their own: they are found by the ports of the test). Needs flwr (Python >= 3.11):
skipped where it is not installed (the main venv); CI runs it in the no-torch venv (.ci/termux.sh).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
psutil = pytest.importorskip("psutil")

from clirun import COMMAND, TESTS, run_cli  # noqa: E402
from ggfwd.adapter import LoraAdapter  # noqa: E402
from ggfwd.federation.partition import partition  # noqa: E402
from tinytask import make_tiny  # noqa: E402

PROFILE = """name = "always"
description = "test device, always online"
kind = "laptop"
os = "linux"
backend = "cpu"
threads = 1
source = "written by the test"
[memory]
total_mib = 4096
budget_mib = 2048
source = "test"
[speed]
overhead_s = 0.01
source = "test"
[speed.gflops]
default = 50.0
[network]
up_mbps = 10
down_mbps = 40
latency_ms = 50
source = "test"
[availability]
online = 1.0
source = "test"
"""
SETTINGS = ["--batch-size", "8", "--max-tokens", "64", "--rank", "4", "--lr", "0.02", "--eps", "0.1",
            "--optimizer", "adam", "--clip", "5", "--seed", "3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_files(paths: dict, n: int, folder: Path) -> list[Path]:
    """The training rows split into n IID client files exactly as the in-process federation splits them."""
    rows = Path(paths["train"]).read_text().splitlines()
    files = []
    for i, part in enumerate(partition("iid", None, len(rows), n, seed=3)):
        path = folder / f"client{i}-of-{n}.jsonl"
        path.write_text("".join(rows[j] + "\n" for j in part))
        files.append(path)
    return files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model and task, and the training rows split into 3 IID client files."""
    root = tmp_path_factory.mktemp("flower")
    paths = make_tiny(root, n_train=96, n_eval=32)
    paths["clients"] = client_files(paths, 3, root)
    (root / "profiles").mkdir()
    (root / "profiles" / "always.toml").write_text(PROFILE)
    paths["profiles"] = root / "profiles"
    return paths


class Cluster:
    """Processes of one test. `stop()` ends every one by pid: the started processes, their descendants, and
    processes whose command line names one of the test's ports (Flower detaches some of its children)."""

    def __init__(self, folder: Path):
        self.folder, self.procs, self.ports = folder, {}, set()

    def port(self) -> int:
        p = free_port()
        self.ports.add(p)
        return p

    def start(self, name: str, *args) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")
        proc = subprocess.Popen([*COMMAND, *map(str, args)], cwd=TESTS, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def pids(self, roots) -> set[int]:
        found = set()
        for proc in roots:
            try:
                p = psutil.Process(proc.pid)
                found |= {p.pid} | {c.pid for c in p.children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
        return found

    def kill(self, name: str) -> None:
        """Kill one started process and everything below it, now (SIGKILL: no goodbye to the SuperLink)."""
        for pid in self.pids([self.procs[name]]):
            _kill(pid)
        self.procs[name].wait(30)

    def stop(self) -> None:
        pids = self.pids(self.procs.values())
        ports = tuple(str(p) for p in self.ports)
        for q in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(q.info["cmdline"] or [])
            if q.pid != os.getpid() and ports and any(f":{p}" in cmd or f" {p}" in cmd for p in ports):
                pids.add(q.pid)
        for pid in pids:
            _kill(pid)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.stop()


def serve_args(tiny, out, port, rounds, *extra, clients=3):
    return ["serve", "--model", tiny["model"], "--data-eval", tiny["eval"], "--task", tiny["task"], "--rounds", rounds,
            "--clients", clients, "--host", "127.0.0.1", "--port", port, "--threads", 1, "--eval-every", 0,
            "--out", out, "--wait", 120, *SETTINGS, *extra]


def join(cluster, tiny, i, port, state, *extra, client_id=True, data=None):
    return cluster.start(f"node{i}", "join", "--server", f"127.0.0.1:{port}", "--data", (data or tiny["clients"])[i],
                         "--profile", "laptop-x86", "--model", tiny["model"], "--task", tiny["task"], "--threads", 1,
                         "--local-port", cluster.port(), "--state", state / f"node{i}",
                         *(["--client-id", i] if client_id else []), *extra)


def wait_for(proc: subprocess.Popen, seconds: float, what: str, cluster: Cluster, name: str) -> int:
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish in {seconds} s:\n{cluster.log(name)[-3000:]}")


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def wait_round(out: Path, step: int, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if any(r.get("step") == step for r in metrics(out)):
            return
        time.sleep(0.2)
    pytest.fail(f"round {step} was not committed within {seconds} s")


def in_process(tiny, out: Path, rounds: int, clients: int = 3, per_round: int = 2):
    """The in-process federation with the same seeds, clients and data (IID)."""
    from ggfwd.federation.simulate import FedConfig, Federation
    from ggfwd.inputs import RunInputs
    from ggfwd.modelstats import ModelStats
    from ggfwd.profiles import load_profile
    from ggfwd.session import SessionSettings
    from ggfwd.trainer import TrainConfig

    cfg = TrainConfig(steps=rounds, batch_size=8, lr=0.02, eps=0.1, optimizer="adam", clip=5.0, seed=3,
                      eval_every=0)
    inputs = RunInputs(model=str(tiny["model"]), data=str(tiny["train"]), eval_data=str(tiny["eval"]),
                       task=str(tiny["task"]), rank=4, max_tokens=64)
    fed = FedConfig(clients=clients, clients_per_round=per_round, partition="iid", max_lag=10)
    profiles = [load_profile("always", dirs=[tiny["profiles"]])] * clients
    with SessionSettings(max_tokens=64, threads=1).open(inputs.model) as session:
        train, evaluation, adapter = inputs.load(session, cfg.seed)
        out.mkdir()
        run = Federation(session, adapter, train, cfg, out, eval_data=evaluation, inputs=inputs, fed=fed,
                         profiles=profiles, model_stats=ModelStats.from_gguf(inputs.model))
        run.run()
        return run.theta.copy(), adapter.params.copy(), run.run_dir.read_metrics()


# ----------------------------------------------------------------------------- the key test
@pytest.mark.slow
def test_eight_supernodes_reach_the_in_process_adapter_bitwise(tiny, tmp_path, cluster):
    rounds, n, per_round = 4, 8, 4
    data = client_files(tiny, n, tmp_path)
    port = cluster.port()
    out = tmp_path / "served"
    serve = cluster.start("serve", *serve_args(tiny, out, port, rounds, "--clients-per-round", per_round,
                                               "--min-nodes", n, "--deadline", 120, "--insecure", clients=n))
    for i in range(n):
        join(cluster, tiny, i, port, tmp_path, "--insecure", data=data)
    started = time.monotonic()
    assert wait_for(serve, 600, "ggfwd serve", cluster, "serve") == 0, cluster.log("serve")[-3000:]
    served_seconds = time.monotonic() - started
    theta, initial, reference = in_process(tiny, tmp_path / "inproc", rounds, n, per_round)
    served = LoraAdapter.load(out / "adapter.gguf").params
    assert np.array_equal(served, theta), "the Flower federation's adapter differs from the in-process one"
    got = [r for r in metrics(out) if r["step"] > 0]
    want = [r for r in reference if r["step"] > 0]
    for a, b in zip(got, want):
        assert (a["selected"], a["accepted"], a["scalars"]) == (b["selected"], b["accepted"], b["scalars"])
        assert a["bytes_up"] == b["bytes_up"]  # the same report records crossed
        assert set(a["wire_up"]) == {str(c) for c in a["accepted"]} and min(a["wire_up"].values()) > 0
    assert len(got) == rounds and not np.array_equal(served, initial)
    assert all(r["nodes"] == n for r in got)
    print(f"served {rounds} rounds with {n} nodes in {served_seconds:.0f} s")


@pytest.mark.slow
def test_asynchronous_updates_over_flower_keep_every_replica_equal(tiny, tmp_path, cluster):
    """`--mode async`: 3 nodes work back to back, an update per 2 reports, so the third node's report arrives on
    an older version and counts with its age (and stays in the client memory). Arrival order is the machines' own,
    so no in-process reference exists; what must hold is that a replay of the run's history from the start
    reaches the served adapter and the server's memory bitwise, and each node's kept replica equals the replay at
    the version it holds."""
    from ggfwd.federation.client import Client
    from ggfwd.federation.history import History
    from ggfwd.federation.messages import decode
    from ggfwd.inputs import RunInputs
    from ggfwd.session import SessionSettings
    from ggfwd.trainer import TrainConfig

    rounds, staleness = 6, 4
    port = cluster.port()
    out = tmp_path / "async"
    serve = cluster.start("serve", *serve_args(tiny, out, port, rounds, "--clients-per-round", 2, "--min-nodes", 3,
                                               "--deadline", 120, "--mode", "async", "--max-staleness", staleness,
                                               "--insecure"))
    for i in range(3):
        join(cluster, tiny, i, port, tmp_path, "--insecure")
    assert wait_for(serve, 600, "ggfwd serve", cluster, "serve") == 0, cluster.log("serve")[-3000:]
    got = [r for r in metrics(out) if r["step"] > 0]
    assert len(got) == rounds and all(len(r["accepted"]) == 2 for r in got)
    ages = [a["age"] for r in got for a in r["arrivals"].values()]
    assert 1 <= max(ages) <= staleness, ages  # the node left out of update 0 reports on version 0 later
    assert any(len(r["update_shares"]) == 3 for r in got)  # the memory keeps a node that did not report
    assert all(age <= staleness for r in got for _, age in r["update_shares"].values())

    cfg = TrainConfig(steps=rounds, batch_size=8, lr=0.02, eps=0.1, optimizer="adam", clip=5.0, seed=3)
    inputs = RunInputs(model=str(tiny["model"]), data=str(tiny["train"]), task=str(tiny["task"]), rank=4,
                       max_tokens=64)
    kept_history = History(out)
    kept_history.load(rounds)
    history = [decode(m) for m in kept_history.since(0)]
    assert len(history) == rounds
    with SessionSettings(max_tokens=64, threads=1).open(inputs.model) as session:
        train, _, adapter = inputs.load(session, cfg.seed)
        perturbations = cfg.perturbations(adapter)
        rule = replace(cfg.update_rule(), max_staleness=staleness)
        replay = Client(99, train, cfg.estimator(session, perturbations), cfg.seed, rule, cfg.clip,
                        start=adapter.params)
        kept = {}
        for i in range(3):
            with np.load(tmp_path / f"node{i}" / "replica.npz", allow_pickle=False) as z:
                kept[i] = {k: z[k] for k in z.files if k not in ("run", "client")}
        for version in range(rounds + 1):
            for i, arrays in kept.items():
                if int(arrays["version"]) == version:
                    state = replay.replica.state_dict()
                    assert set(state) == set(arrays) and all(np.array_equal(state[k], arrays[k]) for k in arrays), i
            if version < rounds:
                replay.sync([history[version]])
    assert np.array_equal(replay.replica.theta, LoraAdapter.load(out / "adapter.gguf").params)
    with np.load(sorted((out / "checkpoint").glob("state-*.npz"))[-1], allow_pickle=False) as z:
        server = {k: z[k] for k in z.files if k.startswith("memory.")}
    state = replay.replica.state_dict()
    assert server and all(np.array_equal(state[k], v) for k, v in server.items())


# ----------------------------------------------------------------------------- faults
@pytest.mark.slow
def test_a_node_killed_mid_round_and_a_server_restart(tiny, tmp_path, cluster):
    port = cluster.port()
    out = tmp_path / "run"
    deadline = 25
    common = ("--clients-per-round", 3, "--min-nodes", 3, "--deadline", deadline, "--insecure")
    serve = cluster.start("serve", *serve_args(tiny, out, port, 3, *common))
    for i in range(3):
        join(cluster, tiny, i, port, tmp_path, "--insecure")
    wait_round(out, 1, 300)
    cluster.kill("node2")  # round 2 is under way: every node was instructed at its start
    assert wait_for(serve, 400, "ggfwd serve", cluster, "serve") == 0, cluster.log("serve")[-3000:]
    rounds = {r["step"]: r for r in metrics(out)}
    hit = [r for r in rounds.values() if 2 in r.get("lost", [])]
    assert hit, [(r["step"], r.get("accepted"), r.get("lost")) for r in rounds.values()]
    assert all(r["round_seconds"] <= deadline + 15 for r in hit)  # closed at its deadline, not stalled
    assert all(set(r["accepted"]) == {0, 1} for r in hit)  # the others' reports were applied
    assert rounds[3]["step"] == 3

    # restart the server (killed while it waits for round 4's reports) on the same port: it resumes
    serve = cluster.start("serve2", *serve_args(tiny, out, port, 6, *common[:2], "--min-nodes", 2, "--deadline",
                                                deadline, "--insecure", "--resume"))
    wait_round(out, 4, 300)
    cluster.kill("serve2")
    state = json.loads((out / "state.json").read_text())
    assert state["step"] >= 4
    before = state["step"]
    serve = cluster.start("serve3", *serve_args(tiny, out, port, 6, *common[:2], "--min-nodes", 2, "--deadline",
                                                deadline, "--insecure", "--resume"))
    assert wait_for(serve, 400, "the restarted ggfwd serve", cluster, "serve3") == 0, cluster.log("serve3")[-3000:]
    steps = [r["step"] for r in metrics(out)]
    assert steps == list(range(7)), steps  # rounds after the commit point were dropped and redone once
    log = (out / "server.log").read_text()
    assert f"resuming at round {before}" in log
    assert json.loads((out / "state.json").read_text())["step"] == 6


@pytest.mark.slow
def test_tls_and_node_authentication_refuse_an_unregistered_node(tiny, tmp_path, cluster):
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    r = run_cli("certs", certs, "--nodes", 2)
    assert r.returncode == 0, r.stderr
    keys.mkdir()
    (keys / "node-0.pub").write_bytes((certs / "node-0.pub").read_bytes())  # node 1 stays unregistered
    port = cluster.port()
    out = tmp_path / "run"
    serve = cluster.start("serve", *serve_args(tiny, out, port, 2, "--clients-per-round", 1, "--min-nodes", 1,
                                               "--deadline", 120, "--certs", certs, "--node-keys", keys))
    tls = ("--ca", certs / "ca.pem")
    link_log = out / "flower" / "superlink.log"
    join(cluster, tiny, 1, port, tmp_path, *tls, "--key", certs / "node-1.key")
    end = time.monotonic() + 180  # the unregistered node first: the run cannot end before it was refused
    while "No SuperNode found with the given public key" not in \
            (link_log.read_text(errors="replace") if link_log.exists() else ""):
        assert time.monotonic() < end and serve.poll() is None, cluster.log("serve")[-3000:]
        time.sleep(0.5)
    join(cluster, tiny, 0, port, tmp_path, *tls, "--key", certs / "node-0.key")
    assert wait_for(serve, 400, "ggfwd serve", cluster, "serve") == 0, cluster.log("serve")[-3000:]
    rounds = [r for r in metrics(out) if r["step"] > 0]
    assert all(r["nodes"] == 1 and r["accepted"] == [0] for r in rounds), rounds
    assert (out / "server.log").read_text().count("joined as client") == 1
    link = link_log.read_text(errors="replace")
    assert "No SuperNode found with the given public key" in link  # node 1 was refused by the SuperLink
    assert "Fleet API only on https://" in link  # TLS


def worker_of(state: Path) -> tuple[int, int]:
    """(pid, port) of a node's worker, from its worker.json (waits for it)."""
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            d = json.loads((state / "worker.json").read_text())
            return d["pid"], d["port"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.1)
    pytest.fail(f"no worker.json in {state}")


@pytest.mark.slow
def test_a_node_worker_killed_mid_round_is_restarted_and_trains_again(tiny, tmp_path, cluster):
    """The worker of node 2 is frozen, a round's message reaches it (its ClientApp connects and waits), then it
    is killed: the round closes without client 2 and well within its deadline, `join` starts a new worker, and
    client 2 trains again in a later round from the replica its node folder kept."""
    port = cluster.port()
    out = tmp_path / "run"
    deadline = 60
    serve = cluster.start("serve", *serve_args(tiny, out, port, 4, "--clients-per-round", 3, "--min-nodes", 3,
                                               "--deadline", deadline, "--insecure"))
    for i in range(3):
        join(cluster, tiny, i, port, tmp_path, "--insecure")
    wait_round(out, 1, 300)
    pid, wport = worker_of(tmp_path / "node2")
    assert pid in cluster.pids([cluster.procs["node2"]])  # a child of ggfwd join
    os.kill(pid, signal.SIGSTOP)
    end = time.monotonic() + 120
    while time.monotonic() < end:  # the next round's ClientApp has connected to the frozen worker
        if any(c.raddr and c.raddr.port == wport and c.status == psutil.CONN_ESTABLISHED
               for c in psutil.net_connections("tcp")):
            break
        time.sleep(0.05)
    else:
        pytest.fail("no ClientApp connected to the frozen worker")
    os.kill(pid, signal.SIGKILL)
    assert wait_for(serve, 400, "ggfwd serve", cluster, "serve") == 0, cluster.log("serve")[-3000:]
    new_pid, _ = worker_of(tmp_path / "node2")
    assert new_pid != pid and "restarting it" in cluster.log("node2")
    rounds = [r for r in metrics(out) if r["step"] > 0]
    hit = [r for r in rounds if 2 not in r["accepted"]]
    assert len(hit) == 1 and hit[0]["step"] >= 2, [(r["step"], r["accepted"]) for r in rounds]
    assert "2" in hit[0].get("refused", {}) or 2 in hit[0].get("lost", [])
    assert hit[0]["round_seconds"] < deadline  # closed as soon as the node said its worker was gone
    assert any(2 in r["accepted"] for r in rounds if r["step"] > hit[0]["step"]), "client 2 did not train again"
    assert len(rounds) == 4


@pytest.mark.slow
def test_the_readme_lan_commands_run_as_written_and_the_control_api_stays_off_the_network(tiny, tmp_path, cluster):
    """README.md's 'Federate across machines' commands, run from a fresh folder with relative paths: `ggfwd
    certs` verbatim; `ggfwd serve` verbatim plus the tiny model, task and evaluation rows in place of the demo
    model's defaults, and a free port for 9092; on each node, in a folder holding what the README says to copy
    (ca.pem, node-I.key, the GGUF under the README's file name) and its data as my.jsonl, `ggfwd join` verbatim
    with 127.0.0.1:PORT for 192.168.1.20:9092, plus --local-port (3 nodes on one host) and --threads 1. While it
    runs, the Control API answers 403 to a connection from this machine's network address, and listens on
    loopback only."""
    import re
    import shutil
    import ssl
    import urllib.error
    import urllib.request

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    commands = re.findall(r"^(ggfwd (?:certs|serve|join) .*?)(?:\s+#.*)?$", readme.replace("\\\n", " "), re.M)
    certs, serve_line, join_line = (next(c for c in commands if c.startswith(f"ggfwd {k}"))
                                    for k in ("certs", "serve", "join"))
    assert "--host 192.168.1.20" in certs and "--server 192.168.1.20:9092" in join_line and "--port 9092" in serve_line
    words = lambda line: " ".join(line.split()).split()[1:]  # noqa: E731
    lan = tmp_path / "lan"
    lan.mkdir()
    for name in ("model", "task", "eval"):
        shutil.copy(tiny[name], lan / Path(tiny[name]).name)
    port = cluster.port()
    r = subprocess.run([*COMMAND, *words(certs)], cwd=lan, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr

    def start(name, args, cwd):
        log = open(cluster.folder / f"{name}.log", "wb")
        cluster.procs[name] = subprocess.Popen([*COMMAND, *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True)
        log.close()
        return cluster.procs[name]

    serve_words = [str(port) if w == "9092" else w for w in words(serve_line)]
    serve = start("serve", [*serve_words, "--model", Path(tiny["model"]).name, "--task", Path(tiny["task"]).name,
                            "--data-eval", Path(tiny["eval"]).name, "--threads", "1"], lan)
    gguf = next(w for w in words(join_line) if w.endswith(".gguf"))
    for i in range(3):
        node = tmp_path / f"device{i}"
        node.mkdir()
        shutil.copy(lan / "certs" / "ca.pem", node / "ca.pem")
        shutil.copy(lan / "certs" / f"node-{i}.key", node / f"node-{i}.key")
        shutil.copy(tiny["model"], node / gguf)
        shutil.copy(tiny["clients"][i], node / "my.jsonl")
        args = [w.replace("192.168.1.20:9092", f"127.0.0.1:{port}").replace("node-0.key", f"node-{i}.key")
                for w in words(join_line)]
        start(f"node{i}", [*args, "--local-port", str(cluster.port()), "--threads", "1"], node)
    out = lan / "runs" / "lan"
    wait_round(out, 1, 300)

    # the Control API: refused from the network, served on loopback only
    here = next(a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                if a.family == socket.AF_INET and not a.address.startswith("127."))
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE  # only the answer matters here
    request = urllib.request.Request(f"https://{here}:{port}/v1/control/list-runs", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, context=insecure, timeout=30)
    assert refused.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as fleet:  # the Fleet API is served there (an empty call is bad)
        urllib.request.urlopen(urllib.request.Request(f"https://{here}:{port}/v1/fleet/pull-messages", data=b"",
                                                      method="POST"), context=insecure, timeout=30)
    assert fleet.value.code != 403
    link = next(q for q in psutil.Process(serve.pid).children(recursive=True)
                if "superlink" in " ".join(q.cmdline()))
    listening = {(c.laddr.ip, c.laddr.port) for c in link.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert ("0.0.0.0", port) in listening and len(listening) == 2, listening
    control = next(a for a in listening if a[1] != port)
    assert control[0] == "127.0.0.1"
    assert str(control[1]) in (out / "flower" / "config.toml").read_text()  # where flwr run submitted the run

    assert wait_for(serve, 900, "ggfwd serve", cluster, "serve") == 0, cluster.log("serve")[-3000:]
    rounds = [r for r in metrics(out) if r["step"] > 0]
    assert len(rounds) == 30 and all(r["nodes"] == 3 and len(r["accepted"]) == 3 for r in rounds)
    assert (out / "adapter.gguf").is_file()


def test_the_node_worker_refuses_a_wrong_secret_and_an_oversized_frame(tiny, tmp_path):
    """A real worker process on the tiny model: a right message is answered; a frame with a wrong node secret
    and a frame over the size bound are refused (connection closed, nothing answered, nothing changed)."""
    import struct

    from ggfwd.federation import worker as w
    from ggfwd.federation.handshake import parse_hello, run_settings
    from ggfwd.federation.messages import Broadcast, Instruction, Report, decode, encode
    from ggfwd.federation.node import NodeSettings
    from ggfwd.inputs import RunInputs
    from ggfwd.trainer import TrainConfig

    folder = tmp_path / "node"
    NodeSettings(str(tiny["model"]), str(tiny["clients"][0]), "pi5", 0, 1).write(folder)
    w.new_secret(folder)
    proc = w.start_worker(folder)
    try:
        run = run_settings(TrainConfig(steps=3, batch_size=8, lr=0.02, seed=3),
                           RunInputs(model=str(tiny["model"]), data=None, task=str(tiny["task"]), rank=4,
                                     max_tokens=64))
        kind, _, data = w.call(folder, "hello", run, [])
        assert kind == "hello" and parse_hello(data[0])["version"] == -1
        kind, _, data = w.call(folder, "train", run, [encode(Instruction(0, 0, 0, 1, 8, 0.1, 60.0))])
        assert kind == "report" and decode(data[0], Report).round == 0
        replica = (folder / "replica.npz").read_bytes()
        _, port = worker_of(folder)
        # what the refused frames carry would move the replica to version 1 if it were handled
        step = [encode(Broadcast.of(0, [(0, np.ones(1, np.float32))])), encode(Instruction(1, 1, 0, 1, 8, 0.1, 60.0))]

        def refused(frame_of) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                nonce = w._recv(sock, w.NONCE)
                try:
                    sock.sendall(frame_of(nonce))
                    return sock.recv(1024)
                except ConnectionError:
                    return b""

        body = w.pack("train", run, step)
        assert refused(lambda nonce: w._HEAD.pack(w.MAGIC, len(body)) + w._mac(b"x" * 32, nonce, b"q", body) + body) \
            == b""  # a wrong node secret
        assert refused(lambda nonce: struct.pack("<4sQ", w.MAGIC, w.MAX_REQUEST + 1)) == b""  # over the bound
        assert (folder / "replica.npz").read_bytes() == replica  # nothing changed
        kind, _, data = w.call(folder, "hello", run, [])
        assert parse_hello(data[0])["version"] == 0 and proc.poll() is None  # the replica it held
        kind, _, _ = w.call(folder, "train", run, step)  # the same records, sent with the secret, are applied
        assert kind == "report" and parse_hello(w.call(folder, "hello", run, [])[2][0])["version"] == 1
        log = (folder / "worker.log").read_text()
        assert "wrong node secret" in log and f"{w.MAX_REQUEST + 1} bytes, over the" in log
    finally:
        proc.kill()
        proc.wait(30)


# ----------------------------------------------------------------------------- the command lines
@pytest.mark.parametrize("args, fragment", [
    (["serve", "--rounds", "2"], "--certs DIR"),
    (["serve", "--insecure", "--node-keys", "."], "needs TLS"),
    (["serve", "--insecure", "--clients", "2", "--clients-per-round", "3"], "--clients-per-round"),
    (["serve", "--insecure", "--mode", "later"], "--mode"),
    (["serve", "--insecure", "--mode", "async"], "--max-staleness"),
    (["join", "--server", "nohost", "--data", "x", "--profile", "pi5", "--insecure"], "HOST:PORT"),
    (["join", "--server", "127.0.0.1:1", "--data", "x", "--profile", "pi5"], "--ca"),
    (["join", "--server", "127.0.0.1:1", "--data", "missing.jsonl", "--profile", "nosuch", "--insecure"], "nosuch"),
    (["join", "--server", "127.0.0.1:1", "--data", "x", "--profile", "pi5", "--insecure", "--memory", "huge"],
     "--memory must be one of standard, lean"),
])
def test_bad_serve_and_join_options_are_one_line_errors(tmp_path, args, fragment):
    r = run_cli(*args, "--out" if args[0] == "serve" else "--state", tmp_path / "x")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and fragment in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_certs_make_a_ca_a_server_certificate_and_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    r = run_cli("certs", tmp_path / "c", "--host", "192.168.1.20", "--host", "laptop.local", "--nodes", 1)
    assert r.returncode == 0, r.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "c" / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "c" / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "laptop.local"} <= set(names.get_values_for_type(x509.DNSName))
    assert {str(a) for a in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "192.168.1.20"}
    key = load_ssh_private_key((tmp_path / "c" / "node-0.key").read_bytes(), None)
    pub = load_ssh_public_key((tmp_path / "c" / "node-0.pub").read_bytes())
    assert key.public_key().public_numbers() == pub.public_numbers()
    for name in ("ca.key", "server.key", "node-0.key"):
        assert (tmp_path / "c" / name).stat().st_mode & 0o077 == 0
    r = run_cli("certs", tmp_path / "c")
    assert r.returncode == 2 and "already holds a CA" in r.stderr


# ----------------------------------------------------------------------------- the benchmark
@pytest.mark.slow
def test_bench_flower_smoke(tmp_path):
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_flower.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--work", str(tmp_path / "w"), "--json",
                           str(tmp_path / "r.json")], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    s = json.loads((tmp_path / "r.json").read_text())
    assert s["bitwise_equal"] and s["rounds"] == 3
    assert 100 < s["up_record"] < s["up_wire"] < 4096  # a report, and the Flower message around it
    # nodes join by replaying the broadcasts they missed (nothing in round 0): no snapshot travels
    assert s["joins"] >= 2 and s["join_records"] < 3 * 1024 and s["snapshot_records"] is None
    assert s["join_wire"] < 4 * 4096
    assert s["flower_round_s"] > 0 and s["in_process_round_s"] > 0
    assert "adapters bitwise equal: yes" in proc.stdout and "| up: report |" in proc.stdout


# ----------------------------------------------------------------------------- the node, without Flower
def test_a_node_asks_for_the_adapter_when_it_cannot_reach_the_version(tiny, tmp_path):
    """node.Node handles what the ClientApp hands it: no replica and no snapshot -> 'need'; a snapshot ->
    a report, and the replica is kept for the next message; a broadcast it already applied is skipped."""
    from ggfwd.federation.client import snapshot_of
    from ggfwd.federation.messages import Broadcast, Instruction, MessageError, Report, decode, encode
    from ggfwd.federation.node import Node, NodeSettings
    from ggfwd.federation.handshake import parse_hello, run_settings
    from ggfwd.inputs import RunInputs
    from ggfwd.perturbation import Perturbations
    from ggfwd.session import SessionSettings
    from ggfwd.trainer import TrainConfig
    from ggfwd.update import Replica

    cfg = TrainConfig(steps=3, batch_size=8, lr=0.02, seed=3)
    inputs = RunInputs(model=str(tiny["model"]), data=None, task=str(tiny["task"]), rank=4, max_tokens=64)
    run = run_settings(cfg, inputs)
    path = NodeSettings(str(tiny["model"]), str(tiny["clients"][1]), "pi5", None, 1).write(tmp_path / "node")
    node = Node(path)
    hello = parse_hello(node.hello(run))
    assert hello == {"client": -1, "version": -1, "profile": "pi5", "examples": 32}
    with SessionSettings(max_tokens=64, threads=1).open(inputs.model) as session:
        from ggfwd.adapter import LoraAdapter

        adapter = LoraAdapter.create(session.base, inputs.target_list, rank=4, alpha=16.0, seed=3)
        perturbations = Perturbations(adapter, 3)
        replica = Replica(adapter.params, perturbations.index, cfg.update_rule(), version=2)
    instruction = encode(Instruction(2, 2, 1, 1, 8, 0.1, 60.0))
    assert node.train(run, [instruction]) == ("need", [])
    kind, data = node.train(run, [encode(snapshot_of(replica)), instruction])
    report = decode(data[0], Report)
    assert kind == "report" and report.client == 1 and report.round == 2 and report.scalars.size == 1
    assert parse_hello(node.hello(run))["version"] == 2 and parse_hello(node.hello(run))["client"] == 1
    stale = encode(Broadcast.of(1, [(0, np.ones(1, np.float32))]))  # round 1: already in the snapshot it holds
    assert node.train(run, [stale, instruction])[0] == "report"
    with pytest.raises(MessageError):
        node.train(run, [instruction, instruction])
    node.close()
    for bad in (b"x" * 2000, b"[]", b'{"client": 1}', json.dumps({"client": True, "version": 0, "profile": "",
                                                                  "examples": 1}).encode()):
        with pytest.raises(MessageError):
            parse_hello(bad)
