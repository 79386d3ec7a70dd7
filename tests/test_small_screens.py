"""Live views and tables on small screens: a laptop's 80-column terminal and Termux on a phone (50 columns).

Each is rendered at that width (the CLI in a subprocess with $COLUMNS, as a user's terminal sets it, or the
progress display on a recording rich console) and must fit: no line longer than the width, nothing cut with
rich's ellipsis ("devi…", "0:…"), every profile name and figure whole on one line. At 80 columns the device
tables also keep a row per device (no row wrapped over two lines); `--wide` still prints every column.
`devices compare` runs on the tiny model: the demo model's 262k-token vocabulary takes seconds to read, and
the layouts do not depend on the model.
"""

from __future__ import annotations

import io
import os
import re

import pytest
from rich.console import Console

from clirun import run_cli
from ggfwd.progress import pack_figures, progress_bar
from test_profiles import SHIPPED
from tinytask import make_tiny

ELLIPSIS = "…"
COMPARED = ("pi5", "phone-midrange", "laptop-x86")


def at(width: int, *args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "GGFWD_PROFILES"}
    r = run_cli(*map(str, args), env={**env, "COLUMNS": str(width)}, **kw)
    assert r.returncode == 0, r.stderr
    return r


def assert_fits(text: str, width: int, whole=()):
    lines = text.splitlines()
    assert lines, "nothing printed"
    assert max(len(line) for line in lines) <= width, "\n".join(line for line in lines if len(line) > width)
    assert ELLIPSIS not in text, text
    for item in whole:  # a name or figure, unbroken on one line
        assert any(item in line for line in lines), (item, text)


@pytest.mark.parametrize("width", [80, 50])
def test_devices_list(width):
    out = at(width, "devices", "list").stdout
    assert_fits(out, width, whole=SHIPPED)
    if width == 80:  # a row per profile, with its rates and a note on where its speed comes from
        for name in SHIPPED:
            assert any(re.match(rf"{re.escape(name)}\s+\S", line) for line in out.splitlines()), (name, out)
        assert "cited: https://justine.lol/matmul/" in out and "measured by ggfwd devices bench" in out


@pytest.mark.parametrize("width", [80, 50])
def test_devices_show(width):
    out = at(width, "devices", "show", "pi5").stdout
    assert_fits(out, width, whole=("pi5", "memory", "speed", "network", "availability", "budget_mib = 6144"))
    assert "justine.lol/matmul" in "".join(out.split())  # the source, even where it wraps


@pytest.mark.parametrize("width", [80, 50])
def test_devices_compare(width, tiny_model):
    r = at(width, "devices", "compare", *COMPARED, "--model", tiny_model)
    headers = ("peak memory MiB", "budget MiB", "s / pass", "perturbations / min", "1,000 passes")
    assert_fits(r.stdout, width, whole=COMPARED + headers)
    assert_fits(r.stderr, width)
    if width == 80:  # a column per device: the three side by side, a line per figure
        assert any(all(name in line for name in COMPARED) for line in r.stdout.splitlines()), r.stdout
        assert len(r.stdout.splitlines()) <= 15, r.stdout


@pytest.mark.parametrize("width", [80, 50])
def test_devices_bench(width, tiny_model, tmp_path):
    r = at(width, "devices", "bench", "--model", tiny_model, "--smoke", "--threads", 1, "--no-calibrate",
           "--out", tmp_path / "here.toml")
    assert_fits(r.stdout, width, whole=("tiny.gguf", "1024", "512", "speed model"))


def test_devices_compare_many_at_80_columns(tiny_model):
    out = at(80, "devices", "compare", *SHIPPED, "--model", tiny_model).stdout
    assert_fits(out, 80, whole=SHIPPED)
    rows = [line for line in out.splitlines() if line.split() and line.split()[0] in SHIPPED]
    assert len(rows) == len(SHIPPED), out  # a row per device, none wrapped


def test_wide_prints_every_column_whatever_the_width(tiny_model):
    out = at(50, "devices", "compare", *COMPARED, "--wide", "--model", tiny_model).stdout
    header = next(line for line in out.splitlines() if "device" in line)
    for h in ("device", "backend", "peak memory MiB", "budget MiB", "fits", "s / perturbation", "1,000 passes"):
        assert h in header, header
    out = at(50, "devices", "list", "--wide").stdout
    assert "source of the speed" in out and ELLIPSIS not in out


def render_live(width: int, info: str, description: str = "training", total: int = 1300) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    with progress_bar(console, info=True) as bar:
        bar.add_task(description, total=total, completed=total // 2, info=info)
    return console.export_text()


# The live figures of `ggfwd train` and `ggfwd federate` (cli/train.py and cli/federate.py), at their longest.
TRAIN_INFO = "loss 0.3504  eval acc 71.9% (start 49.6%)  130 tok/s"
FEDERATE_INFO = "acc 78.1%  sim 125.3 min  up 1.8 KiB  down 12962.6 KiB  lost 10"


@pytest.mark.parametrize("width", [200, 80, 50])
@pytest.mark.parametrize("description, info", [("training", TRAIN_INFO), ("rounds", FEDERATE_INFO)])
def test_live_view(width, description, info):
    out = render_live(width, info, description)
    assert_fits(out, width, whole=(description, "650/1300", *info.split("  ")))
    assert len(out.splitlines()) == (1 if width == 200 else 1 + len(pack_figures(info, width)))


def test_figures_break_between_figures():
    assert pack_figures(TRAIN_INFO, 80) == [TRAIN_INFO]
    assert pack_figures(TRAIN_INFO, 45) == ["loss 0.3504  eval acc 71.9% (start 49.6%)", "130 tok/s"]
    assert pack_figures("  a  b", 1) == ["a", "b"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("small"), n_train=32, n_eval=16)


def test_train_and_federate_on_a_50_column_terminal(tiny, tmp_path):
    common = ["--model", tiny["model"], "--data", tiny["train"], "--eval-data", tiny["eval"], "--task", tiny["task"],
              "--max-tokens", 64, "--rank", 2, "--threads", 1, "--batch-size", 8]
    r = at(50, "train", *common, "--steps", 2, "--eval-every", 1, "--out", tmp_path / "train")
    assert_fits(r.stderr, 50, whole=("training", "2/2", "eval acc"))
    r = at(50, "federate", *common, "--clients", 2, "--devices", "laptop-x86:1,pi5:1", "--clients-per-round", 2,
           "--rounds", 2, "--eval-every", 1, "--out", tmp_path / "fed")
    assert_fits(r.stderr, 50, whole=("rounds", "2/2", "sim"))


def test_calibration_table_at_80_columns(tiny):
    r = at(80, "calibrate", "--model", tiny["model"], "--data", tiny["train"], "--task", tiny["task"], "--threads", 1,
           "--batch-size", 4, "--batches", 1, "--directions", 1, "--max-tokens", 64, "--rank", 2)
    assert_fits(r.stderr, 80, whole=("eps", "noise", "curvature", "predicted", "observed", "unchanged"))
