"""The product benchmarks in scripts/, run as a user runs them: `python scripts/NAME.py --smoke` in a subprocess,
from a fresh working folder, with every cache and output folder pointing at a folder that does not exist yet.

Each test checks the figures the script prints (or writes), not only its exit code: numbers parse and are
sane, and wherever two engines see the same weights and tokens (llama.cpp and PyTorch on the tiny F32 model
of scripts/smoke_model.py) their losses must agree.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
TIMEOUT = 300
FLOAT = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of every run: the smoke model built once per module, a wide console, one thread."""
    e = dict(os.environ, GGFWD_SMOKE_DIR=str(tmp_path_factory.mktemp("smoke") / "model"), COLUMNS="200",
             PYTHONUNBUFFERED="1")
    for name in ("GGFWD_BENCH_DIR", "GGFWD_FIDELITY_DIR"):
        e.pop(name, None)
    return e


@pytest.fixture(scope="module")
def smoke_model(env, tmp_path_factory) -> Path:
    """scripts/smoke_model.py, run once: the tiny Llama every smoke mode but bench_convert's uses."""
    out = run("smoke_model.py", [], tmp_path_factory.mktemp("build"), env)
    gguf = Path(out.strip().splitlines()[-1])
    assert gguf.is_file() and gguf.parent.parent.name == "llama-f32", out
    return gguf


def run(script: str, args: list[str], cwd: Path, env: dict, **extra_env) -> str:
    """Run scripts/`script` with `args` from `cwd`; returns its stdout (exit code 0 asserted)."""
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *args], cwd=cwd, env={**env, **extra_env},
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, \
        f"{script} {args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def no_pickles(*folders: Path) -> None:
    found = [p for f in folders for p in f.rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".pickle", ".bin")]
    assert not found, f"pickle-format files written: {found}"


# --------------------------------------------------------------------------------------------------------------
def test_bench_convert_smoke(tmp_path, env):
    """A tiny checkpoint in several shards converts to q4_k_m; the figures describe the files really written."""
    import gguf

    work = tmp_path / "work"
    out = run("bench_convert.py", ["--smoke", "--keep", "--workdir", str(work), "--threads", "1"], tmp_path, env)
    d, ffn, layers, kv_dim, vocab = 256, 512, 2, 2 * 64, 1024
    expected = 2 * vocab * d + d + layers * (2 * d + 2 * d * d + 2 * kv_dim * d + 3 * d * ffn)
    params = int(re.search(r"^params\s+[\d.]+ B \((\d+)\)", out, re.M).group(1))
    assert params == expected
    shards = sorted((work / "hf").glob("*.safetensors"))
    assert len(shards) >= 2  # --smoke writes 1 MB shards
    st_bytes = int(re.search(r"^safetensors .*BF16, (\d+) bytes", out, re.M).group(1))
    assert st_bytes == sum(p.stat().st_size for p in shards) > 2 * params
    model = work / "out" / "model.gguf"
    gguf_bytes = int(re.search(r"^output .*q4_k_m, (\d+) bytes", out, re.M).group(1))
    assert gguf_bytes == model.stat().st_size < st_bytes
    assert float(re.search(rf"^wall time\s+({FLOAT}) s", out, re.M).group(1)) > 0
    peak = float(re.search(rf"^peak RSS\s+({FLOAT}) MiB", out, re.M).group(1))
    ratio = float(re.search(rf"^peak RSS / input\s+({FLOAT})%", out, re.M).group(1))
    assert peak > 10 and ratio == pytest.approx(100 * peak * 2**20 / st_bytes, rel=0.02)
    reader = gguf.GGUFReader(model)
    assert len(reader.tensors) == 3 + 9 * layers
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q4_K for t in reader.tensors)
    assert (work / "out" / "adapter.gguf").is_file()


def test_bench_session_smoke(tmp_path, env, smoke_model):
    """Session scoring against a bare llama_decode loop, and the peak RSS of three child processes."""
    out = run("bench_session.py", ["--smoke", "--threads", "1"], tmp_path, env)
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│|┃]", line) if c.strip()]
        if len(cells) == 2 and re.fullmatch(FLOAT, cells[1]):
            rows[cells[0]] = float(cells[1])
    bare = rows["bare llama_decode loop, tokens/s"]
    session = rows["Session.score + new adapter values each eval, tokens/s"]
    ratio = rows["ratio session / bare (target >= 0.95)"]
    assert bare > 0 and session > 0 and ratio == pytest.approx(session / bare, rel=0.02, abs=0.002)
    load = rows["peak RSS, model loaded alone, no context (MiB)"]
    plain = rows["peak RSS, one plain evaluation (MiB)"]
    scoring = rows["peak RSS, scoring with adapter reloads (MiB)"]
    assert 0 < load <= 1.05 * plain and 0.8 < scoring / plain < 1.5  # MiB rounded to integers
    assert rows["ratio scoring / plain evaluation"] == pytest.approx(scoring / plain, abs=0.02)
    assert rows["ratio scoring / model loaded alone"] == pytest.approx(scoring / load, abs=0.02)
    m = re.search(r"4 examples per evaluation,\s+(\d+) tokens,\s+(\d+)\s+decode", out)
    assert m and int(m.group(1)) > 4 * 5 and int(m.group(2)) == 1


