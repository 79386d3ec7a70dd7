"""The in-process federation on the real llama.cpp engine with a tiny model: one shared step, replay from
seeds and scalars, bounded messages, faults and hostile clients, resume."""

import json
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from clirun import run_cli
from ggfwd.federation import messages as msg
from ggfwd.federation.client import Client
from ggfwd.federation.messages import (Broadcast, Instruction, MessageError, Report, Snapshot, decode, encode,
                                      snapshot_sizes)
from ggfwd.federation.partition import label_skew, partition
from ggfwd.federation.simulate import FedConfig, Federation
from ggfwd.inputs import RunInputs
from ggfwd.modelstats import ModelStats
from ggfwd.profiles import load_profile
from ggfwd.session import SessionSettings
from ggfwd.trainer import Trainer, TrainConfig
from tinytask import make_tiny

PROFILE = """name = "{name}"
description = "test device"
kind = "laptop"
os = "linux"
backend = "cpu"
threads = 1
source = "written by the test"
[memory]
total_mib = 4096
budget_mib = 2048
source = "test"
[speed]
overhead_s = 0.01
source = "test"
[speed.gflops]
default = {gflops}
[network]
up_mbps = 10
down_mbps = 40
latency_ms = 50
source = "test"
[availability]
online = {online}
source = "test"
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    paths = make_tiny(root, labels="mixed", n_train=96, n_eval=32)
    profiles = root / "profiles"
    profiles.mkdir()
    for name, gflops, online in (("fast", 50.0, 1.0), ("slow", 2.0, 1.0), ("flaky", 20.0, 0.5)):
        (profiles / f"{name}.toml").write_text(PROFILE.format(name=name, gflops=gflops, online=online))
    paths["profiles"] = profiles
    inputs = RunInputs(model=str(paths["model"]), data=str(paths["train"]), eval_data=str(paths["eval"]),
                       task=str(paths["task"]), rank=4, alpha=8.0, max_tokens=64)
    session = SessionSettings(max_tokens=64, threads=1).open(inputs.model)
    paths.update(inputs=inputs, session=session, stats=ModelStats.from_gguf(inputs.model))
    yield paths
    session.close()


def config(**kw):
    return TrainConfig(**({"steps": 6, "batch_size": 8, "lr": 0.05, "eps": 0.1, "eval_every": 3} | kw))


def federation(tiny, rundir, cfg, devices, kind=Federation, **fed):
    f = FedConfig(**({"clients": len(devices), "clients_per_round": 2, "partition": "iid"} | fed))
    train, evaluation, adapter = tiny["inputs"].load(tiny["session"], cfg.seed)
    profiles = [load_profile(d, dirs=[tiny["profiles"]]) for d in devices]
    rundir.mkdir(parents=True, exist_ok=True)
    return kind(tiny["session"], adapter, train, cfg, rundir, eval_data=evaluation, inputs=tiny["inputs"],
                fed=f, profiles=profiles, model_stats=tiny["stats"])


# ----------------------------------------------------------------------------- the shared step
@pytest.mark.parametrize("weighting", ["equal", "examples", "directions"])
def test_one_client_federation_is_ggfwd_train_bitwise(tiny, tmp_path, weighting):
    """Under every client weighting, and with the step-size rule scaling the rate for the 2 directions."""
    cfg = config(clip=5.0, directions=2)
    train, evaluation, adapter = tiny["inputs"].load(tiny["session"], cfg.seed)
    (tmp_path / "train").mkdir()
    single = Trainer(tiny["session"], adapter, train, cfg, tmp_path / "train", evaluation, tiny["inputs"])
    single.run()
    assert [r["lr"] for r in single.run_dir.read_metrics() if r["step"] > 0] == [2 ** 0.5 * cfg.lr] * 6  # auto: sqrt
    fed = federation(tiny, tmp_path / "fed", cfg, ["fast"], clients_per_round=1, weighting=weighting)
    fed.run()
    assert fed.counters.step == single.counters.step == 6 and fed.counters.applied == 6
    assert np.array_equal(fed.theta, single.theta) and not np.array_equal(single.theta, adapter.params)
    one = [r["scalars"] for r in single.run_dir.read_metrics() if r["step"] > 0]
    many = [r["scalars"]["0"] for r in fed.run_dir.read_metrics() if r["step"] > 0]
    assert one == many


def test_clients_replay_the_server_bitwise_also_after_missing_rounds(tiny, tmp_path):
    cfg = config(steps=8, optimizer="adam", lr=0.02)
    fed = federation(tiny, tmp_path / "run", cfg, ["fast", "fast", "slow", "slow"], max_lag=8)
    fed.run()
    server = fed.server
    assert server.version == 8
    seen = [set(r["selected"]) for r in fed.run_dir.read_metrics() if r["step"] > 0]
    for client in fed.clients:
        last = max([i for i, s in enumerate(seen) if client.id in s], default=None)
        missed = server.version - (client.version if client.version is not None else 0)
        down = [decode(m) for m in server.catch_up(client.version)]
        replayed = client.sync(down)
        if client.version is not None and last is not None:
            assert replayed == missed and all(isinstance(m, Broadcast) for m in down)
        assert client.replica.version == server.version
        assert np.array_equal(client.replica.theta, server.replica.theta), client.id
        assert np.array_equal(client.replica.optimizer.v, server.replica.optimizer.v)
    # a client that missed at least 5 rounds caught up from broadcasts alone
    gaps = [8 - 1 - max(i for i, s in enumerate(seen) if c.id in s) for c in fed.clients if any(c.id in s for s in seen)]
    assert max(gaps) >= 1
    # a joiner replays the whole history from its own start adapter (fewer bytes than a snapshot), bitwise equal
    # to one that got the snapshot of trained values and optimizer state
    joiners = [Client(99 + j, fed.clients[0].data, fed.clients[0].estimator, cfg.seed, cfg.update_rule(),
                      start=fed.adapter.params) for j in range(2)]
    history = server.catch_up(None)
    assert [type(decode(m)) for m in history] == [Broadcast] * 8
    assert sum(map(len, history)) < len(server.snapshot())
    assert joiners[0].sync([decode(m) for m in history]) == 8
    assert joiners[1].sync([decode(server.snapshot())]) == 0
    for joiner in joiners:
        assert np.array_equal(joiner.replica.theta, server.replica.theta)
        assert all(np.array_equal(joiner.replica.optimizer.state_dict()[k], v)
                   for k, v in server.replica.optimizer.state_dict().items())
    # beyond max_lag rounds, a joiner gets the snapshot; a client within it gets the broadcasts
    server.max_lag = 5
    assert [type(decode(m)) for m in server.catch_up(None)] == [Snapshot]
    assert len(server.catch_up(8 - 5)) == 5


def test_a_client_that_missed_five_rounds_replays_them(tiny, tmp_path):
    """Client 3 is instructed only in round 0 and round 6 (count partition, 1 per round, fixed devices): between
    them it must replay five broadcasts, and its adapter then equals the server's."""
    cfg = config(steps=7)
    fed = federation(tiny, tmp_path / "run", cfg, ["fast"] * 4, clients_per_round=4, max_lag=10)
    fed.run(stop_after=1)
    lagging = fed.clients[3]
    assert lagging.version == 0
    fed.fed.clients_per_round = 3  # rounds 1-5: client 3 sits out (select is seeded; force it out)
    original = fed.select

    def without_3(r):
        online, selected, drops = original(r)
        return online, [c for c in range(3)], drops

    fed.select = without_3
    fed.run(stop_after=5)
    assert lagging.version == 0 and fed.server.version == 6
    down = [decode(m) for m in fed.server.catch_up(lagging.version)]
    assert [type(m) for m in down] == [Broadcast] * 6
    assert lagging.sync(down) == 6
    assert np.array_equal(lagging.replica.theta, fed.server.replica.theta)


