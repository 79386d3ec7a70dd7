"""What a training run reads: the base model, the starting adapter, the data and the task, as one typed record.

`RunInputs` is saved in the run folder, so a resumed run reads exactly what the first one read, and a
resume that names different inputs is refused. `load` turns the record into a scoring session's tokenized
data and the initial adapter, and `session_settings` into the scoring settings of its sessions, the same way for
`ggfwd train`, `ggfwd federate`, the tests, the Flower server and the nodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .adapter import LoraAdapter
from .base import check_gguf_file
from .errors import UserError
from .session import SessionSettings, check_memory
from .tasks import load_examples, load_task, tokenize_examples

# Settings a run reads from its inputs; compared on --resume.
RESUME_CHECKED = ("model", "adapter", "data", "eval_data", "task", "train_limit", "min_words", "eval_limit",
                  "rank", "alpha", "targets", "max_tokens", "memory")


@dataclass
class RunInputs:
    model: str
    data: str
    task: str = "sst2"
    adapter: str | None = None  # initial adapter GGUF; None: a fresh one (rank, alpha, targets)
    eval_data: str | None = None
    train_limit: int | None = None
    min_words: int = 0
    eval_limit: int | None = None
    rank: int = 8
    alpha: float = 16.0
    targets: str = "attn_q,attn_v"
    max_tokens: int = 128
    memory: str = "standard"  # how the session holds the model: session.MEMORY_MODES

    def check(self) -> None:
        """Everything that can be checked without loading the model, before anything is written."""
        check_gguf_file(Path(self.model), "model")
        if self.adapter is not None:
            check_gguf_file(Path(self.adapter), "adapter")
        for what, path in (("training data", self.data), ("evaluation data", self.eval_data)):
            if path is not None and not Path(path).is_file():
                raise UserError(f"{what} file not found: {path}")
        load_task(self.task)
        for name in ("train_limit", "eval_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.min_words < 0:
            raise UserError(f"--min-words must be >= 0, got {self.min_words}")
        if self.rank < 1:
            raise UserError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise UserError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not self.target_list:
            raise UserError("--targets names no weight pattern")
        if not 8 <= self.max_tokens <= 8192:
            raise UserError(f"--max-tokens must be between 8 and 8192, got {self.max_tokens}")
        check_memory(self.memory)

    @property
    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunInputs":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def session_settings(self, threads: int | None = None) -> SessionSettings:
        """How every session of this run scores: the standard decode layout whatever the training batch size, so
        that `ggfwd eval` with its defaults scores a saved adapter exactly as the run's own evaluation did, and
        `ggfwd train`, `ggfwd federate`, the Flower server and every node open the same session for the same
        inputs. `threads` is the one setting that belongs to the machine, not to the run."""
        return SessionSettings(max_tokens=self.max_tokens, threads=threads, kind=load_task(self.task).kind,
                               memory=self.memory)

    def load(self, session, seed: int = 0):
        """(training data or None, evaluation data or None, initial adapter), tokenized by `session` (no training
        data: a Flower server's inputs, whose nodes hold the data)."""
        task = load_task(self.task)
        tok = lambda examples: tokenize_examples(examples, task, session.tokenize, session.detokenize,
                                                 self.max_tokens)
        train = tok(load_examples(self.data, task, self.train_limit, self.min_words)) if self.data else None
        evaluation = tok(load_examples(self.eval_data, task, self.eval_limit)) if self.eval_data else None
        if self.adapter:
            adapter = LoraAdapter.load(self.adapter)
        else:
            adapter = LoraAdapter.create(session.base, self.target_list, rank=self.rank, alpha=self.alpha, seed=seed)
        return train, evaluation, adapter


def refuse_changed(saved: RunInputs, given: dict) -> None:
    """A resumed run reads what it read before: refuse any input option given with another value."""
    for key, value in given.items():
        if value is None or key not in RESUME_CHECKED:
            continue
        mine = getattr(saved, key)
        if isinstance(mine, str) and key in ("model", "adapter", "data", "eval_data") and mine is not None:
            same = Path(str(value)).resolve() == Path(mine).resolve()
        else:
            same = value == mine
        if not same:
            raise UserError(f"--{key.replace('_', '-')} {value} differs from the run's {mine}; "
                            "a resumed run keeps its inputs")