def test_fidelity_smoke(tmp_path, env):
    """Finite differences through llama.cpp against autograd on the tiny F32 model: they must agree."""
    fid = tmp_path / "fresh" / "fidelity"  # does not exist: the script creates it
    out = run("fidelity.py", ["--smoke", "--threads", "1", "--save", str(tmp_path / "d.npz")], tmp_path, env,
              GGFWD_FIDELITY_DIR=str(fid))
    m = re.search(rf"loss llama\.cpp ({FLOAT}) torch ({FLOAT})", out)
    assert m and float(m.group(1)) == pytest.approx(float(m.group(2)), abs=2e-3) and float(m.group(1)) > 0
    m = re.search(rf"eps=0\.03\s+r=({FLOAT}) sign=({FLOAT})% med_rel=({FLOAT}) nrmse=({FLOAT})", out)
    assert m, out
    r, sign, nrmse = float(m.group(1)), float(m.group(2)), float(m.group(4))
    assert r > 0.99 and sign >= 87.5 and nrmse < 0.15
    with np.load(tmp_path / "d.npz") as z:  # allow_pickle stays False
        exact = next(z[k] for k in z.files if k.endswith("exact"))
        est = next(z[k] for k in z.files if "eps=0.03" in k)
    assert len(exact) == len(est) == 8 and np.abs(exact).max() > 0
    assert np.corrcoef(est, exact)[0, 1] == pytest.approx(r, abs=1e-4)
    assert any(fid.glob("tiny*-f32.gguf"))
    no_pickles(fid)


@pytest.mark.slow
def test_bench_memory_smoke(tmp_path, env, smoke_model):
    """eval / train / PyTorch peak RSS; the PyTorch side goes through fidelity.py's reference cache, in folders
    that do not exist yet (a fresh machine). At B = 0 all three see the same loss on the same tokens."""
    bench, fid = tmp_path / "fresh" / "bench", tmp_path / "fresh" / "fidelity"
    out = run("bench_memory.py", ["--smoke", "--threads", "1"], tmp_path, env, GGFWD_BENCH_DIR=str(bench),
              GGFWD_FIDELITY_DIR=str(fid))
    modes = {}
    for m in re.finditer(rf"^(eval|train|torch)\s+peak RSS\s+(\d+) MiB \(during work\s+(\d+) MiB\), loss ({FLOAT}), "
                         rf"(\d+) tokens", out, re.M):
        modes[m.group(1)] = dict(peak=int(m.group(2)), work=int(m.group(3)), loss=float(m.group(4)),
                                 tokens=int(m.group(5)))
    assert set(modes) == {"eval", "train", "torch"}, out
    assert all(v["peak"] > 0 and v["work"] > 0 and math.isfinite(v["loss"]) for v in modes.values())
    assert modes["eval"]["tokens"] == modes["train"]["tokens"] == modes["torch"]["tokens"] > 4 * 5
    # eval is scored at B = 0, and the torch loss printed is its first step's, also at B = 0
    assert modes["eval"]["loss"] > 0.05 and modes["torch"]["loss"] == pytest.approx(modes["eval"]["loss"], abs=2e-3)
    ratios = dict(re.findall(rf"train step / eval pass, (whole-process peak|peak during the work): ({FLOAT})", out))
    assert 0.5 < float(ratios["whole-process peak"]) <= 1.10  # the product's target
    assert float(ratios["peak during the work"]) > 0
    torch_ratio = re.search(rf"torch backprop LoRA / ggfwd train step, whole-process peak: ({FLOAT})x", out)
    assert torch_ratio and float(torch_ratio.group(1)) > 0
    cached = list(fid.glob("hf-*/ggfwd-stamp.json"))
    assert len(cached) == 1 and any(cached[0].parent.glob("*.safetensors"))
    assert (cached[0].parent / "config.json").is_file()
    assert any(bench.glob("tokens-tiny-*.json"))
    no_pickles(fid, bench)