def test_round_steps_scale_with_the_clients_and_weights_travel_in_the_broadcast(tiny, tmp_path):
    """4 clients of 1 direction at equal weights step at 4 x the base rate (linear scaling); weighted by examples
    (a count partition of unequal sizes) the broadcast carries the weights, every replica aggregates alike, and
    the step scales with the effective number of directions (fewer than 4)."""
    cfg = config(steps=3, eval_every=0, lr_scaling="linear")
    equal = federation(tiny, tmp_path / "equal", cfg, ["fast"] * 4, clients_per_round=4, weighting="equal")
    equal.run()
    rounds = [r for r in equal.run_dir.read_metrics() if r["step"] > 0]
    assert [r["lr"] for r in rounds] == [4 * cfg.lr] * 3 and all(r["effective_directions"] == 4 for r in rounds)
    assert all(decode(m).weights is None for m in equal.server.history.since(0))
    skewed = federation(tiny, tmp_path / "examples", cfg, ["fast"] * 4, clients_per_round=4,
                        partition="count:40,20,20,16", weighting="examples")
    skewed.run()
    broadcasts = [decode(m) for m in skewed.server.history.since(0)]
    assert all(b.weights.tolist() == [40, 20, 20, 16] for b in broadcasts)
    share = np.array([40, 20, 20, 16]) / 96
    rounds = [r for r in skewed.run_dir.read_metrics() if r["step"] > 0]
    assert all(r["effective_directions"] == pytest.approx(1 / np.sum(share ** 2), abs=1e-4) for r in rounds)
    assert rounds[0]["lr"] == pytest.approx(cfg.lr / np.sum(share ** 2))
    joiner = Client(9, skewed.clients[0].data, skewed.estimator, cfg.seed, cfg.update_rule(), start=skewed.adapter.params)
    joiner.sync(broadcasts)
    assert np.array_equal(joiner.replica.theta, skewed.server.replica.theta)


