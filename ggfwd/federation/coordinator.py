"""The coordinator's side of a Flower run (the ServerApp's body): `ggfwd serve` writes the run's description into
the run folder (serve.json); the ServerApp reads it, opens the model, and runs the remote federation (synchronous
rounds, remote.py, or asynchronous updates, remote_async.py) over the transport it is given."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write
from ..inputs import RunInputs
from ..run import RunPlan
from ..trainer import TrainConfig
from .messages import MessageError
from .remote import RemoteConfig, RemoteFederation
from .remote_async import RemoteAsyncFederation
from .simulate import SAVED_BEFORE

SERVE_FILE = "serve.json"  # written by `ggfwd serve` into the run folder: config, inputs, remote, threads, resume
ERROR_FILE = "server-error.txt"
LOG_FILE = "server.log"


def run_server(rundir, transport) -> None:
    """Run (or resume) the federation described by RUNDIR/serve.json over `transport`. A mistake is written to
    RUNDIR/server-error.txt as one line (for `ggfwd serve` to show) and raised."""
    rundir = Path(rundir)

    def log(line: str) -> None:
        with open(rundir / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(time.strftime("%H:%M:%S ") + line + "\n")

    try:
        _serve(rundir, transport, log)
    except (UserError, MessageError, OSError, ValueError) as exc:
        line = (str(exc).splitlines() or [type(exc).__name__])[0]
        atomic_write(rundir / ERROR_FILE, lambda f: f.write(line.encode()))
        log(f"error: {line}")
        raise


def _serve(rundir, transport, log) -> None:
    spec = json.loads((rundir / SERVE_FILE).read_text(encoding="utf-8"))
    config = TrainConfig.from_dict(spec["config"])
    inputs = RunInputs.from_dict(spec["inputs"])
    remote = RemoteConfig(**{**SAVED_BEFORE, **spec["remote"]})
    with inputs.session_settings(spec.get("threads")).open(inputs.model) as session:
        _, evaluation, adapter = RunPlan("serve", config, inputs, rundir).load(session)  # the nodes hold the data
        kind = RemoteAsyncFederation if remote.mode == "async" else RemoteFederation
        fed = kind(session, adapter, config, rundir, evaluation, inputs, remote=remote, transport=transport, log=log)
        if spec.get("resume"):
            log(f"resuming at round {fed.resume()}")
        log(f"waiting for {remote.min_nodes} node(s)")
        fed.wait_for_nodes()

        def on_step(record):
            acc = record.get("eval_accuracy")
            log(f"round {record['step']}: accepted {record.get('accepted', [])}, lost {record.get('lost', [])}"
                + ("" if acc is None else f", eval accuracy {acc:.4f}"))

        fed.run(on_step=on_step)
        log(f"done: {fed.counters.step} rounds")
