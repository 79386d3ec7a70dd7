"""The Flower ServerApp and ClientApp of `ggfwd serve` / `ggfwd join`: the only module that imports flwr.

Both are thin: the ServerApp runs `remote.run_server` with a transport over Flower's Grid, the ClientApp hands
each message to `node.Node`. What travels is the federation's own records (`messages.encode`), as a list of
bytes values in one ConfigRecord:

    RecordDict({"ggfwd": ConfigRecord({"kind": "hello" | "train" | "report" | "need" | "error",
                                       "m": [record bytes, ...], "text": "reason of an error"})})

Hellos go as QUERY messages, rounds as TRAIN messages. The bytes on the wire are measured at the Flower message
level: the serialized size of every object Flower pushes for a message (the Message, its RecordDict and its
ConfigRecord, as `deflate()` gives them), before HTTP and TLS framing.

Settings reach the apps through Flower's configs: the run config `run-dir` (the server's run folder, read by the
ServerApp) and `ggfwd-run` (the run settings every node checks, `handshake.run_settings`), and each SuperNode's
node config `ggfwd-node` (its node.json, written by `ggfwd join`).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..errors import UserError
from .messages import MessageError
from .remote import REPLY_KINDS, Reply

KEY = "ggfwd"
MAX_REPLY = 1 << 20  # bytes of records in one reply (a report is < 20 KiB)
MAX_REQUEST = 1 << 30  # bytes of records in one request (a snapshot of a large adapter)


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

    def __init__(self, grid: Grid):
        self.grid = grid

    def nodes(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def exchange(self, kind: str, requests: dict, timeout: float):
        if not requests:
            return {}, {}
        mtype = MessageType.QUERY if kind == "hello" else MessageType.TRAIN
        messages = {node: Message(content=_content(kind, data), dst_node_id=node, message_type=mtype)
                    for node, data in requests.items()}
        sent = {node: wire_bytes(m) for node, m in messages.items()}
        replies = {}
        for reply in self.grid.send_and_receive(list(messages.values()), timeout=max(0.1, timeout)):
            node = int(reply.metadata.src_node_id)
            if node not in requests:
                continue
            try:
                kind_, data, text = _unpack(reply, REPLY_KINDS, MAX_REPLY)
            except MessageError as exc:
                kind_, data, text = "error", [], str(exc)
            replies[node] = Reply(kind_, data, wire_bytes(reply) if not reply.has_error() else 0, text)
        return replies, sent


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from .remote import run_server

    run_server(str(context.run_config["run-dir"]), FlowerTransport(grid))


# ----------------------------------------------------------------------------- node side
client_app = ClientApp()


def _handle(msg: Message, context: Context, kind: str) -> Message:
    from .node import Node

    try:
        _, data, _ = _unpack(msg, (kind,), MAX_REQUEST)
        node = Node(str(context.node_config["ggfwd-node"]))
        run = context.run_config.get("ggfwd-run")
        if kind == "hello":
            reply_kind, records = "hello", [node.hello(run)]
        else:
            reply_kind, records = node.train(run, data)
        return Message(content=_content(reply_kind, records), reply_to=msg)
    except (UserError, MessageError, KeyError) as exc:  # refused, with a reason the server logs
        return Message(content=_content("error", [], " ".join(str(exc).split())), reply_to=msg)


@client_app.query()
def _hello(msg: Message, context: Context) -> Message:
    return _handle(msg, context, "hello")


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return _handle(msg, context, "train")
