"""Tasks and data: from files on disk to token ids, once.

Two kinds of task:
- classification: a prompt template with `{text}` and one verbalizer word per label. The loss is the
  cross-entropy over the verbalizers' next-token logits; the prediction is the argmax over them.
- generation: `{prompt}` then a completion; the loss is the mean token cross-entropy of the completion.

Data: JSONL (`{"text", "label"}` or `{"prompt", "completion"}`) or GLUE-style TSV with a header and a
`label` column (the packaged SST-2 files), either optionally gzip-compressed (`.jsonl.gz`, `.tsv.gz`).
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import UserError
from .compat import tomllib
from .files import read_lines, read_text


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "classification" or "generation"
    template: str
    labels: tuple[str, ...] = ()
    verbalizers: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in ("classification", "generation"):
            raise UserError(f"task kind must be 'classification' or 'generation', got '{self.kind}'")
        slot = "{text}" if self.kind == "classification" else "{prompt}"
        if self.template.count(slot) != 1:
            raise UserError(f"task template must contain {slot} exactly once")
        if self.kind == "classification" and (len(self.labels) < 2 or len(self.labels) != len(self.verbalizers)):
            raise UserError("a classification task needs at least two labels, each with one verbalizer")

    def label_index(self, value, where: str) -> int:
        """Map a label as written in the data (index, index as text, or label name) to its index."""
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, int) and 0 <= value < len(self.labels):
            return value
        if isinstance(value, str):
            if value in self.labels:
                return self.labels.index(value)
            if value.strip().isdigit() and int(value) < len(self.labels):
                return int(value)
        raise UserError(f"{where}: label {value!r} is not one of the task's labels "
                        f"({', '.join(f'{i}={n}' for i, n in enumerate(self.labels))})")


BUILTIN_TASKS = {
    # Chosen by zero-shot score on held-out SST-2 *train* rows (scripts/research/choose_prompt.py), never on dev.
    "sst2": Task("sst2", "classification", "Text: {text}\nSentiment:",
                 ("negative", "positive"), (" negative", " positive")),
    # The prompt of the naive recipe in shared/notes/llamacpp.md, kept for comparisons with it.
    "sst2-plain": Task("sst2-plain", "classification", "Review: {text}\nSentiment (great or terrible):",
                       ("negative", "positive"), (" terrible", " great")),
    "generation": Task("generation", "generation", "{prompt}"),
}


def load_task(spec: str) -> Task:
    """A built-in task by name, or a task file (TOML or JSON) with kind, template and labels."""
    if spec in BUILTIN_TASKS:
        return BUILTIN_TASKS[spec]
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"unknown task '{spec}': not a built-in ({', '.join(BUILTIN_TASKS)}) nor a task file")
    text = read_text(path, "task file")
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except ValueError as exc:
        raise UserError(f"task file {path} cannot be parsed: {exc}") from None
    labels = raw.get("labels", {})
    if not isinstance(labels, dict):
        raise UserError(f"task file {path}: 'labels' must map label names to verbalizer words")
    return Task(raw.get("name", path.stem), raw.get("kind", "classification"), raw.get("template", ""),
                tuple(labels), tuple(labels.values()))


@dataclass(frozen=True)
class Example:
    text: str  # the text or prompt
    label: int = -1  # classification
    completion: str = ""  # generation


def load_examples(path: str | Path, task: Task, limit: int | None = None, min_words: int = 0) -> list[Example]:
    """Read a JSONL or GLUE-style TSV file into examples for `task`.

    `min_words` skips rows whose text (or prompt) has fewer whitespace-separated words; `limit` counts the rows
    kept. SST-2's training set is mostly short phrases (median 7 words) while its dev set holds whole sentences
    (median 19), so training on the longer rows matches what is evaluated."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    kind = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    rows = _read_tsv(path, kind) if kind in (".tsv", ".csv") else _read_jsonl(path)
    examples = []
    for where, row in rows:
        if task.kind == "classification":
            for key in ("text", "label"):
                if key not in row:
                    raise UserError(f"{where}: missing field '{key}'")
            if not isinstance(row["text"], str):
                raise UserError(f"{where}: field 'text' must be a string")
            example = Example(row["text"], label=task.label_index(row["label"], where))
        else:
            for key in ("prompt", "completion"):
                if not isinstance(row.get(key), str):
                    raise UserError(f"{where}: missing string field '{key}'")
            if not row["completion"]:
                raise UserError(f"{where}: empty completion")
            example = Example(row["prompt"], completion=row["completion"])
        if len(example.text.split()) < min_words:
            continue
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise UserError(f"data file {path} has no examples" + (f" with at least {min_words} words" if min_words else ""))
    return examples


def _read_jsonl(path: Path):
    for n, line in read_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path.name} line {n}: not valid JSON") from None
        if not isinstance(row, dict):
            raise UserError(f"{path.name} line {n}: expected a JSON object")
        yield f"{path.name} line {n}", row


