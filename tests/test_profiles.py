"""Device profiles: the schema, where profiles are found, the shipped profiles' numbers and sources, the speed
model, and the memory model against what llama.cpp itself reports for a real (small, quantized) model."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from ggfwd.errors import UserError
from ggfwd.profiles import (list_profiles, load_profile, save_profile,
                            to_toml, user_dir)

ROOT = Path(__file__).resolve().parent.parent
MEASURED = ("ci-x86-2core", "ci-x86-avx512")  # written by `ggfwd devices bench` on the project's two host classes
SHIPPED = (*MEASURED, "phone-midrange", "phone-flagship", "pi5", "laptop-x86", "macbook-m4", "desktop-vulkan")

GOOD = """name = "NAME"
description = "a test device"
kind = "laptop"
os = "linux"
backend = "cpu"
threads = 4
source = "made up for a test"

[memory]
total_mib = 8192
budget_mib = 4096
source = "made up"

[speed]
overhead_s = 0.01
source = "made up"

[speed.gflops]
default = 100.0
f32 = 50.0

[network]
up_mbps = 10.0
down_mbps = 40.0
latency_ms = 50
source = "made up"

[availability]
online = 0.5
source = "made up"
"""


def write(folder: Path, name: str, text: str = GOOD) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text.replace('name = "NAME"', f'name = "{name}"'))
    return path


@pytest.fixture(autouse=True)
def no_user_profiles(tmp_path, monkeypatch):
    """Keep the developer's own profiles ($GGFWD_PROFILES, ~/.config/ggfwd/profiles) out of the tests."""
    monkeypatch.delenv("GGFWD_PROFILES", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


# ------------------------------------------------------------------------------------- shipped profiles
def test_shipped_profiles_cover_the_device_classes_and_every_number_has_a_source():
    found = {p.name: p for p in list_profiles()}
    assert set(SHIPPED) <= set(found)
    assert {p.kind for p in found.values()} >= {"phone", "laptop", "desktop", "sbc", "server"}
    assert {p.backend for p in found.values()} >= {"cpu", "metal", "vulkan"}
    for p in found.values():
        assert p.source.strip()
        for section in ("memory", "speed", "network", "availability", "numerics"):
            if section in p.raw:
                assert len(p.raw[section]["source"]) > 20, (p.name, section)
        assert 0 < p.availability <= 1 and p.memory_budget_mib <= p.memory_total_mib


def conversion_of(text: str):
    """The 'A x B = C GFLOP/s' arithmetic a cited profile writes out."""
    m = re.search(r"([\d.]+) x ([\d.]+) = ([\d.]+) GFLOP/s", text)
    return tuple(float(g) for g in m.groups()) if m else None


# GFLOP per llama-bench pp512 token of the models the public figures were measured on (name -> dimensions)
CITED_MODELS = {
    "TinyLlama": dict(n_layers=22, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4, head_dim=64),
    "Llama 3.1 8B": dict(n_layers=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, head_dim=128),
    "Llama 3.2 3B": dict(n_layers=28, n_embd=3072, n_ff=8192, n_head=24, n_head_kv=8, head_dim=128),
}


@pytest.mark.parametrize("name", [n for n in SHIPPED if n not in MEASURED])
def test_cited_profiles_write_out_a_conversion_that_adds_up(name):
    from ggfwd.modelstats import dims_flops_per_token

    p = load_profile(name)
    text = p.raw["speed"]["source"]
    assert "https://" in text and "Cited" in text
    tps, per_token, rate = conversion_of(text)
    assert tps * per_token == pytest.approx(rate, rel=2e-3)
    assert rate in p.gflops.values()
    model = min((m for m in CITED_MODELS if m in text), key=text.index)  # the one named first: the cited figure
    assert dims_flops_per_token(**CITED_MODELS[model], context=256.5) / 1e9 == pytest.approx(per_token, abs=6e-4)


@pytest.mark.parametrize("name", MEASURED)
def test_the_measured_profile_is_what_its_own_points_fit(name):
    """A profile written by `ggfwd devices bench`: its rates and overhead are the least-squares fit of the
    passes it recorded (two models, two batch shapes each), and each recorded pass is predicted within 25%."""
    from ggfwd.devicebench import PassPoint, fit_speed

    p = load_profile(name)
    bench = p.raw["bench"]
    assert bench["date"] and bench["llama_cpp_python"] and "CPU" in bench["system_info"]
    points = [PassPoint.from_dict(q) for q in bench["points"]]
    assert len({q.model for q in points}) >= 2 and len(points) >= 4
    rates, overhead = fit_speed(points)
    assert rates == pytest.approx(p.gflops, rel=1e-3)
    assert overhead == pytest.approx(p.overhead_s, abs=1e-4)
    for q in points:
        predicted = p.overhead_s + sum(f / (p.rate(k)[0] * 1e9) for k, f in q.flops.items())
        assert predicted == pytest.approx(q.seconds, rel=0.25)
    assert p.raw["numerics"]["eps"] > 0 and p.raw["numerics"]["noise_floor"] > 0


# ------------------------------------------------------------------------------------- the schema
BAD = [
    ("not toml", "name = [", "not valid TOML"),
    ("missing field", GOOD.replace("threads = 4\n", ""), "missing field threads"),
    ("missing section", re.sub(r"\[network\][^[]*", "", GOOD), "missing section [network]"),
    ("wrong type", GOOD.replace("threads = 4", 'threads = "four"'), "threads must be a positive integer"),
    ("float threads", GOOD.replace("threads = 4", "threads = 4.5"), "threads must be a positive integer"),
    ("unknown backend", GOOD.replace('backend = "cpu"', 'backend = "tpu"'), "backend must be one of cpu, metal, vulkan, cuda"),
    ("unknown kind", GOOD.replace('kind = "laptop"', 'kind = "toaster"'), "kind must be one of"),
    ("unknown os", GOOD.replace('os = "linux"', 'os = "beos"'), "os must be one of"),
    ("negative", GOOD.replace("up_mbps = 10.0", "up_mbps = -10.0"), "network.up_mbps must be a positive number"),
    ("zero", GOOD.replace("total_mib = 8192", "total_mib = 0"), "memory.total_mib must be a positive number"),
    ("zero rate", GOOD.replace("default = 100.0", "default = 0"), "speed.gflops.default must be a positive number"),
    ("no default rate", GOOD.replace("default = 100.0\n", ""), "speed.gflops needs a default rate"),
    ("file type as key", GOOD.replace("f32 = 50.0", "q4_k_m = 50.0"), "speed.gflops.q4_k_m is not a ggml weight type"),
    ("bool number", GOOD.replace("latency_ms = 50", "latency_ms = true"), "network.latency_ms must be a positive number"),
    ("unknown key", GOOD + 'colour = "red"\n', "unknown key 'availability.colour'"),
    ("unknown top key", 'colour = "red"\n' + GOOD, "unknown key 'colour'"),
    ("unknown section", GOOD + "[gpu]\nvram = 8\n", "unknown key 'gpu'"),
    ("availability above 1", GOOD.replace("online = 0.5", "online = 1.5"), "availability.online must be a number in (0, 1]"),
    ("budget over total", GOOD.replace("budget_mib = 4096", "budget_mib = 9000"), "exceeds memory.total_mib"),
    ("nan", GOOD.replace("overhead_s = 0.01", "overhead_s = nan"), "speed.overhead_s must be a number >= 0"),
    ("missing source", GOOD.replace('source = "made up for a test"\n', ""), "missing field source"),
]


@pytest.mark.parametrize("case,text,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_profile_files_are_one_line_naming_file_and_field(tmp_path, case, text, fragment):
    path = write(tmp_path, "bad", text)
    with pytest.raises(UserError) as exc:
        load_profile(str(path))
    message = str(exc.value)
    assert "\n" not in message and str(path) in message and fragment in message, message


def test_name_must_match_the_file_and_unknown_names_list_the_known(tmp_path):
    path = tmp_path / "other.toml"
    path.write_text(GOOD.replace("NAME", "different"))
    with pytest.raises(UserError, match="differs from the file name 'other.toml'"):
        load_profile(str(path))
    with pytest.raises(UserError, match=r"unknown device profile 'nope' \(known: .*pi5"):
        load_profile("nope")
    with pytest.raises(UserError, match="device profile file not found"):
        load_profile(str(tmp_path / "missing.toml"))


def test_search_order_folders_then_environment_then_user_folder_then_builtin(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    write(first, "pi5", GOOD.replace("threads = 4", "threads = 1"))  # shadows the built-in pi5
    write(second, "pi5", GOOD.replace("threads = 4", "threads = 2"))
    write(second, "only-env")
    monkeypatch.setenv("GGFWD_PROFILES", str(second))
    assert load_profile("pi5", dirs=[first]).threads == 1
    assert load_profile("pi5").threads == 2
    assert load_profile("only-env").name == "only-env"
    write(_mk(user_dir()), "mine")
    assert load_profile("mine").path.startswith(str(user_dir()))
    names = [p.name for p in list_profiles(dirs=[first])]
    assert names.count("pi5") == 1 and {"only-env", "mine", "phone-midrange"} <= set(names)
    monkeypatch.setenv("GGFWD_PROFILES", str(tmp_path / "absent"))
    with pytest.raises(UserError, match="GGFWD_PROFILES names a folder that does not exist"):
        list_profiles()
    with pytest.raises(UserError, match="profiles folder not found"):
        load_profile("pi5", dirs=[tmp_path / "nowhere"])


def _mk(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_a_bad_file_in_a_profile_folder_is_an_error_for_list(tmp_path):
    write(tmp_path, "broken", GOOD.replace("threads = 4", "threads = 0"))
    with pytest.raises(UserError, match="broken.toml: threads must be a positive integer"):
        list_profiles(dirs=[tmp_path])


def test_written_profiles_round_trip_and_are_written_atomically(tmp_path):
    import tomllib

    data = tomllib.loads(GOOD.replace("NAME", "rt"))
    data["description"] = 'quotes " and \\ backslashes\nand a newline'
    data["bench"] = {"date": "2026-01-01", "llama_cpp_python": "0.3.36", "system_info": "CPU : AVX2 = 1",
                     "models": ["a.gguf"], "points": [{"model": "a.gguf", "tokens": 1024, "seconds": 0.5}]}
    path = save_profile(data, tmp_path / "rt.toml")
    assert tomllib.loads(path.read_text()) == data
    assert load_profile(str(path)).raw == data
    bad = dict(data, threads=0)
    with pytest.raises(UserError, match="threads must be a positive integer"):
        save_profile(bad, tmp_path / "bad.toml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rt.toml"]  # nothing half-written left behind
    assert to_toml({"a": 1.5, "b": [1, 2], "t": {"x": "y"}}) == 'a = 1.5\nb = [1, 2]\n\n[t]\nx = "y"\n'


# ------------------------------------------------------------------------------------- speed and network
def test_speed_model_counts_flops_and_picks_the_rate_by_type(tiny_model, tmp_path):
    from ggfwd.modelstats import ModelStats

    stats = ModelStats.from_gguf(tiny_model)
    p = load_profile(str(write(tmp_path, "dev")))
    assert stats.quant == "f32" and set(stats.body_params_by_type) == {"f32"}
    work = stats.flops_by_type(1024, 16, 64)
    assert set(work) == {"f32", "attention"} and sum(work.values()) == stats.flops_per_pass(1024, 16, 64)
    expected = 0.01 + work["f32"] / 50e9 + work["attention"] / 100e9  # f32 has a rate; attention uses default
    assert p.seconds_per_pass(stats, 1024, 16, 64) == pytest.approx(expected)
    assert p.seconds_per_pass(stats, 1024) == pytest.approx(expected)  # defaults: 16 outputs, 64-token sequences
    # twice the tokens in the same number of sequences: at least twice the block work
    assert p.seconds_per_pass(stats, 2048, 16, 128) - 0.01 > 2 * (expected - 0.01) * 0.99
    assert p.rate("f32") == (50.0, "f32") and p.rate("Q8_0") == (100.0, "default")
    assert p.upload_seconds(10_000_000) == pytest.approx(8.0) and p.download_seconds(10_000_000) == pytest.approx(2.0)
    assert p.latency_s == pytest.approx(0.05) and p.memory_budget_bytes == 4096 * 2 ** 20


def test_fit_speed_recovers_rates_by_type_and_the_overhead():
    from ggfwd.devicebench import PassPoint, fit_speed

    truth, overhead = {"q4_k": 80.0, "q5_0": 30.0, "default": 40.0}, 0.02

    def point(mix: dict, gflop: float) -> PassPoint:
        flops = {k: share * gflop * 1e9 for k, share in mix.items()}
        seconds = overhead + sum(f / (truth.get(k, truth["default"]) * 1e9) for k, f in flops.items())
        return PassPoint("m", "x", 1024, 16, 64, flops, seconds, 0.0)

    # three models with different mixes of weight types, two batch sizes each; q6_k and attention share default
    a = {"q4_k": 0.85, "q6_k": 0.1, "attention": 0.05}
    b = {"q5_0": 0.6, "q4_k": 0.2, "q6_k": 0.2}
    c = {"q4_k": 0.5, "q6_k": 0.5}
    points = [point(a, 100), point(a, 50), point(b, 20), point(b, 10), point(c, 60), point(c, 30)]
    rates, fitted = fit_speed(points)
    assert rates == pytest.approx(truth) and fitted == pytest.approx(overhead)
    for q in points:
        assert overhead + sum(f / (rates.get(k, rates["default"]) * 1e9) for k, f in q.flops.items()) == \
            pytest.approx(q.seconds)
    # two points of one model cannot tell types apart: one default rate through the origin
    rates, fitted = fit_speed(points[:2])
    assert set(rates) == {"default"} and fitted == 0.0
    assert fit_speed([PassPoint("m", "x", 1, 1, 1, {"f32": 1e11}, 2.0, 0.0)]) == ({"default": pytest.approx(50.0)}, 0.0)


# ------------------------------------------------------------------------------------- model stats and memory
def test_model_stats_match_the_weights_and_the_adapter_ggfwd_builds(tiny_model, tiny_weights):
    from ggfwd.adapter import LoraAdapter
    from ggfwd.base import read_base
    from ggfwd.modelstats import ModelStats

    stats = ModelStats.from_gguf(tiny_model)
    w = {k: v for k, v in tiny_weights.items() if not k.startswith("_")}
    c = tiny_weights["_config"]
    assert stats.params == sum(v.size for v in w.values())
    assert stats.body_params == sum(v.size for k, v in w.items() if k.startswith("blk.") and v.ndim == 2)
    assert (stats.n_layers, stats.n_embd, stats.n_ff, stats.n_head, stats.n_head_kv, stats.n_vocab) == \
        (c["n_layers"], c["d"], c["ff"], c["n_head"], c["n_head_kv"], c["n_vocab"])
    adapter = LoraAdapter.create(read_base(tiny_model), ["attn_q", "attn_v"], rank=4, seed=0)
    assert stats.lora_params(["attn_q", "attn_v"], 4) == adapter.params.size
    assert stats.lora_params(["attn_q", "attn_v"], 4, part="b") == int(adapter.mask("b").sum())
    with pytest.raises(UserError, match="match no weight"):
        stats.lora_params(["nothing"], 4)


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_devices", ROOT / "scripts" / "bench_devices.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quantized_llama(tmp_path_factory):
    """A small random llama at q4_k_m, made the way scripts/bench_devices.py makes its 1B and 7B models."""
    bench = _load_script()
    bench.LLAMAS["test"] = dict(d=256, ff=768, layers=2, heads=4, kv=2, vocab=3000)
    return bench.make_llama("test", 1, tmp_path_factory.mktemp("q4"))


def _logged_sizes(text: str) -> dict:
    out = {}
    for key, pattern in (("repack", r"CPU_REPACK model buffer size =\s+([\d.]+) MiB"),
                         ("outputs", r"output buffer size =\s+([\d.]+) MiB"),
                         ("compute", r"compute buffer size =\s+([\d.]+) MiB")):
        m = re.search(pattern, text)
        out[key] = float(m.group(1)) if m else 0.0
    out["kv"] = sum(float(x) for x in re.findall(r"KV buffer size =\s+([\d.]+) MiB", text))
    return out


@pytest.mark.parametrize("batch,tokens,memory", [(16, 64, "standard"), (4, 300, "standard"), (8, 32, "standard"),
                                                 (16, 64, "lean"), (4, 300, "lean")])
def test_memory_model_parts_agree_with_what_llama_cpp_allocates(quantized_llama, capfd, batch, tokens, memory):
    """KV cache, logits buffer and repacked weights exactly as llama.cpp logs them; the compute buffer
    within 25% (it is the graph allocator's peak, which the model approximates)."""
    from ggfwd.memory import TrainingShape, predict_memory
    from ggfwd.modelstats import ModelStats

    stats = ModelStats.from_gguf(quantized_llama)
    shape = TrainingShape(batch_size=batch, tokens=tokens, memory=memory)
    capfd.readouterr()
    session = shape.settings(threads=1).open(quantized_llama, verbose=True)
    session.close()
    logged = _logged_sizes(capfd.readouterr().err)
    mem = predict_memory(stats, shape)
    mib = 2 ** 20
    assert stats.quant == "q4_k_m" and logged["repack"] > 0
    assert mem.weights_repacked / mib == pytest.approx(logged["repack"], abs=0.01)
    assert mem.kv_cache / mib == pytest.approx(logged["kv"], abs=0.01)
    assert mem.outputs / mib == pytest.approx(logged["outputs"], abs=0.01)
    if memory == "standard":
        assert mem.compute / mib == pytest.approx(logged["compute"], rel=0.25)
    else:  # over one shared stream the attention term over-predicts (34 vs 26 MiB here): a bound, not an estimate
        assert logged["compute"] <= mem.compute / mib <= 1.4 * logged["compute"]


def test_memory_model_against_a_measured_training_step(quantized_llama):
    """`ggfwd devices bench`'s measurement of a training step's peak RSS and the prediction from the GGUF agree
    within 15% on a small model (the runtime and fixed overheads dominate there; scripts/bench_devices.py holds
    the 10% check at 270M, 1.1B and 7B)."""
    from ggfwd.devicebench import measure_model

    bench = measure_model(quantized_llama, threads=1, batch_size=16, tokens=64, repeats=1, steps=1, calibrate=False)
    assert bench.predicted.total == pytest.approx(bench.step_peak_rss, rel=0.15)
    assert [p.tokens for p in bench.points] == [1024, 512] and all(p.seconds > 0 for p in bench.points)


def test_training_shape_refuses_what_no_session_can_run():
    from ggfwd.memory import TrainingShape

    for kw, fragment in [({"batch_size": 0}, "batch size"), ({"tokens": 4}, "max tokens"), ({"rank": 0}, "rank"),
                         ({"directions": 0}, "directions"), ({"optimizer": "lion"}, "optimizer"),
                         ({"targets": ()}, "targets")]:
        with pytest.raises(UserError, match=fragment):
            TrainingShape(**kw)
    assert np.isclose(TrainingShape().passes_per_step, 2)