def test_a_batch_per_direction(tiny, tmp_path):
    """--spread batches: a client's K directions are scored on K batches of its own data (the ones it would
    draw over K one-direction rounds' worth of its epoch), and single-device training is still the one-client
    federation bitwise; K = 1 is the plain run bitwise."""
    cfg = config(steps=3, eval_every=0, directions=3, spread="batches")
    train, evaluation, adapter = tiny["inputs"].load(tiny["session"], cfg.seed)
    (tmp_path / "train").mkdir()
    single = Trainer(tiny["session"], adapter, train, cfg, tmp_path / "train", evaluation, tiny["inputs"])
    single.run()
    fed = federation(tiny, tmp_path / "fed", cfg, ["fast"], clients_per_round=1)
    fed.run()
    assert np.array_equal(fed.theta, single.theta)
    runs = {}
    for name, kw in (("plain", dict(directions=3)), ("one", dict(spread="batches")), ("one-plain", {})):
        (tmp_path / name).mkdir()
        runs[name] = Trainer(tiny["session"], adapter, train, config(steps=3, eval_every=0, **kw), tmp_path / name,
                             evaluation, tiny["inputs"])
        runs[name].run()
    assert not np.array_equal(runs["plain"].theta, single.theta)
    # round 0: direction 0 was scored on the plain run's batch (the epoch's first), directions 1 and 2 on the next
    spread_scalars = single.run_dir.read_metrics()[1]["scalars"]
    plain_scalars = runs["plain"].run_dir.read_metrics()[1]["scalars"]
    assert spread_scalars[0] == plain_scalars[0] and spread_scalars[1] != plain_scalars[1]
    assert spread_scalars[2] != plain_scalars[2]
    assert np.array_equal(runs["one"].theta, runs["one-plain"].theta)
    with pytest.raises(Exception, match="--spread batches needs --scheme central"):
        config(directions=3, spread="batches", scheme="centred").check()


