"""Time-to-accuracy policies on the real engine (tiny model): speed-aware allocation against each client's
profile, variance-controlled pacing, discriminative and unbiased candidate sampling replayed bitwise, and the
server refusing forged candidate indices."""

import numpy as np
import pytest

from clirun import run_cli
from ggfwd import sampling
from ggfwd.federation.allocation import (FWDLLM_SCHEDULE, Cost, MissWeights, VariancePacer, allocate, by_deadline,
                                         deadline_for, scheduled)
from ggfwd.federation.messages import Broadcast, Instruction, MessageError, Report, decode, encode
from test_federation import PROFILE, _forge, config, federation, tiny  # noqa: F401  (tiny: the module's fixture)


@pytest.fixture(scope="module")
def zoo(tiny):  # noqa: F811
    """Two more profiles whose per-pass times differ about 100x on the tiny model (hare, turtle)."""
    for name, gflops, overhead in (("hare", 200.0, 0.002), ("turtle", 1.0, 0.2)):
        text = PROFILE.format(name=name, gflops=gflops, online=1.0).replace("overhead_s = 0.01",
                                                                            f"overhead_s = {overhead}")
        (tiny["profiles"] / f"{name}.toml").write_text(text)
    return tiny


# ----------------------------------------------------------------------------- allocation (pure)
def test_speed_allocation_never_exceeds_the_deadline_and_is_as_short_as_the_target_allows():
    rng = np.random.default_rng(1)
    for _ in range(200):
        costs = [Cost(float(rng.uniform(0, 0.5)), float(rng.uniform(0.01, 10))) for _ in range(rng.integers(1, 9))]
        cap = int(rng.integers(1, 12))
        deadline = float(rng.uniform(0, 30))
        counts = by_deadline(costs, deadline, cap)
        for cost, n in zip(costs, counts):
            assert 0 <= n <= cap
            assert n == 0 or cost.seconds(n) <= deadline + 1e-9
            assert n == cap or cost.seconds(n + 1) > deadline  # no idle room for one more direction
        target = int(rng.integers(1, 40))
        d = deadline_for(costs, target, cap)
        got = by_deadline(costs, d, cap)
        assert sum(got) >= min(target, cap * len(costs))
        assert sum(by_deadline(costs, d * (1 - 1e-6) - 1e-9, cap)) < min(target, cap * len(costs))  # minimal
    # the fastest device takes the work first; a device that cannot finish one direction in time gets none
    fast, slow = Cost(0.01, 0.05), Cost(0.02, 8.0)
    counts, d = allocate("speed", [slow, fast], cap=16, target=4)
    assert counts == [0, 4] and d == pytest.approx(0.21)
    counts, d = allocate("speed", [slow, fast], cap=16, deadline=10.0)
    assert counts == [1, 16] and d == 10.0
    assert allocate("uniform", [slow, fast], directions=3) == ([3, 3], float("inf"))
    assert [scheduled(p) for p in (0, 0.24, 0.25, 0.5, 0.99)] == [1, 1, 3, 5, 10]
    assert [n for _, n in FWDLLM_SCHEDULE] == [1, 3, 5, 10]


def test_min_clients_lengthens_the_round_until_that_many_contribute():
    rng = np.random.default_rng(2)
    for _ in range(200):
        costs = [Cost(float(rng.uniform(0, 0.5)), float(rng.uniform(0.01, 10))) for _ in range(rng.integers(1, 9))]
        cap, target = int(rng.integers(1, 6)), int(rng.integers(1, 12))
        m = int(rng.integers(0, len(costs) + 1))
        counts, d = allocate("speed", costs, cap=cap, target=target, min_clients=m)
        assert sum(n > 0 for n in counts) >= m  # at least m clients finish a direction
        assert sum(counts) >= min(target, cap * len(costs))  # and the target is still met
        assert all(n == 0 or cost.seconds(n) <= d + 1e-9 for cost, n in zip(costs, counts))  # within the deadline
        plain, d0 = allocate("speed", costs, cap=cap, target=target)
        assert d >= d0 and (d == d0 or sum(n > 0 for n in by_deadline(costs, d * (1 - 1e-6) - 1e-9, cap)) < m)
    # the slow device is let in, and the fast one fills the longer round up to its cap
    fast, slow = Cost(0.01, 0.05), Cost(0.02, 8.0)
    counts, d = allocate("speed", [slow, fast], cap=16, target=4, min_clients=2)
    assert counts == [1, 16] and d == pytest.approx(8.02)


