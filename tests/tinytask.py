"""A tiny classification task for the tiny model: texts of a few words, verbalizers 'great' / 'terrible'
(first tokens 'g' and 't': the tiny model's tokenizer adds no space prefix)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tinymodel import make_weights, write_gguf

TASK_TOML = """name = "tiny"
kind = "classification"
template = "review {text} sentiment"
[labels]
negative = "terrible"
positive = "great"
"""

FILLER = ["the", "movie", "film", "was", "very", "plot", "actors"]
POSITIVE, NEGATIVE = ["great", "good", "fun", "love"], ["terrible", "bad", "dull", "hate"]


def write_rows(path: Path, n: int, seed: int, labels: str = "mixed") -> Path:
    """`labels`: 'mixed' (label follows a sentiment word in the text) or 'positive' (every label 1)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        lab = i % 2
        words = list(rng.choice(FILLER, 3)) + [str(rng.choice(POSITIVE if lab else NEGATIVE))]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": 1 if labels == "positive" else lab})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tiny(folder: Path, labels: str = "mixed", n_train: int = 64, n_eval: int = 32) -> dict:
    """Model, task file, training and evaluation data in `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    model = write_gguf(folder / "tiny.gguf", make_weights(0))
    task = folder / "task.toml"
    task.write_text(TASK_TOML)
    return {"model": model, "task": task,
            "train": write_rows(folder / "train.jsonl", n_train, 1, labels),
            "eval": write_rows(folder / "eval.jsonl", n_eval, 2, labels)}