def test_the_history_in_the_run_folder_survives_a_torn_tail(tiny, tmp_path):
    from ggfwd.federation.history import HISTORY, History

    cfg = config(steps=4, eval_every=0)
    fed = federation(tiny, tmp_path / "run", cfg, ["fast"] * 3)
    fed.run()
    path = tmp_path / "run" / HISTORY
    whole = path.read_bytes()
    records = fed.server.history.since(0)
    assert len(records) == 4 and whole == b"".join(len(r).to_bytes(4, "little") + r for r in records)
    path.write_bytes(whole[:-5])  # killed while appending round 3
    history = History(tmp_path / "run")
    history.load(3)
    assert history.since(0) == records[:3] and path.read_bytes() == whole[:len(whole) - 4 - len(records[3])]
    history = History(tmp_path / "run")
    history.load(4)  # round 3 is gone: no replay from round 0; clients then get snapshots
    assert history.since(0) is None and history.since(4) == [] and path.read_bytes() == b""
    damaged = bytearray(whole)
    damaged[10] ^= 1
    path.write_bytes(bytes(damaged))
    history = History(tmp_path / "run")
    history.load(2)
    assert history.since(0) is None  # round 0's checksum fails: nothing is trusted


def test_a_joiner_that_builds_another_start_adapter_is_refused(tiny, tmp_path):
    cfg = config(steps=2, eval_every=0)
    fed = federation(tiny, tmp_path / "run", cfg, ["fast"] * 2)
    fed.run()
    other = fed.adapter.params.copy()
    other[0] += 1.0
    joiner = Client(5, fed.clients[0].data, fed.estimator, cfg.seed, cfg.update_rule(), start=other)
    instruction = decode(fed.server.instruct(2, 5, 1, 8, cfg.eps, start=fed.start_digest))
    with pytest.raises(MessageError, match="another start adapter"):
        joiner.check_start(instruction)


# ----------------------------------------------------------------------------- messages
def test_messages_round_trip_and_their_sizes_are_the_counted_bytes(tiny, tmp_path):
    rng = np.random.default_rng(0)
    report = Report(3, 7, 3, rng.normal(size=16).astype(np.float32), 0.61, 0.02, 1234, 32)
    data = encode(report)
    back = decode(data, Report)
    assert np.array_equal(back.scalars, report.scalars) and back.tokens == 1234 and back.round == 3
    assert len(data) <= 1024  # 16 directions per client: at most 1 KiB up
    for clients, per in ((range(20), 10), (range(50), 4), (range(200), 1), (range(0, 600, 3), 1), ([7], 200)):
        entries = [(c, rng.normal(size=per).astype(np.float32)) for c in clients]
        bcast = encode(Broadcast.of(5, entries))
        assert len(bcast) <= 1024, (len(entries), per)  # 200 directions in a round: at most 1 KiB down per client
        assert [(c, s.tolist()) for c, s in decode(bcast).entries()] == [(c, s.tolist()) for c, s in entries]
    ins = Instruction(4, 4, 2, 3, 8, 0.1, float("inf"))
    assert decode(encode(ins)) == ins
    snap = Snapshot(2, rng.normal(size=100).astype(np.float32), {"m": np.ones(40, np.float32)}, 2)
    got = decode(encode(snap))
    assert np.array_equal(got.theta, snap.theta) and np.array_equal(got.state["m"], snap.state["m"]) and got.steps == 2
    assert snapshot_sizes([bcast, encode(snap), encode(ins)]) == [len(encode(snap))]  # a server's snapshot count
    # a federation's counted bytes are the lengths of the messages it sent
    cfg = config(steps=2)
    fed = federation(tiny, tmp_path / "run", cfg, ["fast"] * 3, clients_per_round=3)
    fed.run()
    rounds = [r for r in fed.run_dir.read_metrics() if r["step"] > 0]
    for r in rounds:
        n = len(r["accepted"])
        up = sum(len(encode(Report(r["step"] - 1, int(c), r["step"] - 1, np.float32(s), 0, 0, 0, 2)))
                 for c, s in r["scalars"].items())
        assert r["bytes_up"] > 0 and n == 3
        assert abs(r["bytes_up"] - up) <= 3 * 40  # same arrays; only the loss/token numbers' digits differ
    # round 0: the clients join from their own start adapter (no snapshot), then each gets round 0's broadcast
    assert rounds[0]["joined"] == 3 and rounds[0]["join_bytes"] == 0 and not rounds[0].get("snapshots")
    assert 3 * 100 < rounds[1]["bytes_down"] < 3 * 1024