def test_the_pacing_rule_raises_the_count_when_the_scalar_variance_rises():
    rng = np.random.default_rng(0)
    pacer = VariancePacer(base=4, most=32)
    rounds = [rng.normal(0, 1.0, size=(4, 1)) for _ in range(6)]
    logs = [pacer.update(list(r)) for r in rounds]
    assert all(log["next"] == 4 for log in logs[:3])  # warm-up at the base count
    quiet = pacer.count
    for _ in range(8):  # the scalars' spread grows 3x (variance 9x)
        log = pacer.update(list(rng.normal(0, 3.0, size=(4, 1))))
    assert pacer.count > quiet and pacer.count >= 16 and log["next"] == pacer.count
    assert {"pooled", "within", "across", "ema", "ref", "ratio", "used"} <= set(log)
    for _ in range(20):  # and falls back once it is quiet again, never below the base
        pacer.update(list(rng.normal(0, 0.5, size=(4, 1))))
    assert pacer.count == 4
    # within- and across-client spreads are measured separately
    spread = VariancePacer.spread([np.array([1.0, 3.0]), np.array([11.0, 13.0])])
    assert spread["within"] == pytest.approx(2.0) and spread["across"] == pytest.approx(25.0)
    assert VariancePacer.spread([np.array([1.0])]) is None


def test_clients_that_miss_deadlines_are_down_weighted():
    w = MissWeights(4, decay=0.5)
    w.update([2])
    w.update([2, 3])
    weights = w.weights()
    assert weights[0] == weights[1] == 1 and weights[2] < weights[3] < 1


# ----------------------------------------------------------------------------- on the engine
def test_speed_aware_federation_keeps_every_client_within_its_deadline(zoo, tmp_path):
    cfg = config(steps=5, eval_every=0)
    fed = federation(zoo, tmp_path / "speed", cfg, ["hare", "hare", "turtle", "turtle"], clients_per_round=4,
                     allocation="speed", target=6, max_directions=4)
    fed.run()
    rounds = [r for r in fed.run_dir.read_metrics() if r["step"] > 0]
    for r in rounds:
        assert "late" not in r and r["round_seconds"] <= r["deadline"]
        given = {int(i): n for i, n in r["directions"].items()}
        assert sum(given.values()) >= 6
        for i, t in r["client_seconds"].items():
            assert t <= r["deadline"] and given[int(i)] >= 1
            assert t <= r["predicted_seconds"][i] + 1e-9  # the profile's prediction bounds the real clock
        assert set(r.get("skipped", [])) == {i for i, n in given.items() if n == 0}
        fast = [given[i] for i in given if i < 2]
        slow = [given[i] for i in given if i >= 2]
        assert min(fast) > max(slow)  # 100x the speed: the fast devices take the work
    assert fed.server.version == 5 and fed.counters.applied == 5
    # a fixed deadline: each client does what fits; one that cannot fit one direction is skipped, not late
    cheap = min(min(r["client_seconds"].values()) for r in rounds)
    dl = federation(zoo, tmp_path / "deadline", cfg, ["hare", "turtle"], clients_per_round=2, allocation="speed",
                    deadline=cheap * 1.5, max_directions=8)
    dl.run()
    for r in [r for r in dl.run_dir.read_metrics() if r["step"] > 0]:
        assert r["skipped"] == [1] and r["accepted"] == [0] and "late" not in r
        assert r["client_seconds"]["0"] <= r["deadline"]


def test_variance_pacing_and_fwdllm_schedule_drive_the_counts(tiny, tmp_path):
    cfg = config(steps=8, eval_every=0)
    sched = federation(tiny, tmp_path / "sched", cfg, ["fast"] * 2, clients_per_round=2, allocation="schedule")
    sched.run()
    per_round = [set(r["directions"].values()) for r in sched.run_dir.read_metrics() if r["step"] > 0]
    assert per_round == [{1}, {1}, {3}, {3}, {5}, {5}, {10}, {10}]
    paced = federation(tiny, tmp_path / "paced", cfg, ["fast", "slow"] * 2, clients_per_round=4,
                       allocation="speed", pacing="variance", target=4, max_directions=8)
    paced.run()
    rounds = [r for r in paced.run_dir.read_metrics() if r["step"] > 0]
    for r in rounds:
        p = r["pacing"]
        assert p["rule"] == "variance" and sum(r["directions"].values()) >= min(p["used"], 4 * 8)
        assert {"pooled", "ema", "next"} <= set(p) and p["next"] >= 4
    for a, b in zip(rounds, rounds[1:]):
        assert b["pacing"]["used"] == a["pacing"]["next"]


