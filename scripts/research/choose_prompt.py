"""Which prompt should the built-in `sst2` task use? Answered: `Text: ... Sentiment:` with negative / positive.

Scores candidate prompts zero-shot on held-out SST-2 *train* rows, to choose a task's template and verbalizers.

A prompt decides where training starts and how much signal the base model already carries. For each
candidate this prints, on the same rows:

- accuracy and loss as the task scores them (argmax over the verbalizers);
- calibrated accuracy: for two classes, the accuracy when the logit difference is thresholded at its median
  instead of zero. It measures what the model separates before its bias is fixed, which is what the first
  few dozen training steps do.

Rows come from the train file at an offset far from the rows training reads first, so the choice never looks
at dev. ggfwd's built-in `sst2` prompt was chosen this way (`sst2-plain` is the notes' prompt).

    python scripts/research/choose_prompt.py --rows 384 --offset 30000
    python scripts/research/choose_prompt.py --candidates my_prompts.toml   # [[prompt]] name, template, labels
    python scripts/research/choose_prompt.py --split dev --offset 0 --rows 256   # report only, after choosing
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tomllib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("ggfwd") is None:  # not installed: run from the checkout
    sys.path.insert(0, str(ROOT))

NEG_POS = {"negative": " negative", "positive": " positive"}
TERRIBLE_GREAT = {"negative": " terrible", "positive": " great"}
CANDIDATES = [
    ("plain (notes)", "Review: {text}\nSentiment (great or terrible):", TERRIBLE_GREAT),
    ("it-was (MeZO)", "{text} It was", TERRIBLE_GREAT),
    ("sentiment", "{text}\nSentiment:", NEG_POS),
    ("review-sentiment", "Review: {text}\nSentiment:", NEG_POS),
    ("text-sentiment", "Text: {text}\nSentiment:", NEG_POS),
    ("the-sentiment-is", "{text}\nThe sentiment of this movie review is", NEG_POS),
]


def calibrated_accuracy(losses: np.ndarray, labels: np.ndarray) -> float:
    """Two classes: accuracy of thresholding the logit difference (class 1 minus class 0) at its median.
    The loss is softplus(-margin), so the margin is recovered exactly as -log(expm1(loss))."""
    margin = -np.log(np.expm1(np.maximum(losses, 1e-12)))
    diff = np.where(labels == 1, margin, -margin)
    return float(np.mean((diff > np.median(diff)) == (labels == 1)))


def load_candidates(path: Path | None):
    """(name, template, {label: verbalizer}) per candidate; a bad file exits with a one-line error."""
    if path is None:
        return CANDIDATES
    try:
        prompts = tomllib.loads(path.read_text()).get("prompt", [])
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        sys.exit(f"error: cannot read candidates file {path}: {exc}")
    if not prompts or any(not isinstance(p.get("template"), str) or not isinstance(p.get("labels"), dict)
                          for p in prompts):
        sys.exit(f"error: {path}: expected [[prompt]] tables, each with a 'template' string and a 'labels' table")
    return [(p.get("name", p["template"]), p["template"], p["labels"]) for p in prompts]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=Path, help="TOML file with [[prompt]] tables (name, template, labels)")
    ap.add_argument("--rows", type=int, default=384, help="train rows scored per candidate")
    ap.add_argument("--offset", type=int, default=30000, help="first train row (far from the rows training reads)")
    ap.add_argument("--split", choices=["train", "dev"], default="train",
                    help="dev only to report a choice already made (use --offset 0)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from ggfwd.demo import demo_model, sst2_file
    from ggfwd.errors import UserError
    from ggfwd.session import SessionSettings
    from ggfwd.tasks import Task, load_examples, tokenize_examples

    table = Table(title=f"Zero-shot on SST-2 {args.split} rows {args.offset}..{args.offset + args.rows - 1} "
                        "(Gemma-3-270M Q4_K_M)")
    for col in ("prompt", "template", "verbalizers", "accuracy", "loss", "calibrated accuracy", "tokens"):
        table.add_column(col, justify="left" if col in ("prompt", "template", "verbalizers") else "right")
    tasks = []
    for name, template, labels in load_candidates(args.candidates):  # all checked before the model loads
        try:
            tasks.append(Task(name, "classification", template, tuple(labels), tuple(labels.values())))
        except UserError as exc:
            sys.exit(f"error: prompt '{name}': {exc}")
    with SessionSettings(max_tokens=160, threads=args.threads).open(demo_model()) as s:
        for task in tasks:
            rows = load_examples(sst2_file(args.split), task, args.offset + args.rows)[args.offset:]
            if not rows:
                sys.exit(f"error: SST-2 {args.split} has no rows from offset {args.offset}")
            data = tokenize_examples(rows, task, s.tokenize, s.detokenize, 160)
            scores = s.score(s.plan(data))
            cal = calibrated_accuracy(scores.losses, data.labels) if len(task.labels) == 2 else float("nan")
            table.add_row(task.name, repr(task.template), "/".join(task.verbalizers), f"{scores.accuracy:.1%}",
                          f"{scores.loss:.3f}", f"{cal:.1%}", str(data.n_tokens))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