def _valid_report():
    return encode(Report(0, 1, 0, np.array([0.5, -0.25], np.float32), 0.6, 0.01, 100, 4))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_messages_are_refused_with_a_clear_error(data):
    good = _valid_report()
    how = data.draw(st.sampled_from(["truncate", "flip", "append", "version", "garbage"]))
    if how == "truncate":
        bad = good[: data.draw(st.integers(0, len(good) - 1))]
    elif how == "flip":
        i = data.draw(st.integers(0, len(good) * 8 - 1))
        bad = bytearray(good)
        bad[i // 8] ^= 1 << (i % 8)
        bad = bytes(bad)
    elif how == "append":
        bad = good + data.draw(st.binary(min_size=1, max_size=64))
    elif how == "version":
        v = data.draw(st.integers(0, 65535).filter(lambda x: x != msg.FORMAT_VERSION))
        bad = good[:4] + v.to_bytes(2, "little") + good[6:]
    else:
        bad = data.draw(st.binary(max_size=200))
    with pytest.raises(MessageError) as exc:
        decode(bad)
    assert "\n" not in str(exc.value) and str(exc.value)


def _forge(header: dict, body: bytes = b"", kind: int = Report.KIND) -> bytes:
    head = json.dumps(header).encode()
    crc = zlib.crc32(body, zlib.crc32(head))
    return msg._FRAME.pack(msg.MAGIC, msg.FORMAT_VERSION, kind, len(head), len(body), crc) + head + body


@pytest.mark.parametrize("header, body, fragment", [
    ({"round": 0, "client": 1, "version": 0, "loss": 0, "loss_std": 0, "tokens": 1, "passes": 2,
      "_arrays": [["scalars", "f32", 3]]}, b"\0" * 8, "runs past the end"),
    ({"round": 0, "client": 1, "version": 0, "loss": 0, "loss_std": 0, "tokens": 1, "passes": 2,
      "_arrays": [["scalars", "f32", 10 ** 9]]}, b"", "is allowed"),
    ({"round": -1, "client": 1, "version": 0, "loss": 0, "loss_std": 0, "tokens": 1, "passes": 2,
      "_arrays": [["scalars", "f32", 1]]}, b"\0" * 4, "outside"),
    ({"round": 0, "client": 1, "version": 0, "loss": 0, "loss_std": 0, "tokens": 1, "passes": 2, "evil": 1,
      "_arrays": [["scalars", "f32", 1]]}, b"\0" * 4, "unknown fields"),
    ({"round": 0, "client": "1", "version": 0, "loss": 0, "loss_std": 0, "tokens": 1, "passes": 2,
      "_arrays": [["scalars", "f32", 1]]}, b"\0" * 4, "must be an integer"),
    ({"round": 0, "client": 1, "version": 0, "loss": 0, "loss_std": 0, "tokens": 1, "passes": 2,
      "_arrays": [["scalars", "f64", 1]]}, b"\0" * 8, "malformed array"),
])
def test_forged_messages_with_a_valid_checksum_are_refused(header, body, fragment):
    with pytest.raises(MessageError, match=fragment):
        decode(_forge(header, body))


def test_the_server_refuses_bad_reports_and_keeps_serving(tiny, tmp_path):
    cfg = config(steps=1)
    fed = federation(tiny, tmp_path / "run", cfg, ["fast"] * 3, clients_per_round=3)
    server = fed.server
    before = server.replica.theta.copy()
    for i in range(3):
        server.instruct(0, i, 2, 8, cfg.eps)
    ok = lambda c, k=2, r=0, v=0: encode(Report(r, c, v, np.full(k, 0.1, np.float32), 0.5, 0.0, 10, 2 * k))
    refused = {
        "wrong length": ok(0, k=3), "wrong round": ok(0, r=1), "not instructed": ok(7),
        "nan": encode(Report(0, 1, 0, np.array([np.nan, 1], np.float32), 0.5, 0.0, 10, 4)),
        "damaged": ok(1)[:-1] + b"\x00", "wrong version": ok(2, v=3),
    }
    for why, data in refused.items():
        with pytest.raises(MessageError):
            server.accept(data)
        assert np.array_equal(server.replica.theta, before), why
    accepted = [server.accept(ok(c)) for c in range(3)]
    with pytest.raises(MessageError, match="not instructed"):
        server.accept(ok(0))  # one report per client and round
    _, agg, reason = server.close_round(0, accepted)
    assert reason is None and agg.clients == 3 and agg.directions == 6
    assert not np.array_equal(server.replica.theta, before)


# ----------------------------------------------------------------------------- partitions
def test_partitions_put_every_example_in_exactly_one_client():
    labels = np.repeat([0, 1, 2], [300, 200, 100])
    for spec in ("iid", "dirichlet:0.5", "dirichlet:100"):
        parts = partition(spec, labels, len(labels), 12, seed=3)
        joined = np.concatenate(parts)
        assert len(parts) == 12 and min(map(len, parts)) >= 1
        assert np.array_equal(np.sort(joined), np.arange(len(labels)))
        assert partition(spec, labels, len(labels), 12, seed=3)[5].tolist() == parts[5].tolist()
    skew = {a: np.mean([label_skew(partition(f"dirichlet:{a}", labels, 600, 12, s), labels) for s in range(5)])
            for a in (0.1, 0.5, 100)}
    assert skew[0.1] > skew[0.5] > skew[100] and skew[0.1] > 0.85 and skew[100] < 0.6
    counts = partition("count:5,10,20", labels, 600, 3, seed=0)
    assert [len(p) for p in counts] == [5, 10, 20] and len(np.unique(np.concatenate(counts))) == 35


# ----------------------------------------------------------------------------- faults
def test_dropout_deadline_and_offline_clients(tiny, tmp_path):
    cfg = config(steps=6)
    fed = federation(tiny, tmp_path / "drop", cfg, ["fast", "fast", "flaky", "flaky"], clients_per_round=4,
                     dropout=0.4)
    fed.run()
    rounds = [r for r in fed.run_dir.read_metrics() if r["step"] > 0]
    assert sum(len(r.get("dropped", [])) for r in rounds) > 0
    assert any(r["online"] < 4 for r in rounds)  # the flaky profiles are online half the time
    for r in rounds:
        assert set(r["accepted"]) == set(r["selected"]) - set(r.get("dropped", []))
    # a deadline the slow device cannot meet: its reports are discarded and the round lasts until the deadline
    fast = federation(tiny, tmp_path / "fastonly", cfg, ["fast", "slow"], clients_per_round=2)
    fast.run(stop_after=1)
    times = fast.run_dir.read_metrics()[-1]["client_seconds"]
    assert times["1"] > times["0"] and fast.run_dir.read_metrics()[-1]["round_seconds"] == max(times.values())
    deadline = (times["0"] + times["1"]) / 2
    dl = federation(tiny, tmp_path / "deadline", cfg, ["fast", "slow"], clients_per_round=2, deadline=deadline)
    dl.run()
    rounds = [r for r in dl.run_dir.read_metrics() if r["step"] > 0]
    assert all(r["late"] == [1] and r["accepted"] == [0] and r["round_seconds"] == deadline for r in rounds)
    assert all(r["client_seconds"]["1"] > deadline >= r["client_seconds"]["0"] for r in rounds)


def test_hostile_clients_cannot_wreck_the_model(tiny, tmp_path):
    cfg = config(steps=8, clip=5.0, lr=0.05)
    devices = ["fast"] * 5
    honest = federation(tiny, tmp_path / "honest", cfg, devices, clients_per_round=5)
    honest.run()
    for kind in ("scale", "nan", "signs"):
        run = federation(tiny, tmp_path / kind, cfg, devices, clients_per_round=5, hostile=f"1:{kind}")
        run.run()
        rounds = [r for r in run.run_dir.read_metrics() if r["step"] > 0]
        if kind == "nan":
            assert all("4" in r["refused"] and 4 not in r["accepted"] for r in rounds)
        if kind == "scale":
            assert all(r["clipped"] >= 1 for r in rounds)
        shift = np.abs(run.theta - honest.theta).max()
        assert np.isfinite(run.theta).all() and shift < 10 * np.abs(honest.theta - honest.adapter.params).max()
        assert run.run_dir.read_metrics()[-1]["eval_loss"] < 1.5 * honest.run_dir.read_metrics()[-1]["eval_loss"]
    unclipped = federation(tiny, tmp_path / "unclipped", config(steps=2, clip=0.0), devices, clients_per_round=5,
                           hostile="1:scale")
    unclipped.run()
    assert np.abs(unclipped.theta).max() > 100 * np.abs(honest.theta).max()  # what the clip prevents


def test_killed_federation_resumes_bitwise(tiny, tmp_path):
    cfg = config(steps=6, optimizer="adam", lr=0.02, average_decay=0.8)
    devices = ["fast", "slow", "flaky", "fast"]
    full = federation(tiny, tmp_path / "full", cfg, devices)
    full.run()
    part = federation(tiny, tmp_path / "part", cfg, devices, clients_per_round=2)
    part.run(stop_after=4)
    again = federation(tiny, tmp_path / "part", cfg, devices, clients_per_round=2)
    assert again.resume() == 4
    again.run()
    assert np.array_equal(again.theta, full.theta)
    from ggfwd.adapter import LoraAdapter

    a = LoraAdapter.load(tmp_path / "full" / "adapter.gguf").params
    b = LoraAdapter.load(tmp_path / "part" / "adapter.gguf").params
    assert np.array_equal(a, b)
    keys = ("step", "selected", "accepted", "scalars", "loss", "eval_loss", "eval_accuracy")
    strip = lambda rs: [{k: r.get(k) for k in keys} for r in rs]
    assert strip(full.run_dir.read_metrics()) == strip(again.run_dir.read_metrics())
    # the restarted clients rejoined by replaying the history the server kept in the run folder (counted)
    resumed = [r for r in again.run_dir.read_metrics() if r["step"] == 5][0]
    assert resumed["joined"] == len(resumed["selected"]) and not resumed.get("snapshots")
    assert 0 < resumed["join_bytes"] < len(resumed["selected"]) * len(again.server.snapshot())
    assert (tmp_path / "part" / "history.bin").read_bytes() == (tmp_path / "full" / "history.bin").read_bytes()
    with pytest.raises(Exception, match="keeps its settings"):
        federation(tiny, tmp_path / "part", cfg, devices, clients_per_round=3).resume()


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("args, fragment", [
    (["--clients", "0"], "--clients must be >= 1"),
    (["--clients", "4", "--devices", "fast"], "PROFILE:COUNT"),
    (["--clients", "4", "--devices", "fast:3"], "lists 3 clients but --clients is 4"),
    (["--clients", "4", "--devices", "fast:x,slow:2"], "must be an integer"),
    (["--clients", "4", "--devices", "nosuch:4"], "nosuch"),
    (["--clients", "4", "--devices", "fast:4", "--partition", "dirichlet:-1"], "positive number"),
    (["--clients", "4", "--devices", "fast:4", "--partition", "zipf"], "--partition must be"),
    (["--clients", "4", "--devices", "fast:4", "--clients-per-round", "9"], "--clients-per-round"),
    (["--clients", "4", "--devices", "fast:4", "--hostile", "9:scale"], "--hostile"),
    (["--clients", "4", "--devices", "fast:4", "--weighting", "speed"], "--weighting must be one of"),
    (["--clients", "4", "--devices", "fast:4", "--lr-scaling", "log"], "--lr-scaling must be one of"),
    (["--clients", "4", "--devices", "fast:4", "--lr-scale-max", "nan"], "--lr-scale-max must be 0"),
    (["--clients", "4", "--devices", "fast:4", "--max-lag", "-1"], "--max-lag must be >= 0"),
])
def test_bad_federation_specs_are_one_line_errors(tiny, tmp_path, args, fragment):
    r = run_cli("federate", "--model", tiny["model"], "--data", tiny["train"], "--task", tiny["task"],
                "--profiles", tiny["profiles"], "--out", tmp_path / "run", *args)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and fragment in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_federate_cli_runs_resumes_and_plots(tiny, tmp_path):
    args = ["federate", "--model", tiny["model"], "--data", tiny["train"], "--eval-data", tiny["eval"],
            "--task", tiny["task"], "--profiles", tiny["profiles"], "--clients", 4, "--devices", "fast:2,slow:2",
            "--clients-per-round", 2, "--batch-size", 8, "--max-tokens", 64, "--rank", 4, "--threads", 1,
            "--eval-every", 2]
    r = run_cli(*args, "--rounds", 2, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "ggfwd federate" in r.stderr and "bytes per client and round: up" in " ".join(r.stderr.split())
    r = run_cli(*args, "--rounds", 4, "--out", tmp_path / "run", "--resume")
    assert r.returncode == 0, r.stderr
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == 4 and state["kind"] == "federate" and state["counters"]["bytes_up"] > 0
    r = run_cli("train", "--out", tmp_path / "run", "--resume")
    assert r.returncode == 2 and "not a 'train' run" in r.stderr
    at = args.index("--clients-per-round") + 1
    changed = args[:at] + [3] + args[at + 1:]  # not the run's 2
    r = run_cli(*changed, "--rounds", 5, "--out", tmp_path / "run", "--resume")
    assert r.returncode == 2 and "--clients-per-round 3 differs from the run's 2" in r.stderr, r.stderr
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 4
    r = run_cli("federate", "--out", tmp_path / "run", "--resume", "--rounds", 5, "--threads", 1,
                "--profiles", tiny["profiles"])  # the run's own settings, from its folder
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 5
    r = run_cli("plot", tmp_path / "run")
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # the no-extras (Termux) venv
        assert r.returncode == 2 and "needs matplotlib" in r.stderr
    else:
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_node_keeps_its_replica_when_only_the_run_length_changes(tiny):
    """A node keeps its replica under the run's key. Resuming with more --rounds is the one change a run allows
    and leaves every replica valid, so it keeps the key; any other setting, the inputs or the model give a new
    one (the node then asks for a snapshot)."""
    from ggfwd.federation.node import parse_run
    from ggfwd.federation.handshake import run_settings

    key = lambda cfg, inputs=tiny["inputs"]: parse_run(run_settings(cfg, inputs))["key"]  # noqa: E731
    base = key(config())
    assert key(config(steps=60)) == base
    assert len({base, key(config(lr=0.5)), key(config(seed=1)),
                key(config(), RunInputs(**{**tiny["inputs"].to_dict(), "rank": 2}))}) == 4