def test_candidate_sampling_replays_bitwise_and_resumes(tiny, tmp_path):
    cfg = config(steps=6, eval_every=0, optimizer="adam", lr=0.02)
    devices = ["fast", "fast", "slow", "fast"]
    for mode in ("discriminative", "unbiased"):
        fed = federation(tiny, tmp_path / mode, config(steps=6, eval_every=0, optimizer="adam", lr=0.02,
                                                       directions=3),
                         devices, clients_per_round=3, sampling=mode, candidates=12, max_lag=6)
        fed.run()
        server = fed.server
        history = [decode(m) for m in server.history.since(0)]
        used = np.concatenate([b.indices for b in history if b.indices is not None])
        assert used.max() < 12 and np.any(used >= 3)  # not just the plain directions 0..2
        for client in fed.clients:  # every replica rebuilds the same directions from the broadcast indices
            client.sync([decode(m) for m in server.catch_up(client.version)])
            assert np.array_equal(client.replica.theta, server.replica.theta), (mode, client.id)
            assert np.array_equal(client.replica.last_update, server.replica.last_update)
        # the server's aggregate of the last round, rebuilt from indices alone, is the update every replica applied
        assert np.any(server.replica.last_update != 0)
    # kill and resume with candidate sampling, speed allocation and pacing: bitwise
    kw = dict(clients_per_round=3, sampling="discriminative", candidates=8, allocation="speed", pacing="variance",
              target=3, max_directions=3)
    full = federation(tiny, tmp_path / "full", cfg, devices, **kw)
    full.run()
    part = federation(tiny, tmp_path / "part", cfg, devices, **kw)
    part.run(stop_after=4)
    again = federation(tiny, tmp_path / "part", cfg, devices, **kw)
    assert again.resume() == 4
    again.run()
    assert np.array_equal(again.theta, full.theta)


def test_discriminative_ranking_covers_every_candidate(tiny, tmp_path):
    fed = federation(tiny, tmp_path / "rank", config(steps=1), ["fast"], clients_per_round=1)
    p = fed.perturbations
    c = 40
    for planted in (0, 17, c - 1):  # the previous update points along one candidate, the last one included
        u = p.masked(3, 5, planted) + 0.01 * p.masked(99, 0, 0)
        cos = sampling.cosines(p, 3, 5, c, u)
        brute = [abs(np.dot(p.masked(3, 5, j), u)) / np.linalg.norm(p.masked(3, 5, j)) / np.linalg.norm(u)
                 for j in range(c)]
        assert np.allclose(cos, brute, rtol=1e-5) and np.all(cos > 0)
        idx, w = sampling.choose("discriminative", cos, 4, 0, 3, 5)
        assert idx[0] == planted and len(set(idx.tolist())) == 4 and np.all(w == 1)
        assert list(idx) == list(np.argsort(-cos, kind="stable")[:4])
    # no previous update: plain directions
    idx, w = sampling.choose("discriminative", sampling.cosines(p, 3, 5, c, np.zeros(p.n, np.float32)), 3, 0, 3, 5)
    assert idx.tolist() == [0, 1, 2] and np.all(w == 1)


def test_unbiased_sampling_is_unbiased():
    rng = np.random.default_rng(3)
    cos = np.abs(rng.normal(size=16))
    values = rng.normal(size=16)  # stand-ins for s_j z_j along one coordinate
    estimates = []
    for seed in range(4000):
        idx, w = sampling.choose("unbiased", cos, 4, seed, 0, 0)
        assert np.all(w <= 1 / (1 - sampling.MIX) + 1e-12)
        estimates.append(np.mean(w * values[idx]))
    err = np.std(estimates) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates) - values.mean()) < 4 * err
    top, _ = sampling.choose("discriminative", cos, 4, 0, 0, 0)
    assert abs(values[top].mean() - values.mean()) > 0  # the discriminative rule is biased toward the top


