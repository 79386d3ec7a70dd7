"""The training loop and `ggfwd train` on the real engine with the tiny model."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ggfwd.adapter import LoraAdapter
from ggfwd.averaging import IterateAverage
from ggfwd.inputs import RunInputs
from ggfwd.session import SessionSettings
from ggfwd.trainer import Trainer, TrainConfig, batch_indices, read_metrics
from clirun import run_cli, start_cli
from tinytask import make_tiny

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), labels="mixed", n_train=64, n_eval=32,
                     words=(["great"], ["terrible"]))


def tiny_inputs(tiny) -> RunInputs:
    return RunInputs(model=str(tiny["model"]), data=str(tiny["train"]), eval_data=str(tiny["eval"]),
                     task=str(tiny["task"]), rank=4, alpha=8.0, max_tokens=64)


def make_trainer(tiny, rundir, **config):
    """A Trainer built the way `ggfwd train` builds one: RunInputs -> session settings -> data and adapter."""
    cfg = TrainConfig(**({"steps": 30, "batch_size": 8, "optimizer": "adam", "lr": 0.2, "eps": 0.1, "eval_every": 10} | config))
    inputs = tiny_inputs(tiny)
    session = SessionSettings(max_tokens=inputs.max_tokens, threads=1).open(inputs.model)
    train, evaluation, adapter = inputs.load(session, cfg.seed)
    rundir.mkdir(parents=True, exist_ok=True)
    return Trainer(session, adapter, train, cfg, rundir, eval_data=evaluation, inputs=inputs)


TRAIN_STEPS = 40


def cli(*args, **kw):
    return run_cli(*args, **kw)


def test_batches_are_a_pure_function_of_seed_and_step():
    a = [batch_indices(3, s, 100, 16) for s in range(12)]
    b = [batch_indices(3, s, 100, 16) for s in reversed(range(12))][::-1]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    epoch = np.concatenate(a[:6])  # 6 batches per epoch: no repeats within an epoch
    assert len(set(epoch.tolist())) == 96 and epoch.max() < 100
    assert not np.array_equal(a[0], batch_indices(4, 0, 100, 16))
    assert not np.array_equal(a[0], a[6])


def test_training_learns_labels_that_depend_on_the_input(tiny, tmp_path):
    """Labels follow a sentiment word in the text and are balanced, so a bias shift alone stays at 50%: the
    accuracy must come from reading the input, on held-out rows."""
    t = make_trainer(tiny, tmp_path / "run", steps=TRAIN_STEPS, lr=0.05, directions=4)
    scores = t.session.score(t.eval_plan)
    labels = t.eval_data.labels
    assert abs(labels.mean() - 0.5) < 0.05
    t.run()
    evals = [r for r in read_metrics(tmp_path / "run") if "eval_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == TRAIN_STEPS
    assert evals[0]["eval_accuracy"] == pytest.approx(scores.accuracy)
    assert evals[-1]["eval_loss"] < 0.7 * evals[0]["eval_loss"]
    assert evals[-1]["eval_accuracy"] >= 0.75
    t.session.set_params(t.theta)
    after = t.session.score(t.eval_plan)
    predicted = np.where(after.correct, labels, 1 - labels)
    assert set(predicted.tolist()) == {0, 1}  # both classes predicted: not a constant answer
    last = read_metrics(tmp_path / "run")[-1]
    assert last["forward_passes"] == 2 * 4 * TRAIN_STEPS and last["tokens"] > 0
    saved = LoraAdapter.load(tmp_path / "run" / "adapter.gguf")
    assert np.array_equal(saved.params, t.theta)


@pytest.mark.parametrize("average", [0.0, 0.9])
def test_resume_after_stop_is_bitwise_identical(tiny, tmp_path, average):
    full = make_trainer(tiny, tmp_path / "full", steps=12, eval_every=5, average_decay=average)
    full.run()
    part = make_trainer(tiny, tmp_path / "part", steps=12, eval_every=5, average_decay=average)
    part.run(stop_after=7)
    part.session.close()
    again = make_trainer(tiny, tmp_path / "part", steps=12, eval_every=5, average_decay=average)
    assert again.resume() == 7
    again.run()
    a = LoraAdapter.load(tmp_path / "full" / "adapter.gguf").params
    b = LoraAdapter.load(tmp_path / "part" / "adapter.gguf").params
    assert np.array_equal(a, b) and not np.array_equal(a, full.adapter.params)  # trained, and identical
    assert np.array_equal(a, full.theta) == (average == 0)  # the saved result is the average when asked
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]
    assert strip(read_metrics(tmp_path / "full")) == strip(read_metrics(tmp_path / "part"))


def test_killed_cli_run_resumes_to_the_same_adapter(tiny, tmp_path):
    args = ["train", "--model", tiny["model"], "--task", tiny["task"], "--data", tiny["train"],
            "--eval-data", tiny["eval"], "--steps", 16, "--batch-size", 8, "--optimizer", "adam", "--lr", 0.01, "--eps", 0.1,
            "--rank", 4, "--alpha", 8, "--threads", 1, "--max-tokens", 64, "--eval-every", 0, "--average", 0.9]
    done = cli(*args, "--out", tmp_path / "full")
    assert done.returncode == 0, done.stderr
    proc = start_cli(*args, "--out", tmp_path / "killed", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if json.loads(state.read_text())["step"] >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = json.loads(state.read_text())["step"]
    assert 3 <= stopped_at < 16
    resumed = cli("train", "--out", tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = LoraAdapter.load(tmp_path / "full" / "adapter.gguf").params
    b = LoraAdapter.load(tmp_path / "killed" / "adapter.gguf").params
    assert np.array_equal(a, b)
    steps = [r["step"] for r in read_metrics(tmp_path / "killed")]
    assert steps == sorted(set(steps)) and steps[-1] == 16


def test_iterate_average_is_the_normalised_exponential_average():
    avg = IterateAverage(3, 0.9)
    assert avg.value() is None
    thetas = [np.array([1.0, 2.0, 3.0], np.float32) * (t + 1) for t in range(4)]
    for th in thetas:
        avg.update(th)
    w = np.array([0.9 ** (3 - t) for t in range(4)])
    expected = sum(wi * th for wi, th in zip(w, thetas)) / w.sum()
    np.testing.assert_allclose(avg.value(), expected, rtol=1e-6)
    again = IterateAverage(3, 0.9)
    again.load_state_dict(avg.state_dict())
    assert np.array_equal(again.value(), avg.value())


def test_divergent_steps_are_rejected_not_applied(tiny, tmp_path):
    t = make_trainer(tiny, tmp_path / "nan", steps=5, eps=1e38, max_rejections=3)
    before = t.theta.copy()
    with pytest.raises(Exception, match="diverged"):
        t.run()
    assert np.array_equal(t.theta, before) and t.counters.rejected == 3 and t.counters.applied == 0
    rows = [r for r in read_metrics(tmp_path / "nan") if r["step"] > 0]
    assert [r["rejected"] for r in rows] == ["non-finite loss"] * 3
    assert np.array_equal(LoraAdapter.load(tmp_path / "nan" / "adapter.gguf").params, before)


@pytest.mark.parametrize("extra, message", [
    (["--eps", "0"], "eps must be a positive"),
    (["--eps", "-0.1"], "eps must be a positive"),
    (["--directions", "0"], "directions per step must be >= 1"),
    (["--eval-data", "/nonexistent/dev.jsonl"], "evaluation data file not found"),
    (["--optimizer", "lion"], "optimizer must be one of"),
    (["--average", "1"], "averaging decay must lie in"),
    (["--min-words", "9"], "has no examples with at least 9 words"),
    (["--lr", "nan"], "learning rate must be a positive number"),
    (["--momentum", "1.5"], "momentum and betas"),
    (["--distribution", "cauchy"], "distribution must be one of"),
    (["--schedule", "step"], "schedule must be one of"),
    (["--rank", "0"], "rank must be >= 1"),
    (["--targets", "nothing_here"], "match no weight"),
    (["--max-tokens", "4"], "max-tokens must be between"),
    (["--memory", "small"], "--memory must be one of standard, lean"),
    (["--lr-scaling", "cubic"], "--lr-scaling must be one of auto, linear, sqrt, none"),
    (["--lr-scale-max", "-2"], "--lr-scale-max must be 0"),
])
def test_bad_arguments_give_one_line_errors(tiny, tmp_path, extra, message, capsys, monkeypatch):
    from ggfwd.cli import main

    args = ["train", "--model", tiny["model"], "--task", tiny["task"], "--data", tiny["train"], "--steps", 2,
            "--out", tmp_path / "bad", *extra]
    monkeypatch.setattr(sys, "argv", ["ggfwd", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "bad").exists()  # every setting is checked before anything is created


def test_resume_refuses_changed_settings_and_missing_runs(tiny, tmp_path):
    r = cli("train", "--out", tmp_path / "none", "--resume")
    assert r.returncode == 2 and "no run to resume" in r.stderr
    t = make_trainer(tiny, tmp_path / "run", steps=2)
    t.run(stop_after=1)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert RunInputs.from_dict(state["meta"]) == tiny_inputs(tiny)  # the run saved what it read
    other = tmp_path / "other.jsonl"
    other.write_text(tiny["eval"].read_text())
    for extra, fragment in [(["--lr", "0.5"], "--lr 0.5 differs from the run's 0.2"),
                            (["--data", other], "--data"), (["--model", tiny["task"]], "--model"),
                            (["--task", "sst2"], "--task sst2 differs"), (["--max-tokens", "32"], "--max-tokens 32"),
                            (["--eval-data", other], "--eval-data"), (["--memory", "lean"], "--memory lean")]:
        r = cli("train", "--out", tmp_path / "run", "--resume", *extra)
        assert r.returncode == 2 and "differs from the run's" in r.stderr and fragment in r.stderr, (extra, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    same = cli("train", "--out", tmp_path / "run", "--resume", "--data", tiny["train"], "--task", tiny["task"],
               "--threads", 1)
    assert same.returncode == 0, same.stderr  # naming the same inputs again is fine
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 2


def test_plot_writes_a_png(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    t = make_trainer(tiny, tmp_path / "run", steps=4, eval_every=2)
    t.run()
    r = cli("plot", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    png = (tmp_path / "run" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_calibrate_command_and_train_with_the_calibrated_eps(tiny, tmp_path):
    common = ["--model", tiny["model"], "--task", tiny["task"], "--data", tiny["train"], "--threads", 1,
              "--max-tokens", 64, "--rank", 4, "--alpha", 8]
    r = cli("calibrate", *common, "--batch-size", 8, "--json")
    assert r.returncode == 0, r.stderr
    cal = json.loads(r.stdout)
    assert 1e-3 <= cal["eps"] <= 0.3 and 0 < cal["predicted_rel_error"] < 0.3
    # two batches of 8 rows by default, 4 directions each: 2 x (1 + 2 x 4 x 6) evaluations
    assert cal["n_batches"] == 2 and cal["n_directions"] == 8 and cal["n_evaluations"] == 98
    assert len(cal["rows"]) == 6 and cal["noise_floor"] >= 0
    assert "calibrating eps" in r.stderr and "predicted relative error" in r.stderr
    run = tmp_path / "run"
    r = cli("train", *common, "--calibrate", "--steps", 2, "--batch-size", 8, "--out", run)
    assert r.returncode == 0, r.stderr
    state = json.loads((run / "state.json").read_text())
    chosen = state["meta"]["calibration"]["eps"]
    assert state["config"]["eps"] == chosen and f"calibrated eps {chosen:g}" in r.stderr
    assert state["meta"]["calibration"]["n_batches"] == 2
    assert [m["eps"] for m in read_metrics(run) if m["step"] > 0] == [chosen, chosen]


@pytest.mark.parametrize("args, message", [
    (["train", "--calibrate", "--eps", "0.1"], "excludes --eps and --resume"),
    (["train", "--calibrate", "--scheme", "forward", "--directions", "2"], "models central differences"),
    (["calibrate", "--candidates", "0.1,x"], "must be comma-separated numbers"),
    (["calibrate", "--candidates", "0.1,0.2"], "at least three positive eps values"),
    (["calibrate", "--part", "c"], "perturbed part must be one of"),
    (["calibrate", "--batches", "5", "--batch-size", "16"], "needs 80 rows; the data has 64"),
])
def test_calibration_arguments_give_one_line_errors(tiny, tmp_path, args, message):
    r = cli(*args, "--model", tiny["model"], "--task", tiny["task"], "--data", tiny["train"],
            *(["--out", tmp_path / "run"] if args[0] == "train" else []))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
