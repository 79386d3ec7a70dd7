"""Asynchronous rounds and client memory on the real llama.cpp (tiny model): replicas, staleness, resume, pacing."""

import numpy as np
import pytest

from clirun import run_cli
from ggfwd.clientmemory import ClientMemory, staleness_weight
from ggfwd.federation.allocation import TrendPacer
from ggfwd.federation.asynchronous import AsyncFederation
from ggfwd.federation.client import Client
from ggfwd.federation.messages import Broadcast, MessageError, Snapshot, decode, encode
from ggfwd.federation.simulate import traffic
from ggfwd.trainer import Trainer
from test_federation import PROFILE, config, federation, tiny  # noqa: F401  (the module's tiny model and helpers)


@pytest.fixture
def far(tiny):  # noqa: F811
    """A profile whose round trip (2 s latency) is 40x the others': its reports arrive many updates late."""
    text = PROFILE.format(name="far", gflops=2.0, online=1.0).replace("latency_ms = 50", "latency_ms = 2000")
    (tiny["profiles"] / "far.toml").write_text(text)
    return "far"


def async_federation(tiny, rundir, cfg, devices, **fed):  # noqa: F811
    return federation(tiny, rundir, cfg, devices, kind=AsyncFederation,
                      **({"mode": "async", "max_staleness": 4} | fed))


def rounds(run):
    return [r for r in run.run_dir.read_metrics() if r["step"] > 0]


def test_one_async_client_with_one_report_per_update_is_ggfwd_train_bitwise(tiny, tmp_path):  # noqa: F811
    # the step rule given explicitly: `auto` is the base rate when reports may be stale, sqrt in `ggfwd train`
    cfg = config(clip=5.0, directions=2, lr_scaling="sqrt")
    train, evaluation, adapter = tiny["inputs"].load(tiny["session"], cfg.seed)
    (tmp_path / "train").mkdir()
    single = Trainer(tiny["session"], adapter, train, cfg, tmp_path / "train", evaluation, tiny["inputs"])
    single.run()
    run = async_federation(tiny, tmp_path / "async", cfg, ["fast"], clients_per_round=1)
    run.run()
    assert run.counters.step == 6 and np.array_equal(run.theta, single.theta)
    assert [r["scalars"] for r in single.run_dir.read_metrics() if r["step"] > 0] == [r["scalars"]["0"] for r in rounds(run)]


def test_memory_replays_bitwise_on_every_replica_and_slow_clients_count_while_fresh(tiny, tmp_path, far):  # noqa: F811
    cfg = config(steps=30, optimizer="adam", lr=0.02, eval_every=0)
    run = async_federation(tiny, tmp_path / "run", cfg, ["fast", "fast", "slow", far], max_staleness=30)
    run.run()
    rs = rounds(run)
    # clients work back to back: the fast ones report every update, the slow one's reports arrive stale
    assert all(len(r["accepted"]) == 2 for r in rs)
    ages = [a["age"] for r in rs for a in r["arrivals"].values()]
    assert max(ages) <= 30 and max(ages) >= 5
    # every update counts each client in the memory once, within the staleness limit, with staleness weights
    for r in rs:
        shares = r["update_shares"]
        assert abs(sum(s for s, _ in shares.values()) - 1) < 1e-3 and all(age <= 30 for _, age in shares.values())
    assert any(len(r["update_shares"]) > len(r["accepted"]) for r in rs)  # absent clients still count
    # every client's replica, a joiner replaying the history and one given a snapshot hold the server's bits,
    # the memory included
    server = run.server
    joiners = [Client(90 + j, run.clients[0].data, run.clients[0].estimator, cfg.seed, run.rule,
                      start=run.adapter.params) for j in range(2)]
    joiners[0].sync([decode(m) for m in server.catch_up(None)])
    snapshot = decode(server.snapshot())
    assert isinstance(snapshot, Snapshot) and snapshot.memory is not None
    joiners[1].sync([snapshot])
    for client in run.clients + joiners:
        client.sync([decode(m) for m in server.catch_up(client.version)])
        state, want = client.replica.state_dict(), server.replica.state_dict()
        assert set(state) == set(want) and all(np.array_equal(state[k], want[k]) for k in want), client.id
    # a damaged memory in a snapshot is refused with one line
    bad = Snapshot(snapshot.version, snapshot.theta, snapshot.state, snapshot.steps,
                   {**snapshot.memory, "versions": snapshot.memory["versions"] + 100})
    with pytest.raises(MessageError, match="memory"):
        decode(encode(bad))