def test_forged_candidate_indices_are_refused(tiny, tmp_path):
    fed = federation(tiny, tmp_path / "forge", config(steps=1), ["fast"] * 3, clients_per_round=3,
                     sampling="discriminative", candidates=8)
    server = fed.server
    before = server.replica.theta.copy()
    for i in range(3):
        server.instruct(0, i, 2, 8, 0.1, float("inf"), 8, sampling.CODES["discriminative"])

    def report(c, idx, k=2):
        idx = None if idx is None else np.asarray(idx, np.uint16)
        return encode(Report(0, c, 0, np.full(k, 0.1, np.float32), 0.5, 0.0, 10, 2 * k, idx))

    bad = {"out of range": report(0, [1, 8]), "repeated": report(0, [3, 3]), "missing": report(0, None),
           "too many": report(0, [1, 2, 3], k=3)}
    for why, data in bad.items():
        with pytest.raises(MessageError):
            server.accept(data)
        assert np.array_equal(server.replica.theta, before), why
    with pytest.raises(MessageError, match="candidate indices"):  # more indices than scalars: refused at decode
        decode(_forge({"round": 0, "client": 1, "version": 0, "loss": 0, "loss_std": 0, "tokens": 1, "passes": 4,
                       "_arrays": [["scalars", "f32", 2], ["indices", "u16", 3]]}, b"\0" * 14))
    with pytest.raises(MessageError, match="is allowed"):  # wider index types are not accepted
        decode(_forge({"round": 0, "client": 1, "version": 0, "loss": 0, "loss_std": 0, "tokens": 1, "passes": 4,
                       "_arrays": [["scalars", "f32", 1], ["indices", "u32", 1]]}, b"\0" * 8))
    accepted = [server.accept(report(c, [c, 7])) for c in range(3)]
    _, agg, reason = server.close_round(0, accepted)
    assert reason is None and agg.directions == 6
    b = decode(server.history.since(0)[0])
    assert b.indices.tolist() == [0, 7, 1, 7, 2, 7]
    # a client not asked for candidates may not send indices
    plain = federation(tiny, tmp_path / "plain", config(steps=1), ["fast"], clients_per_round=1)
    plain.server.instruct(0, 0, 2, 8, 0.1)
    with pytest.raises(MessageError, match="not asked for"):
        plain.server.accept(report(0, [0, 1]))


def test_default_messages_keep_their_bytes():
    ins = Instruction(4, 4, 2, 3, 8, 0.1, float("inf"))
    assert b"candidates" not in encode(ins) and decode(encode(ins)) == ins
    with_c = Instruction(4, 4, 2, 3, 8, 0.1, 2.5, 64, 2)
    assert decode(encode(with_c)) == with_c and len(encode(with_c)) <= 256
    r = Report(0, 1, 0, np.ones(16, np.float32), 0.6931471805599453, 0.012345678901234567, 123456, 32,
               np.arange(16, dtype=np.uint16))
    assert len(encode(r)) <= 320 + 6 * 16 and b"indices" not in encode(Report(0, 1, 0, np.ones(2, np.float32),
                                                                             0.5, 0, 1, 4))
    b = Broadcast.of(0, [(0, np.ones(2, np.float32), np.array([3, 4])), (5, np.ones(1, np.float32), np.array([9]))])
    assert [(c, s.tolist(), i.tolist()) for c, s, i in decode(encode(b)).entries()] == \
        [(0, [1, 1], [3, 4]), (5, [1], [9])]


@pytest.mark.parametrize("args, fragment", [
    (["--allocation", "fastest"], "--allocation must be one of"),
    (["--pacing", "adaptive"], "--pacing must be one of"),
    (["--sampling", "best"], "--sampling must be one of"),
    (["--max-directions", "0"], "--max-directions"),
    (["--candidates", "70000"], "--candidates"),
    (["--downweight", "1.5"], "--downweight"),
    (["--min-clients", "9"], "--min-clients must lie in [0, --clients-per-round"),
])
def test_bad_allocation_options_are_one_line_errors(tiny, tmp_path, args, fragment):
    r = run_cli("federate", "--model", tiny["model"], "--data", tiny["train"], "--task", tiny["task"],
                "--profiles", tiny["profiles"], "--clients", "4", "--devices", "fast:4", "--out", tmp_path / "run",
                *args)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and fragment in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
