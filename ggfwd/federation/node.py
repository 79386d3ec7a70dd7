"""A node's side of a remote federation (`ggfwd join`): its own data, model copy and replica, kept warm between
messages by the node worker (`worker.py`), with a node folder that outlives the worker.

The node folder holds `node.json` (what `ggfwd join` was given: model, data, profile, client id, threads, task)
and `replica.npz` (the node's replica of the trained state and the client id it holds, for one run). `Node` is
what the worker holds for the whole run: the llama.cpp session, the tokenized local data, the version-0
adapter, the estimator, and the replica, opened right after the run's hello (`prepare`) and reused
by every later one; the replica is also written atomically to `replica.npz` after every catch-up, so a restarted
worker (or a node restarted by its user) resumes from it and catches up from broadcasts or a snapshot.

A train message is the records `Server.catch_up` and `Server.instruct` produced, in order. The node applies the
snapshot or broadcasts (skipping broadcasts it already applied), answers `need` when it cannot reach the
instructed version, else scores its batch with the unchanged `Client` and answers with the `Report`. Every record
is decoded with bounds (`messages.decode`); the run's settings (from the server) are checked like a command
line's.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base import check_gguf_file
from ..errors import UserError
from ..files import atomic_write
from ..run import RunPlan
from ..session import check_memory
from ..tasks import load_examples, load_task
from ..update import Replica
from .client import Client, NeedsAdapter
from .handshake import hello_reply, model_fingerprint, parse_run
from .messages import Broadcast, Instruction, MessageError, Snapshot, decode, encode

NODE_FILE = "node.json"
REPLICA_FILE = "replica.npz"


@dataclass
class NodeSettings:
    model: str
    data: str
    profile: str = ""
    client: int | None = None  # the client id asked for (None: the server assigns one)
    threads: int | None = None
    task: str | None = None  # None: the run's task
    memory: str = "standard"  # how this device's session holds the model (session.MEMORY_MODES)

    def check(self) -> None:
        check_memory(self.memory)
        check_gguf_file(Path(self.model), "model")
        if not Path(self.data).is_file():
            raise UserError(f"training data file not found: {self.data}")
        if self.client is not None and not 0 <= self.client < 2**32:
            raise UserError(f"--client-id must be >= 0, got {self.client}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1, got {self.threads}")
        if len(self.profile) > 64:
            raise UserError("--profile names a profile of at most 64 characters")

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / NODE_FILE
        data = {"model": str(Path(self.model).resolve()), "data": str(Path(self.data).resolve()),
                "profile": self.profile, "client": self.client, "threads": self.threads, "task": self.task,
                "memory": self.memory}
        atomic_write(path, lambda f: f.write(json.dumps(data, indent=1).encode()))
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> "NodeSettings":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(**{k: d[k] for k in ("model", "data", "profile", "client", "threads", "task")},
                       memory=d.get("memory", "standard"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"node settings {path} cannot be read: {exc}") from None


class _Warm:
    """What a node keeps open for one run: session, data, start adapter, estimator, and its replica."""

    def __init__(self, key: str, stack: ExitStack, config, rule, train, adapter, perturbations, estimator):
        self.key, self.stack, self.config, self.rule = key, stack, config, rule  # rule: the run's update rule
        self.train, self.adapter, self.perturbations, self.estimator = train, adapter, perturbations, estimator
        self.client: int | None = None  # the client id `replica` belongs to
        self.replica = None  # the replica as last written to replica.npz (None: read it from there)


class Node:
    def __init__(self, settings_path: str | os.PathLike):
        self.settings = NodeSettings.read(settings_path)
        self.folder = Path(settings_path).parent
        self.warm: _Warm | None = None
        self._fingerprint: str | None = None

    def close(self) -> None:
        """Close the session (the next message opens it again)."""
        warm, self.warm = self.warm, None
        if warm is not None:
            warm.stack.close()

    def _open(self, run: dict) -> _Warm:
        """The run's session, data and estimator: kept from an earlier message of the same run, else opened."""
        if self.warm is not None and self.warm.key == run["key"]:
            return self.warm
        self.close()
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.settings.model)
        if self._fingerprint != run["model"]:
            raise UserError(f"{self.settings.model} is not the run's model")
        c = run["config"]
        inputs = run["inputs"]
        inputs.model, inputs.data = self.settings.model, self.settings.data
        inputs.task = self.settings.task or inputs.task
        inputs.memory = self.settings.memory  # a device's own choice: its scalars are its own estimates
        stack = ExitStack()
        try:
            plan = RunPlan("node", c, inputs, self.folder)
            session = stack.enter_context(inputs.session_settings(self.settings.threads).open(inputs.model))
            train, _, adapter = plan.load(session)
            perturbations = c.perturbations(adapter)
            estimator = c.estimator(session, perturbations)
            session.set_adapter(adapter)
        except BaseException:
            stack.close()
            raise
        self.warm = _Warm(run["key"], stack, c, run["rule"], train, adapter, perturbations, estimator)
        return self.warm

    # ----------------------------------------------------------------- state between messages
    def _held(self, run_key: str) -> tuple[int | None, dict | None]:
        """(client id, replica arrays) kept for this run, or (asked-for id, None)."""
        path = self.folder / REPLICA_FILE
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
                if str(arrays.pop("run")) == run_key:
                    return int(arrays.pop("client")), arrays
            except (OSError, ValueError, KeyError):
                pass  # damaged: start again from a snapshot
        return self.settings.client, None

    def _keep(self, run_key: str, client: int, replica) -> None:
        arrays = {**replica.state_dict(), "run": np.asarray(run_key), "client": np.asarray(client, np.int64)}
        atomic_write(self.folder / REPLICA_FILE, lambda f: np.savez(f, **arrays))

    # ----------------------------------------------------------------- messages
    def hello(self, run_text) -> bytes:
        run = parse_run(run_text)
        client, arrays = self._held(run["key"])
        version = int(arrays["version"]) if arrays is not None else None
        task = load_task(self.settings.task or run["inputs"].task)
        examples = len(load_examples(self.settings.data, task, None, run["inputs"].min_words))
        return hello_reply(client, version, self.settings.profile, examples)

    def prepare(self, run_text) -> None:
        """Open the run's session and data now (the worker calls this after answering a hello), so that the
        first round finds them warm; a problem is left for that round's train message to report."""
        try:
            self._open(parse_run(run_text))
        except Exception:  # noqa: BLE001
            self.close()

    def train(self, run_text, payload: list) -> tuple[str, list[bytes]]:
        """("report", [report]) or ("need", []): the node cannot reach the instructed adapter version."""
        run = parse_run(run_text)
        messages = [decode(m) for m in payload]
        if not messages or not isinstance(messages[-1], Instruction) or \
                not all(isinstance(m, (Snapshot, Broadcast)) for m in messages[:-1]):
            raise MessageError("a train message is snapshots or broadcasts followed by one instruction")
        instruction = messages[-1]
        asked = self.settings.client
        if asked is not None and instruction.client != asked:
            raise MessageError(f"instructed as client {instruction.client}; this node is client {asked}")
        w = self._open(run)
        c = w.config
        if w.replica is not None and w.client == instruction.client:
            replica = w.replica
        else:
            replica = None
            held_client, arrays = self._held(run["key"])
            if arrays is not None and held_client == instruction.client:
                replica = Replica(w.adapter.params, w.perturbations.index, w.rule)
                replica.load_state_dict(arrays)
        w.replica = w.client = None  # until the replica on disk is this one again
        client = Client(instruction.client, w.train, w.estimator, c.seed, w.rule, c.clip, replica=replica,
                        start=w.adapter.params)
        client.track = instruction.candidates > 0
        client.check_start(instruction)
        have = client.version
        todo = [m for m in messages[:-1] if not (isinstance(m, Broadcast) and have is not None and m.round < have)]
        try:
            client.sync(todo)
            if client.version != instruction.version:
                raise NeedsAdapter(f"at version {client.version}, the round needs {instruction.version}")
        except NeedsAdapter:
            return "need", []
        self._keep(run["key"], client.id, client.replica)
        w.replica, w.client = client.replica, client.id
        report, _ = client.work(instruction)
        return "report", [encode(report)]