def test_without_memory_each_report_counts_once_at_its_staleness_weight(tiny, tmp_path, far):  # noqa: F811
    cfg = config(steps=20, eval_every=0)
    run = async_federation(tiny, tmp_path / "run", cfg, ["fast", "fast", "slow", far], max_staleness=30,
                           client_memory=False)
    run.run()
    assert run.replica.memory is None
    rs = rounds(run)
    for r in rs:
        assert sorted(map(int, r["update_shares"])) == sorted(r["accepted"])
        ages = {str(i): a["age"] for i, a in r["arrivals"].items()}
        assert {i: age for i, (_, age) in r["update_shares"].items()} == ages
    assert any(age > 0 for r in rs for a in r["arrivals"].values() for age in [a["age"]])
    for client in run.clients:
        client.sync([decode(m) for m in run.server.catch_up(client.version)])
        assert np.array_equal(client.replica.theta, run.server.replica.theta)


def test_reports_older_than_the_staleness_limit_are_refused_and_the_client_starts_again(tiny, tmp_path, far):  # noqa: F811
    cfg = config(steps=60, eval_every=0)
    run = async_federation(tiny, tmp_path / "run", cfg, ["fast", "fast", far], max_staleness=5)
    run.run()
    rs = rounds(run)
    refused = [why for r in rs for why in r.get("refused", {}).values()]
    assert refused and all("updates old (at most 5)" in why for why in refused)
    assert all(a["age"] <= 5 for r in rs for a in r["arrivals"].values())
    assert all(age <= 5 for r in rs for _, age in r["update_shares"].values())
    assert all(r["accepted"] != [2] for r in rs)


def test_killed_async_federation_resumes_bitwise(tiny, tmp_path):  # noqa: F811
    cfg = config(steps=8, optimizer="adam", lr=0.02)
    devices = ["fast", "slow", "flaky", "fast"]
    kw = dict(max_staleness=3, dropout=0.2, pacing="trend", pacing_max=4)
    full = async_federation(tiny, tmp_path / "full", cfg, devices, **kw)
    full.run()
    part = async_federation(tiny, tmp_path / "part", cfg, devices, **kw)
    part.run(stop_after=5)
    again = async_federation(tiny, tmp_path / "part", cfg, devices, **kw)
    assert again.resume() == 5
    again.run()
    assert np.array_equal(again.theta, full.theta)
    keys = ("step", "accepted", "arrivals", "scalars", "update_shares", "sim_seconds", "eval_loss", "pacing")
    strip = lambda rs: [{k: r.get(k) for k in keys} for r in rs]
    assert strip(full.run_dir.read_metrics()) == strip(again.run_dir.read_metrics())
    assert any(r.get("dropped") for r in rounds(full)) or any(r.get("offline") for r in rounds(full))


def test_a_hostile_clients_memory_entry_stays_bounded_by_the_clip(tiny, tmp_path):  # noqa: F811
    cfg = config(steps=8, clip=5.0, lr=0.05)
    devices = ["fast"] * 4 + ["slow"]
    honest = async_federation(tiny, tmp_path / "honest", cfg, devices, max_staleness=6)
    honest.run()
    run = async_federation(tiny, tmp_path / "scale", cfg, devices, max_staleness=6, hostile="1:scale")
    run.run()
    rs = rounds(run)
    held = [r for r in rs if "4" in r["update_shares"]]
    assert held and all(r["clipped"] >= 1 for r in held)  # clipped at every update its entry is part of
    shift = np.abs(run.theta - honest.theta).max()
    assert np.isfinite(run.theta).all() and shift < 10 * np.abs(honest.theta - honest.adapter.params).max()


def test_sync_rounds_with_memory_keep_absent_clients_and_stay_bitwise_for_replicas(tiny, tmp_path):  # noqa: F811
    cfg = config(steps=6)
    run = federation(tiny, tmp_path / "run", cfg, ["fast", "fast", "slow", "slow"], clients_per_round=1,
                     max_staleness=3)
    run.run()
    rs = rounds(run)
    assert any(len(r["update_shares"]) > 1 for r in rs)
    assert all(age <= 3 for r in rs for _, age in r["update_shares"].values())
    for client in run.clients:
        client.sync([decode(m) for m in run.server.catch_up(client.version)])
        assert np.array_equal(client.replica.theta, run.server.replica.theta)


