"""The Flower ServerApp and ClientApp of `ggfwd serve` / `ggfwd join` (with `launch`, the only modules that import
flwr).

Both are thin: the ServerApp runs `coordinator.run_server` with a transport over Flower's Grid, the ClientApp hands
each message to the node's warm worker (`worker.call`: a loopback connection authenticated with the node's
secret) and returns its reply. The ClientApp imports neither llama_cpp nor ggfwd's training code: Flower starts
a fresh process for every message (forked from a pre-imported zygote, see `launch`), and this one only forwards.
What travels is the federation's own records (`messages.encode`), as a list of bytes values in one ConfigRecord:

    RecordDict({"ggfwd": ConfigRecord({"kind": "hello" | "train" | "report" | "need" | "error",
                                       "m": [record bytes, ...], "text": "reason of an error"})})

Hellos go as QUERY messages, rounds as TRAIN messages. The bytes on the wire are measured at the Flower message
level: the serialized size of every object Flower pushes for a message (the Message, its RecordDict and its
ConfigRecord, as `deflate()` gives them), before HTTP and TLS framing.

No idle polling on the hot path: the ServerApp pushes a round's instructions (`grid.push_messages`) and pulls the
replies every `PULL_EVERY` seconds until all are in or the round's deadline passes, instead of
`grid.send_and_receive`, which sleeps 3 s between pulls.

Timing (for `scripts/bench_flower.py`, off unless GGFWD_TIMING=1 is in the environment of `ggfwd serve` and
`ggfwd join`): the ServerApp appends each exchange's push time and each reply's arrival time to
RUNDIR/flower-timing.jsonl, and each ClientApp appends its process start, its start and end of handling and the
worker call's duration to NODE_FOLDER/timing.jsonl. On one machine the clocks agree, so a round's time splits into
its parts.

Settings reach the apps through Flower's configs: the run config `run-dir` (the server's run folder, read by the
ServerApp) and `ggfwd-run` (the run settings every node checks, `handshake.run_settings`), and each SuperNode's
node config `ggfwd-node` (its node.json, written by `ggfwd join`).
"""

from __future__ import annotations

import json
import os
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .messages import MessageError
from .worker import ChannelError, call

KEY = "ggfwd"
MAX_REPLY = 1 << 20  # bytes of records in one reply (a report is < 20 KiB)
MAX_REQUEST = 1 << 30  # bytes of records in one request (a snapshot of a large adapter)
REPLY_KINDS = ("hello", "report", "need", "error")  # as remote.REPLY_KINDS (not imported: the ClientApp stays light)
PULL_EVERY = 0.02  # seconds between the ServerApp's pulls of a round's replies


def _content(kind: str, data: list, text: str = "") -> RecordDict:
    return RecordDict({KEY: ConfigRecord({"kind": kind, "m": [bytes(b) for b in data], "text": text[:500]})})


def _unpack(msg: Message, kinds, limit: int) -> tuple[str, list, str]:
    """(kind, records, text) of a ggfwd message; MessageError when it is not one or is out of bounds."""
    if msg.has_error():
        return "error", [], f"Flower error {msg.error.code}: {msg.error.reason}"[:500]
    record = msg.content.get(KEY) if msg.has_content() else None
    if not isinstance(record, ConfigRecord):
        raise MessageError("not a ggfwd message")
    kind, data, text = record.get("kind"), record.get("m", []), record.get("text", "")
    if kind not in kinds or not isinstance(data, list) or not all(isinstance(b, bytes) for b in data) \
            or not isinstance(text, str):
        raise MessageError("a ggfwd message with a malformed kind, records or text")
    if sum(map(len, data)) > limit or len(data) > 1024:
        raise MessageError(f"a ggfwd message over {limit} bytes")
    return kind, data, text[:500]