@pytest.mark.slow
def test_ceiling_smoke(tmp_path, env, smoke_model):
    """Two Adam steps with exact gradients in PyTorch; the adapter written as GGUF and scored by llama.cpp must
    give the loss PyTorch gave it."""
    out = run("ceiling.py", ["--smoke", "--threads", "1", "--out", "adapter.gguf"], tmp_path, env,
              GGFWD_FIDELITY_DIR=str(tmp_path / "fresh" / "fidelity"))
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    evals = [x for x in lines if "torch_accuracy" in x]
    assert [x["step"] for x in evals] == [0, 1, 2]
    assert all(0 <= x["torch_accuracy"] <= 1 and 0 < x["torch_loss"] < 10 for x in evals)
    assert evals[-1]["torch_loss"] != evals[0]["torch_loss"]  # the adapter moved
    final = lines[-1]
    assert final["llama_cpp_q4_k_m_loss"] == pytest.approx(evals[-1]["torch_loss"], abs=3e-3)
    assert abs(final["llama_cpp_q4_k_m_accuracy"] - evals[-1]["torch_accuracy"]) <= 1 / 8 + 1e-9
    assert final["peak_rss_mb"] > 0 and (tmp_path / "adapter.gguf").is_file()


@pytest.mark.slow
def test_bench_convergence_smoke(tmp_path, env, smoke_model):
    """ggfwd, naive and PyTorch engines, 2 steps each, through Trainer; same batches and directions, so ggfwd and
    PyTorch (same weights) follow the same path."""
    out_dir = tmp_path / "runs"
    out = run("bench_convergence.py", ["--smoke", "--threads", "1", "--out", str(out_dir)], tmp_path, env)
    results = {r["engine"]: r for r in json.loads((out_dir / "summary.json").read_text())}
    assert set(results) == {"ggfwd", "naive", "torch"}, out
    for r in results.values():
        assert r["forward_passes"] == 4 and r["tokens"] > 0 and r["peak_rss_mb"] > 0
        assert [p for p, _, _ in r["curve"]] == [0, 2, 4]
        assert all(0 <= acc <= 1 and 0 < loss < 10 for _, acc, loss in r["curve"])
    g, n, t = (results[k]["curve"] for k in ("ggfwd", "naive", "torch"))
    assert g[0] == n[0]  # the same fresh adapter through the same session
    for (_, _, lg), (_, _, lt) in zip(g, t):
        assert lg == pytest.approx(lt, abs=1e-3)
    assert g[-1][2] != g[0][2]  # trained
    assert "passes to 83%" in out and "peak RSS (MB)" in out
    assert not list(out_dir.glob("*.pkl")) and (out_dir / "tokens.json").is_file()
    report = run("bench_convergence.py", ["--report", str(out_dir)], tmp_path, env)  # the finished runs only
    assert re.search(r"ggfwd\W+naive\W+torch", report) and "passes to 88%" in report


@pytest.mark.slow
def test_bench_federation_smoke(env, smoke_model, tmp_path):
    out = run("bench_federation.py", ["--smoke", "--model", str(smoke_model), "--out", str(tmp_path / "runs"),
                                      "--json", str(tmp_path / "r.json")], tmp_path, env)
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| evaluation")]
    assert len(rows) == 3, out  # evaluations at 0, 2 and 4 rounds
    first = rows[0].split("|")[2:-1]
    assert len(first) == 4 and len({cell.strip() for cell in first}) == 1  # every run starts from the same adapter
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved) == {"fed", "fed-iid", "single", "single-K"}
    fed, single = saved["fed"]["counters"], saved["single"]["counters"]
    assert fed["step"] == 4 and single["step"] == 16 and single["forward_passes"] == 32
    assert 0 < fed["forward_passes"] <= 32 and fed["bytes_up"] > 0 and fed["sim_seconds"] > 0
    assert re.search(rf"fed: 4 updates, \d+ passes, .* up ({FLOAT}) B", out), out
    again = run("bench_federation.py", ["--report", "--smoke", "--out", str(tmp_path / "runs")], tmp_path, env)
    assert [line for line in again.splitlines() if line.startswith("| ")] == \
        [line for line in out.splitlines() if line.startswith("| ")]