def _read_tsv(path: Path, kind: str = ".tsv"):
    """GLUE-style: a header line, a `label` column and one text column (`sentence`, `content` or `text`).
    Rows are whole lines (fields hold no quoted newlines), so line numbers are exact."""
    lines = read_lines(path)
    delimiter = "\t" if kind == ".tsv" else ","
    split = lambda text: next(csv.reader([text.rstrip("\r\n")], delimiter=delimiter, quoting=csv.QUOTE_NONE), [])
    first = next(lines, None)
    header = split(first[1]) if first else None
    if not header or "label" not in header:
        raise UserError(f"{path.name}: expected a header line with a 'label' column")
    text_cols = [c for c in ("sentence", "content", "text") if c in header]
    if not text_cols:
        raise UserError(f"{path.name}: no text column (sentence, content or text) in the header")
    li, ti = header.index("label"), header.index(text_cols[0])
    for n, text in lines:
        if not text.strip():
            continue
        cells = split(text)
        if len(cells) != len(header):
            raise UserError(f"{path.name} line {n}: expected {len(header)} columns, found {len(cells)}")
        yield f"{path.name} line {n}", {"text": cells[ti], "label": cells[li]}


# --------------------------------------------------------------------------- tokens

Tokenize = Callable[[str, bool], list[int]]  # (text, add_special) -> ids
Detokenize = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids fed to the model, where a next-token distribution is scored, and what is expected there.

    classification: one target position (the last token); `targets` holds the label index.
    generation: the positions before each completion token; `targets` holds the completion's token ids.
    """

    tokens: np.ndarray  # int32
    positions: np.ndarray  # int32, indices into tokens
    targets: np.ndarray  # int32


@dataclass
class TokenizedData:
    task: Task
    examples: list[TokenizedExample]
    classes: np.ndarray | None  # verbalizer token ids (classification)
    n_truncated: int = 0
    labels: np.ndarray = field(default=None)  # per-example label (classification), else None

    def __len__(self):
        return len(self.examples)

    @property
    def n_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.examples)

    def subset(self, indices) -> "TokenizedData":
        ex = [self.examples[i] for i in indices]
        labels = None if self.labels is None else self.labels[np.asarray(indices)]
        return TokenizedData(self.task, ex, self.classes, 0, labels)


def verbalizer_ids(task: Task, tokenize: Tokenize) -> np.ndarray:
    """The first token of each verbalizer; they must differ from each other."""
    ids = []
    for word in task.verbalizers:
        toks = tokenize(word, False)
        if not toks:
            raise UserError(f"verbalizer {word!r} tokenizes to nothing")
        if len(toks) > 1:
            warnings.warn(f"verbalizer {word!r} is {len(toks)} tokens for this model; only its first token "
                          "is scored", UserWarning, stacklevel=2)
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise UserError(f"verbalizers {list(task.verbalizers)} share their first token; choose distinct words")
    return np.asarray(ids, dtype=np.int32)


def tokenize_examples(examples: list[Example], task: Task, tokenize: Tokenize, detokenize: Detokenize,
                      max_tokens: int = 256) -> TokenizedData:
    """Tokenize once. Texts too long for `max_tokens` lose tokens from the left of the text field."""
    if max_tokens < 8:
        raise UserError("max tokens must be at least 8")
    out, n_truncated = [], 0
    classes = verbalizer_ids(task, tokenize) if task.kind == "classification" else None
    for ex in examples:
        if task.kind == "classification":
            ids, cut = _fit(task.template, "{text}", ex.text, tokenize, detokenize, max_tokens)
            out.append(TokenizedExample(np.asarray(ids, np.int32), np.asarray([len(ids) - 1], np.int32),
                                        np.asarray([ex.label], np.int32)))
        else:
            completion = tokenize(ex.completion, False)
            if not completion:
                raise UserError("a completion tokenizes to nothing")
            completion = completion[: max_tokens // 2]
            ids, cut = _fit(task.template, "{prompt}", ex.text, tokenize, detokenize, max_tokens - len(completion))
            start = len(ids) - 1
            ids = ids + completion[:-1]
            out.append(TokenizedExample(np.asarray(ids, np.int32),
                                        np.arange(start, start + len(completion), dtype=np.int32),
                                        np.asarray(completion, np.int32)))
        n_truncated += cut
    labels = np.asarray([e.label for e in examples], np.int32) if task.kind == "classification" else None
    return TokenizedData(task, out, classes, n_truncated, labels)


def _fit(template: str, slot: str, text: str, tokenize: Tokenize, detokenize: Detokenize, budget: int):
    """Render and tokenize; if too long, drop tokens from the left of `text` until it fits."""
    ids = tokenize(template.replace(slot, text), True)
    if len(ids) <= budget:
        return ids, 0
    text_ids = tokenize(text, False)
    for _ in range(8):
        excess = len(ids) - budget
        text_ids = text_ids[excess:]
        text = detokenize(text_ids)
        ids = tokenize(template.replace(slot, text), True)
        if len(ids) <= budget:
            return ids, 1
    raise UserError(f"the task template alone needs more than {budget} tokens; raise --max-tokens")
