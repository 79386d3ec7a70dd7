"""ggfwd serve / join on real Flower processes (flower-superlink, flower-supernode) on 127.0.0.1, with a tiny
model scored by llama.cpp: the result equals the in-process federation bitwise; a node killed mid-round does not
stall the round past its deadline; a restarted server resumes from its checkpoint; with TLS and node
authentication an unregistered node is refused.

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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model and task, and the training rows split into 3 IID client files exactly as the in-process
    federation splits them."""
    root = tmp_path_factory.mktemp("flower")
    paths = make_tiny(root, n_train=96, n_eval=32)
    rows = Path(paths["train"]).read_text().splitlines()
    parts = partition("iid", None, len(rows), 3, seed=3)
    paths["clients"] = []
    for i, part in enumerate(parts):
        path = root / f"client{i}.jsonl"
        path.write_text("".join(rows[j] + "\n" for j in part))
        paths["clients"].append(path)
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


def serve_args(tiny, out, port, rounds, *extra):
    return ["serve", "--model", tiny["model"], "--data-eval", tiny["eval"], "--task", tiny["task"], "--rounds", rounds,
            "--clients", 3, "--host", "127.0.0.1", "--port", port, "--threads", 1, "--eval-every", 0,
            "--out", out, "--wait", 120, *SETTINGS, *extra]


def join(cluster, tiny, i, port, state, *extra, client_id=True):
    return cluster.start(f"node{i}", "join", "--server", f"127.0.0.1:{port}", "--data", tiny["clients"][i],
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


def in_process(tiny, out: Path, rounds: int):
    """The in-process federation with the same seeds, clients and data (3 clients, IID, 2 per round)."""
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
    fed = FedConfig(clients=3, clients_per_round=2, partition="iid", max_lag=10)
    profiles = [load_profile("always", dirs=[tiny["profiles"]])] * 3
    with SessionSettings(max_tokens=64, threads=1).open(inputs.model) as session:
        train, evaluation, adapter = inputs.load(session, cfg.seed)
        out.mkdir()
        run = Federation(session, adapter, train, cfg, out, eval_data=evaluation, inputs=inputs, fed=fed,
                         profiles=profiles, model_stats=ModelStats.from_gguf(inputs.model))
        run.run()
        return run.theta.copy(), adapter.params.copy(), run.run_dir.read_metrics()


# ----------------------------------------------------------------------------- the key test
@pytest.mark.slow
def test_three_supernodes_reach_the_in_process_adapter_bitwise(tiny, tmp_path, cluster):
    rounds = 4
    port = cluster.port()
    out = tmp_path / "served"
    serve = cluster.start("serve", *serve_args(tiny, out, port, rounds, "--clients-per-round", 2, "--min-nodes", 3,
                                               "--deadline", 120, "--insecure"))
    for i in range(3):
        join(cluster, tiny, i, port, tmp_path, "--insecure")
    started = time.monotonic()
    assert wait_for(serve, 400, "ggfwd serve", cluster, "serve") == 0, cluster.log("serve")[-3000:]
    served_seconds = time.monotonic() - started
    theta, initial, reference = in_process(tiny, tmp_path / "inproc", rounds)
    served = LoraAdapter.load(out / "adapter.gguf").params
    assert np.array_equal(served, theta), "the Flower federation's adapter differs from the in-process one"
    got = [r for r in metrics(out) if r["step"] > 0]
    want = [r for r in reference if r["step"] > 0]
    for a, b in zip(got, want):
        assert (a["selected"], a["accepted"], a["scalars"]) == (b["selected"], b["accepted"], b["scalars"])
        assert a["bytes_up"] == b["bytes_up"]  # the same report records crossed
        assert set(a["wire_up"]) == {str(c) for c in a["accepted"]} and min(a["wire_up"].values()) > 0
    assert len(got) == rounds and not np.array_equal(served, initial)
    print(f"served {rounds} rounds in {served_seconds:.0f} s")


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
    join(cluster, tiny, 0, port, tmp_path, *tls, "--key", certs / "node-0.key")
    join(cluster, tiny, 1, port, tmp_path, *tls, "--key", certs / "node-1.key")
    assert wait_for(serve, 400, "ggfwd serve", cluster, "serve") == 0, cluster.log("serve")[-3000:]
    rounds = [r for r in metrics(out) if r["step"] > 0]
    assert all(r["nodes"] == 1 and r["accepted"] == [0] for r in rounds), rounds
    assert (out / "server.log").read_text().count("joined as client") == 1
    link = (out / "flower" / "superlink.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in link  # node 1 was refused by the SuperLink
    assert "Uvicorn running on https://" in link  # TLS


# ----------------------------------------------------------------------------- the command lines
@pytest.mark.parametrize("args, fragment", [
    (["serve", "--rounds", "2"], "--certs DIR"),
    (["serve", "--insecure", "--node-keys", "."], "needs TLS"),
    (["serve", "--insecure", "--clients", "2", "--clients-per-round", "3"], "--clients-per-round"),
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
    from ggfwd.federation.remote import parse_hello, run_settings
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
    for bad in (b"x" * 2000, b"[]", b'{"client": 1}', json.dumps({"client": True, "version": 0, "profile": "",
                                                                  "examples": 1}).encode()):
        with pytest.raises(MessageError):
            parse_hello(bad)
