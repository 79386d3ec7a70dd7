"""A tiny classification task for the tiny model: texts of a few words with 'great' / 'terrible' and similar words.
Its verbalizers are 'g' and 't', single tokens: the tiny tokenizer adds no space prefix and spells 'great' and
'terrible' with several tokens, of which only the first ('g', 't') would be scored anyway."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tinymodel import make_weights, write_gguf

TASK_TOML = """name = "tiny"
kind = "classification"
template = "review {text} sentiment"
[labels]
negative = "t"
positive = "g"
"""

FILLER = ["the", "movie", "film", "was", "very", "plot", "actors"]
POSITIVE, NEGATIVE = ["great", "good", "fun", "love"], ["terrible", "bad", "dull", "hate"]


def write_rows(path: Path, n: int, seed: int, labels: str = "mixed", positive=POSITIVE, negative=NEGATIVE) -> Path:
    """`labels`: 'mixed' (label follows a sentiment word in the text) or 'positive' (every label 1)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        lab = i % 2
        words = list(rng.choice(FILLER, 3)) + [str(rng.choice(positive if lab else negative))]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": 1 if labels == "positive" else lab})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tiny(folder: Path, labels: str = "mixed", n_train: int = 64, n_eval: int = 32, words=None) -> dict:
    """Model, task file, training and evaluation data in `folder`; returns their paths. `words`: (positive,
    negative) sentiment word lists; ('great',), ('terrible',) makes the label the verbalizer's first letter
    in the text, a task the tiny model can learn in a few dozen steps."""
    positive, negative = words or (POSITIVE, NEGATIVE)
    folder.mkdir(parents=True, exist_ok=True)
    model = write_gguf(folder / "tiny.gguf", make_weights(0))
    task = folder / "task.toml"
    task.write_text(TASK_TOML)
    return {"model": model, "task": task,
            "train": write_rows(folder / "train.jsonl", n_train, 1, labels, positive, negative),
            "eval": write_rows(folder / "eval.jsonl", n_eval, 2, labels, positive, negative)}