@pytest.mark.slow
def test_bench_federation_scaling_smoke(env, smoke_model, tmp_path):
    out = run("bench_federation.py", ["--mode", "scaling", "--smoke", "--model", str(smoke_model), "--out",
                                      str(tmp_path / "runs"), "--json", str(tmp_path / "r.json")], tmp_path, env)
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert [r.split("|")[1].strip() for r in rows] == ["n1-iid-s0", "n2-iid-s0", "n1-dir-s0", "n2-dir-s0"], out
    saved = {r["label"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    for label, res in saved.items():
        n = res["n"]
        assert res["lr"] == pytest.approx(0.02 * n)  # linear scaling: N clients of one direction step at N x lr
        assert [e[1] for e in res["evals"]] == [0, 4, 8, 12, 16][:len(res["evals"])], label  # the same pass totals
        assert res["evals"][0][3] == saved["n1-iid-s0"]["evals"][0][3]  # every run starts from the same adapter
        assert 0 < res["bytes_up"] < 1024 and 0 < res["bytes_down"] < 1024
    assert (tmp_path / "runs" / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    again = run("bench_federation.py", ["--mode", "scaling", "--report", "--smoke", "--out", str(tmp_path / "runs")],
                tmp_path, env)
    assert [line for line in again.splitlines() if line.startswith("| ")] == \
        [line for line in out.splitlines() if line.startswith("| ")]


def test_bench_catchup_smoke(env, smoke_model, tmp_path):
    out = run("bench_catchup.py", ["--smoke", "--model", str(smoke_model)], tmp_path, env)
    line = [x for x in out.splitlines() if x.startswith("rounds ")][-1]
    numbers = dict(re.findall(r"(\w+) (" + FLOAT + ")", line))
    assert float(numbers["history"]) < float(numbers["snapshot"]) < float(numbers["before"]), out
    assert "bitwise equal: True" in out


def test_bench_federation_time_smoke(env, smoke_model, tmp_path):
    out = run("bench_federation.py", ["--mode", "time", "--smoke", "--model", str(smoke_model), "--out",
                                      str(tmp_path / "runs"), "--json", str(tmp_path / "r.json")], tmp_path, env)
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert [r.split("|")[1].strip() for r in rows] == ["a-s0", "c-s0", "a-s1", "c-s1", "a2-s0", "b-s0", "d-s0",
                                                      "e-s0"], out
    saved = {r["label"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    for label, res in saved.items():
        assert res["final"]["rounds"] == 4 and res["bytes_up"] > 0 and 0 <= res["idle_share"] <= 1, label
        assert res["evals"][0][3] == saved["a-s0"]["evals"][0][3]  # every run starts from the same adapter
    assert saved["b-s0"]["directions"] > saved["a-s0"]["directions"]  # the schedule rises from 1 to 10
    assert saved["a2-s0"]["deadline"] > 0 and saved["a-s0"]["deadline"] == 0
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "c-s0" / "metrics.jsonl").read_text().splitlines()]
    assert all("pacing" in r and "deadline" in r for r in metrics if r["step"] > 0)
    assert (tmp_path / "runs" / "time.png").read_bytes()[:4] == b"\x89PNG"
    again = run("bench_federation.py", ["--mode", "time", "--report", "--smoke", "--out", str(tmp_path / "runs")],
                tmp_path, env)
    assert [line for line in again.splitlines() if line.startswith("| ")] == \
        [line for line in out.splitlines() if line.startswith("| ")]


def test_bench_federation_time_budget_smoke(env, smoke_model, tmp_path):
    """Asynchronous rounds with client memory beside (a), every run given the same simulated seconds."""
    out = run("bench_federation.py", ["--mode", "time", "--smoke", "--model", str(smoke_model), "--out",
                                      str(tmp_path / "runs"), "--json", str(tmp_path / "r.json"), "--runs", "a,m",
                                      "--seeded", "a,m", "--seeds", "0,1", "--budget", "1", "--eval-at", "0.25,0.5",
                                      "--rounds", "300", "--max-staleness", "40"], tmp_path, env)
    assert re.search(r"^\| a: uniform.* \| 2 \|", out, re.M) and re.search(r"^\| m: asynchronous.* \| 2 \|", out, re.M), out
    saved = {r["label"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert set(saved) == {"a-s0", "a-s1", "m-s0", "m-s1"}
    for label, res in saved.items():
        assert res["final"]["sim_seconds"] >= 1 or res["final"]["rounds"] == 300, label
        assert sorted(map(float, res["accuracy_at"])) == [0.25, 0.5, 1.0], label
        assert res["evals"][0][3] == saved[label[:-1] + "0"]["evals"][0][3] or label.endswith("1")
    m, a = saved["m-s0"], saved["a-s0"]
    assert m["final"]["rounds"] > a["final"]["rounds"]  # nothing waits for the slowest device
    assert m["weight_by_profile"].get("pi5", 0) > 0 and m["weight_by_profile"].get("phone-midrange", 0) > 0
    assert 0 < m["bytes_up"] <= 1024 and 0 < m["bytes_down"] <= 1024
    assert (tmp_path / "runs" / "time.png").read_bytes()[:4] == b"\x89PNG"