def wire_bytes(msg: Message) -> int:
    """Serialized bytes of the objects Flower pushes for `msg` (Message, RecordDict, records)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


# ----------------------------------------------------------------------------- server side
class FlowerTransport:
    """`remote.RemoteFederation`'s transport over a Flower Grid."""

    def __init__(self, grid: Grid, timing=None):
        self.grid = grid
        self.timing = timing  # a file to append each exchange's times to (GGFWD_TIMING=1), or None

    def nodes(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def send(self, kind: str, requests: dict) -> tuple[dict, dict]:
        """Push `{node: [bytes, ...]}` as messages of `kind`; returns ({node: message id}, {node: bytes sent})."""
        if not requests:
            return {}, {}
        mtype = MessageType.QUERY if kind == "hello" else MessageType.TRAIN
        nodes = list(requests)
        messages = [Message(content=_content(kind, requests[n]), dst_node_id=n, message_type=mtype) for n in nodes]
        sent = {n: wire_bytes(m) for n, m in zip(nodes, messages)}
        return dict(zip(nodes, self.grid.push_messages(messages))), sent

    def collect(self, handles: dict, timeout: float) -> dict:
        """The replies to the messages `handles` ({node: message id}) that are in: pulled every `PULL_EVERY`
        seconds until at least one is, or `timeout` seconds passed. Returns {node: Reply}."""
        from .remote import Reply

        end = time.monotonic() + max(0.0, timeout)
        node_of = {h: n for n, h in handles.items()}
        while True:
            pulled = [m for m in self.grid.pull_messages(list(node_of)) if m.metadata.reply_to_message_id in node_of]
            if pulled or time.monotonic() >= end:
                break
            time.sleep(min(PULL_EVERY, max(0.0, end - time.monotonic())))
        replies = {}
        for reply in pulled:
            node = node_of[reply.metadata.reply_to_message_id]
            try:
                kind_, data, text = _unpack(reply, REPLY_KINDS, MAX_REPLY)
            except MessageError as exc:
                kind_, data, text = "error", [], str(exc)
            replies[node] = Reply(kind_, data, wire_bytes(reply) if not reply.has_error() else 0, text)
        return replies

    def exchange(self, kind: str, requests: dict, timeout: float):
        """Send, then wait up to `timeout` seconds for every reply: ({node: Reply} in time, {node: bytes sent})."""
        end, pushed_at = time.monotonic() + max(0.1, timeout), time.time()
        handles, sent = self.send(kind, requests)
        replies, arrived = {}, {}
        while len(replies) < len(handles) and time.monotonic() < end:
            got = self.collect({n: h for n, h in handles.items() if n not in replies}, end - time.monotonic())
            replies.update(got)
            arrived.update({str(n): time.time() for n in got})
        if self.timing is not None and handles:
            _append(self.timing, {"kind": kind, "push": pushed_at, "replies": arrived})
        return replies, sent


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from pathlib import Path

    from .launch import short_object_backoff
    from .coordinator import run_server

    short_object_backoff()  # replies are pulled as soon as they are in (see launch.py)
    rundir = str(context.run_config["run-dir"])
    timing = Path(rundir) / "flower-timing.jsonl" if os.environ.get("GGFWD_TIMING") == "1" else None
    run_server(rundir, FlowerTransport(grid, timing))


def _append(path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _process_start() -> float | None:
    """When this process started (Linux: /proc), for the timing breakdown; None elsewhere."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(float(x.split()[1]) for x in open("/proc/stat") if x.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# ----------------------------------------------------------------------------- node side
client_app = ClientApp()


def _handle(msg: Message, context: Context, kind: str) -> Message:
    """Forward the message's records to this node's worker (its folder is where node.json lies) and wrap its
    reply; a worker that cannot be reached, or refuses, gives an error reply with the reason."""
    from pathlib import Path

    entered = time.time()
    folder = timing = None
    try:
        folder = Path(str(context.node_config["ggfwd-node"])).parent
        _, data, _ = _unpack(msg, (kind,), MAX_REQUEST)
        run = context.run_config.get("ggfwd-run")
        if not isinstance(run, str):
            raise MessageError("the run settings are missing")
        called = time.time()
        reply_kind, text, records = call(folder, kind, run, data)
        timing = {"call_s": time.time() - called}
        if reply_kind not in REPLY_KINDS:
            raise MessageError(f"the node worker answered a '{reply_kind}'")
        reply = Message(content=_content(reply_kind, records, text if reply_kind == "error" else ""), reply_to=msg)
    except (ChannelError, MessageError, KeyError) as exc:  # refused, with a reason the server logs
        reply = Message(content=_content("error", [], " ".join(str(exc).split())), reply_to=msg)
    if folder is not None and os.environ.get("GGFWD_TIMING") == "1":
        _append(folder / "timing.jsonl", {"kind": kind, "node": int(context.node_id), "process": _process_start(),
                                          "in": entered, "out": time.time(), **(timing or {})})
    return reply


@client_app.query()
def _hello(msg: Message, context: Context) -> Message:
    return _handle(msg, context, "hello")


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return _handle(msg, context, "train")