def test_broadcast_ages_travel_in_a_byte_and_bytes_stay_under_a_kib_up_to_200_directions():
    rng = np.random.default_rng(0)
    reports = [(c, rng.standard_normal(10).astype(np.float32)) for c in range(20)]
    ages = [int(a) for a in rng.integers(0, 60, 20)]
    b = Broadcast.of(7 + 60, reports, weights=None, ages=ages)
    data = encode(b)
    assert len(data) <= 1024, len(data)
    back = decode(data)
    assert back.ages.tolist() == ages and back.entries()[3][0] == 3
    assert Broadcast.of(5, reports, ages=[0] * 20).ages is None  # a synchronous round sends no ages
    with pytest.raises(MessageError, match="before version 0"):
        decode(encode(Broadcast.of(3, reports[:2], ages=[1, 9])))


def test_auto_step_rule_is_the_base_rate_when_reports_may_be_stale(tiny, tmp_path):  # noqa: F811
    run = async_federation(tiny, tmp_path / "run", config(steps=3, eval_every=0), ["fast"] * 3)
    run.run()
    assert all(r["lr"] == 0.05 and r["effective_directions"] > 1 for r in rounds(run))  # auto: none
    sync = federation(tiny, tmp_path / "sync", config(steps=2, eval_every=0), ["fast"] * 3)
    sync.run()
    assert all(r["lr"] == pytest.approx(0.05 * r["effective_directions"] ** 0.5) for r in rounds(sync))


def test_client_memory_expires_and_weights_by_staleness():
    m = ClientMemory(2)
    m.admit(0, [(0, np.ones(2, np.float32)), (1, np.ones(1, np.float32))], weights=[2.0, 1.0])
    m.admit(2, [(1, np.ones(1, np.float32))], ages=[1])
    reports, weights, seeds = m.rows(2)
    assert [r[0] for r in reports] == [0, 1] and seeds == [0, 1]
    assert weights == [2.0 * staleness_weight(2), 1.0 * staleness_weight(1)]
    assert [r[0] for r in m.rows(3)[0]] == [1]  # client 0's entry (version 0) is 3 updates old: forgotten
    again = ClientMemory(2)
    again.load_columns(m.columns())
    assert again.rows(3)[1] == m.rows(3)[1]


def test_trend_pacing_is_scale_free_and_does_not_fade():
    falling = [1.0 - 0.02 * i for i in range(40)]
    flat = [0.5 + 0.01 * ((-1) ** i) for i in range(40)]
    for scale, offset in ((1.0, 0.0), (1e-3, 7.0)):
        p = TrendPacer(1, 8, window=8)
        for x in falling:
            p.update(offset + scale * x)
        assert p.count == 1
        for x in flat:
            record = p.update(offset + scale * x)
        assert p.count == 8 and record["next"] == 8 and "t" in record
    assert TrendPacer(1, 8).update(None)["next"] == 1


@pytest.mark.parametrize("args, fragment", [
    (["--mode", "async"], "--max-staleness >= 1"),
    (["--mode", "later"], "--mode must be one of"),
    (["--max-staleness", "-1"], "--max-staleness must lie in"),
    (["--mode", "async", "--max-staleness", "4", "--allocation", "speed"], "cannot be combined"),
    (["--pacing", "norm"], "--pacing must be one of"),
])
def test_bad_async_options_are_one_line_errors(tiny, tmp_path, args, fragment):  # noqa: F811
    r = run_cli("federate", "--model", tiny["model"], "--data", tiny["train"], "--task", tiny["task"],
                "--profiles", tiny["profiles"], "--out", tmp_path / "run", "--clients", "4", "--devices", "fast:4",
                *args)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and fragment in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_async_federate_cli_runs_and_reports_traffic(tiny, tmp_path):  # noqa: F811
    r = run_cli("federate", "--model", tiny["model"], "--data", tiny["train"], "--eval-data", tiny["eval"],
                "--task", tiny["task"], "--profiles", tiny["profiles"], "--clients", "4", "--devices",
                "fast:2,slow:2", "--mode", "async", "--max-staleness", "8", "--clients-per-round", "2",
                "--pacing", "trend", "--rounds", "5", "--batch-size", "4", "--threads", "1", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "asynchronous" in r.stderr and "done: 5 rounds" in r.stderr
    from ggfwd.rundir import read_metrics

    b = traffic(read_metrics(tmp_path / "run"))
    assert 0 < b["up"] <= 1024 and 0 < b["down"] <= 1024
