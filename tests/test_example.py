"""The README's worked example for your own data (docs/examples/topics: a 3-class topic task), run end to end
through the CLI as a user would, on a tiny model made here."""

import json
from pathlib import Path

import numpy as np

from clirun import run_cli
from ggfwd.adapter import LoraAdapter
from ggfwd.tasks import load_examples, load_task

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "topics"


def test_the_example_files_are_a_balanced_three_class_task():
    task = load_task(str(EXAMPLE / "task.toml"))
    assert task.labels == ("sports", "business", "technology") and task.kind == "classification"
    for name in ("train.jsonl", "dev.jsonl"):
        labels = np.bincount([e.label for e in load_examples(EXAMPLE / name, task)], minlength=3)
        assert labels.min() >= 8 and labels.max() - labels.min() <= 1, (name, labels)


def test_the_worked_example_end_to_end(tiny_model, tmp_path):
    common = ["--model", tiny_model, "--task", EXAMPLE / "task.toml", "--threads", 1, "--max-tokens", 64]
    zero = run_cli("eval", *common, "--data", EXAMPLE / "dev.jsonl", "--json")
    assert zero.returncode == 0, zero.stderr
    assert json.loads(zero.stdout)["examples"] == 24
    run = tmp_path / "topics"
    trained = run_cli("train", *common, "--data", EXAMPLE / "train.jsonl", "--eval-data", EXAMPLE / "dev.jsonl",
                      "--steps", 6, "--eval-every", 3, "--batch-size", 8, "--rank", 4, "--out", run)
    assert trained.returncode == 0, trained.stderr
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 3, 6]
    adapter = LoraAdapter.load(run / "adapter.gguf")
    assert adapter.rank == 4 and np.array_equal(adapter.params, LoraAdapter.load(run / "checkpoint" / "adapter-00000006.gguf").params)
    after = run_cli("eval", *common, "--data", EXAMPLE / "dev.jsonl", "--adapter", run / "adapter.gguf", "--json")
    assert after.returncode == 0, after.stderr
    result = json.loads(after.stdout)
    # ggfwd eval scores the saved adapter exactly as the run's last evaluation did (one definition of the session)
    assert result["accuracy"] == records[-1]["eval_accuracy"] and result["loss"] == records[-1]["eval_loss"]
    assert result["loss"] != json.loads(zero.stdout)["loss"]
