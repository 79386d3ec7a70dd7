"""Measuring this machine for a device profile (`ggfwd devices bench`).

Everything runs through the real training path: a `Session` built from `SessionSettings`, a LoRA adapter
reloaded from memory before every pass (as every perturbed evaluation does), and `Trainer.train_step` for
the memory of a training step. Per model it measures

- seconds per pass at two batch shapes (batch x tokens and batch x tokens/2 tokens of random ids, one
  scored position per example, as classification training scores), each the median of `repeats` passes
  with new adapter values loaded before each: the points the speed model is fitted to;
- the peak resident memory of `steps` training steps (sampled every 5 ms), next to the memory model;
- optionally the loss noise floor and eps on SST-2 training batches (`ggfwd.calibration.calibrate_eps`).

`fit_speed` turns the points into the profile's speed model (seconds = overhead + FLOP / rate, one rate per
weight type) and `profile_dict` writes it out with where every number came from.
"""

from __future__ import annotations

import datetime
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError


class PeakRSS:
    """The largest resident set size of this process, sampled in a thread between start() and stop()."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = None

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def start(self) -> "PeakRSS":
        self.peak = self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.rss())


def synthetic_data(n_vocab: int, n_examples: int, seq_tokens: int, seed: int = 0):
    """`n_examples` sequences of `seq_tokens` random token ids, each scored at its last position against two
    classes: the classification training shape, independent of a tokenizer or data set."""
    from .tasks import BUILTIN_TASKS, TokenizedData, TokenizedExample

    rng = np.random.default_rng(seed)
    lo = min(16, n_vocab // 2)
    examples = [TokenizedExample(rng.integers(lo, n_vocab, seq_tokens).astype(np.int32),
                                 np.asarray([seq_tokens - 1], np.int32), np.asarray([int(rng.integers(0, 2))], np.int32))
                for _ in range(n_examples)]
    classes = np.asarray([lo, lo + 1], np.int32)
    labels = np.asarray([int(e.targets[0]) for e in examples], np.int32)
    return TokenizedData(BUILTIN_TASKS["sst2"], examples, classes, 0, labels)


@dataclass
class PassPoint:
    model: str
    quant: str
    tokens: int  # per pass
    outputs: int  # scored positions per pass
    seq_tokens: int
    flops: dict  # FLOP by weight type (ModelStats.flops_by_type)
    seconds: float  # median over the repeats
    spread: float  # (max - min) / median over the repeats

    def as_dict(self) -> dict:
        return {"model": self.model, "quant": self.quant, "tokens": self.tokens, "outputs": self.outputs,
                "seq_tokens": self.seq_tokens, "gflop": {k: round(v / 1e9, 5) for k, v in self.flops.items()},
                "seconds": round(self.seconds, 5), "spread": round(self.spread, 4)}

    @classmethod
    def from_dict(cls, d: dict) -> "PassPoint":
        return cls(d["model"], d["quant"], d["tokens"], d["outputs"], d["seq_tokens"],
                   {k: v * 1e9 for k, v in d["gflop"].items()}, d["seconds"], d.get("spread", 0.0))


@dataclass
class ModelBench:
    """What was measured on one model."""

    stats: object  # ModelStats
    points: list[PassPoint]
    baseline_rss: int  # before the model was loaded
    step_peak_rss: int
    step_seconds: float
    steps: int
    calibration: object | None = None  # ggfwd.calibration.Calibration
    calibration_note: str = ""
    predicted: object | None = field(default=None)  # ggfwd.memory.MemoryEstimate

    @property
    def tokens_per_second(self) -> float:
        p = max(self.points, key=lambda q: q.tokens)
        return p.tokens / p.seconds


def measure_model(path, *, threads: int | None, batch_size: int = 16, tokens: int = 64, repeats: int = 3,
                  steps: int = 2, calibrate: bool = True, calibration_batches: int = 2,
                  calibration_directions: int = 4, candidates=None, rank: int = 8,
                  targets=("attn_q", "attn_v"), shapes=None, warmup: bool = True, on_progress=None,
                  verbose: bool = False, memory: str = "standard") -> ModelBench:
    """Measure one model (see the module docstring). `on_progress(done, total, what)` after each unit."""
    from .adapter import LoraAdapter
    from .memory import TrainingShape, predict_memory
    from .modelstats import ModelStats
    from .perturbation import Perturbations
    from .session import SessionSettings
    from .trainer import TrainConfig, Trainer

    import llama_cpp

    from .session import _quiet_llama

    _quiet_llama(False)
    llama_cpp.llama_backend_init()  # llama.cpp's libraries belong to the runtime measured before the model
    sampler = PeakRSS()
    baseline = sampler.rss()  # before anything of the model is read (its header's Python objects count too)
    name = Path(path).name
    settings = SessionSettings(batch_size=batch_size, max_tokens=tokens, threads=threads, memory=memory)
    shapes = sorted(set(shapes or (tokens, max(8, tokens // 2))), reverse=True)
    cal_total = calibration_batches * (1 + 2 * calibration_directions * len(candidates or range(6))) if calibrate else 0
    total = len(shapes) * (int(warmup) + repeats) + steps + cal_total
    done = 0

    def tick(what: str, n: int = 1):
        nonlocal done
        done += n
        if on_progress:
            on_progress(done, total, what)

    session = settings.open(path, verbose=verbose)
    try:
        adapter = LoraAdapter.create(session.base, list(targets), rank=rank, alpha=16.0, seed=0)
        session.set_adapter(adapter)
        pert = Perturbations(adapter, seed=0)
        theta = adapter.params.copy()
        points = []
        for seq in shapes:
            plan = session.plan(synthetic_data(session.n_vocab, batch_size, seq, seed=seq))
            if warmup:
                session.score(plan)
                tick(f"{name}: warm-up")
            times = []
            for r in range(repeats):
                z = pert.direction(0, 0, r)
                start = time.perf_counter()
                session.set_params(theta + np.float32(0.1) * z)  # a new adapter before every pass
                session.score(plan)
                times.append(time.perf_counter() - start)
                tick(f"{name}: {batch_size} x {seq} tokens")
            if not times:  # repeats=0: memory only
                continue
            med = float(np.median(times))
            points.append((seq, med, (max(times) - min(times)) / med))
            del plan
        session.set_params(theta)

        # a training step through the real trainer, on synthetic batches of the training shape
        data = synthetic_data(session.n_vocab, batch_size * max(1, steps), tokens, seed=1)
        config = TrainConfig(steps=max(1, steps), batch_size=batch_size, eval_every=0, eps=0.1)
        with tempfile.TemporaryDirectory(prefix="ggfwd-bench-") as rundir:
            sampler.start()
            trainer = Trainer(session, adapter, data, config, Path(rundir))
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
                tick(f"{name}: training step")
            step_seconds = (time.perf_counter() - start) / max(1, steps)
            step_peak = sampler.stop()
        session.set_params(theta)

        cal, note = None, ""
        if calibrate:
            cal, note = _calibrate(session, adapter, pert, settings, calibration_batches, calibration_directions,
                                   candidates, lambda d, t: tick(f"{name}: calibration", 1))
    finally:
        session.close()
    # The header is read for the counts only now: a training run parses it once (in the session), and its
    # Python objects (a large vocabulary's strings) must not inflate the step's measured memory.
    stats = ModelStats.from_gguf(path)
    points = [PassPoint(stats.name, stats.quant, batch_size * seq, batch_size, seq,
                        stats.flops_by_type(batch_size * seq, batch_size, seq), med, spread)
              for seq, med, spread in points]
    shape = TrainingShape(batch_size=batch_size, tokens=tokens, rank=rank, targets=tuple(targets), memory=memory)
    bench = ModelBench(stats, points, baseline, step_peak, step_seconds, steps, cal, note)
    bench.predicted = predict_memory(stats, shape, runtime_bytes=baseline)
    return bench


def _calibrate(session, adapter, pert, settings, batches, directions, candidates, on_eval):
    """Noise floor and eps on the first `batches` x batch-size SST-2 training rows; (None, reason) when the
    model's tokenizer cannot express the SST-2 task (random test models)."""
    from .calibration import DEFAULT_CANDIDATES, calibrate_eps
    from .demo import sst2_file
    from .tasks import load_examples, load_task, tokenize_examples

    task = load_task("sst2")
    rows = load_examples(sst2_file("train"), task, batches * settings.batch_size)
    try:
        data = tokenize_examples(rows, task, session.tokenize, session.detokenize, settings.max_tokens)
    except UserError as exc:
        return None, f"not calibrated: {exc}"
    plans = [session.plan(data.subset(range(b * settings.batch_size, (b + 1) * settings.batch_size)))
             for b in range(batches)]
    cal = calibrate_eps(session, plans, adapter, pert, candidates or DEFAULT_CANDIDATES, n_directions=directions,
                        on_eval=on_eval)
    return cal, ""


SEPARATE_SHARE = 0.4  # a weight type gets a rate of its own when it carries this share of some pass's FLOP


def fit_speed(points: list[PassPoint]) -> tuple[dict, float]:
    """Least squares `seconds = overhead + sum over classes of FLOP / rate`: ({'default': GFLOP/s, type:
    GFLOP/s, ...}, overhead seconds). A weight type that carries 40% or more of some pass's work gets its own
    rate while the points can determine it (at least one more point than unknowns, all rates positive);
    everything else shares `default`. The overhead is kept only when it comes out positive; else it is 0 and
    the rates are refitted through the origin."""
    t = np.asarray([p.seconds for p in points])
    share = {}
    for p in points:
        total = sum(p.flops.values())
        for k, v in p.flops.items():
            share[k] = max(share.get(k, 0.0), v / total)
    candidates = [k for k, v in sorted(share.items(), key=lambda kv: -kv[1]) if v >= SEPARATE_SHARE and k != "attention"]

    def solve(classes, intercept):
        def column(c):
            if c == "default":
                return np.asarray([sum(v for k, v in p.flops.items() if k not in classes) / 1e9 for p in points])
            return np.asarray([p.flops.get(c, 0.0) / 1e9 for p in points])

        cols = [column(c) for c in classes + ["default"]]
        a = np.column_stack(([np.ones_like(t)] if intercept else []) + cols)
        if a.shape[0] < a.shape[1] or np.linalg.matrix_rank(a) < a.shape[1]:
            return None
        sol, *_ = np.linalg.lstsq(a, t, rcond=None)
        overhead, slopes = (float(sol[0]), sol[1:]) if intercept else (0.0, sol)
        if overhead < 0 or np.any(slopes <= 0) or not np.all(np.isfinite(slopes)):
            return None
        return {c: float(1 / s) for c, s in zip(classes + ["default"], slopes)}, overhead

    for n in range(len(candidates), -1, -1):
        classes = candidates[:n]
        unknowns = n + 1
        if len(points) < unknowns + (1 if n else 0):
            continue
        for intercept in ((True, False) if len(points) > unknowns + 1 else (False,)):
            fit = solve(classes, intercept)
            if fit is not None:
                return fit
    raise ValueError("cannot fit a speed model to these points")


def system_info() -> tuple[str, str]:
    """(llama-cpp-python version, llama.cpp's system info line)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    info = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    return getattr(llama_cpp, "__version__", "unknown"), " ".join(info.split())


def detect_backend(info: str) -> str:
    for name, key in (("metal", "METAL"), ("cuda", "CUDA"), ("vulkan", "VULKAN")):
        if key in info.upper():
            return name
    return "cpu"


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def detect_os() -> str:
    if "com.termux" in os.environ.get("PREFIX", ""):
        return "android-termux"
    return {"Darwin": "macos", "Windows": "windows"}.get(platform.system(), "linux")


# Fixed-broadband medians used when a bench run does not measure the network (it never does).
FIXED_NETWORK = {
    "up_mbps": 45.74, "down_mbps": 85.73, "latency_ms": 10.0,
    "source": ("not measured by ggfwd devices bench: global fixed-broadband medians. Download 85.73 and upload "
               "45.74 Mbps: Ookla Speedtest Global Index, September 2020 (reported at "
               "https://my-financial-wealth.com/2020/10/25/the-global-mobile-and-broadband-internet-speed-ranking/); "
               "latency 10 ms: Ookla, November 2022 fixed-broadband median (reported at "
               "https://tele.net.in/global-mobile-network-download-speeds-increase-by-nearly-17-per-cent-in-2022-says-ookla-study/)"),
}


def profile_dict(name: str, benches: list[ModelBench], *, threads: int, description: str | None = None,
                 kind: str = "server", budget_fraction: float = 0.5, availability: float = 1.0,
                 note: str = "") -> dict:
    """A profile (as the TOML's nested dict) from bench results on this machine."""
    import psutil

    version, info = system_info()
    today = datetime.date.today().isoformat()
    rates, overhead = fit_speed([p for b in benches for p in b.points])
    total_mib = psutil.virtual_memory().total / 2 ** 20
    machine = f"{platform.machine()}, {cpu_name()}"
    cores = psutil.cpu_count(logical=False) or os.cpu_count()
    run = (f"ggfwd devices bench on {today}, llama-cpp-python {version}, {threads} threads, "
           f"models: {', '.join(b.stats.name for b in benches)}")
    main = benches[0]
    data = {
        "name": name,
        "description": description or f"this machine: {machine}, {cores} physical cores, "
                                      f"{total_mib / 1024:.0f} GiB, llama.cpp {detect_backend(info)} build",
        "kind": kind, "os": detect_os(), "backend": detect_backend(info), "threads": int(threads),
        "source": f"{run}; cores and memory from psutil, backend from llama.cpp's system info",
        "memory": {
            "total_mib": round(total_mib, 1), "budget_mib": round(total_mib * budget_fraction, 1),
            "runtime_mib": round(main.baseline_rss / 2 ** 20, 1),
            "source": (f"total from psutil; budget derived: {budget_fraction:g} of the total (a rule, not a "
                       f"measurement); runtime_mib: this process's resident memory before loading the model, "
                       f"measured by {run}"),
        },
        "speed": {
            "overhead_s": round(overhead, 5),
            "source": (f"measured by {run}: seconds per pass (new adapter values loaded before each, median of "
                       f"the repeats) at {len(main.points)} batch shapes per model, fitted by least squares as seconds = "
                       f"overhead_s + sum over weight types of FLOP / (gflops x 1e9), a type with its own rate "
                       f"when it carries 40% of some pass's work and the points determine it; points under [bench]"),
            "gflops": {q: round(r, 3) for q, r in sorted(rates.items(), key=lambda kv: kv[0] != "default")},
        },
    }
    cal = next((b for b in benches if b.calibration is not None), None)
    if cal is not None:
        c = cal.calibration
        numerics = {"eps": float(f"{c.eps:.4g}"), "model": cal.stats.name,
                    "source": (f"measured by {run}: ggfwd.calibration.calibrate_eps on {c.n_batches} SST-2 training "
                               f"batches, {c.n_directions} directions in all, rank-8 LoRA on attn_q/attn_v")}
        if c.noise_floor > 0:
            numerics = {"noise_floor": float(f"{c.noise_floor:.4g}"), **numerics}
        else:
            numerics["source"] += "; the loss showed no noise at all (noise_floor left out)"
        data["numerics"] = numerics
    data["network"] = dict(FIXED_NETWORK)
    data["availability"] = {"online": float(availability),
                            "source": "assumed by whoever ran the bench (an always-on machine unless told otherwise)"}
    bench = {"date": today, "llama_cpp_python": version, "system_info": info,
             "build_flags": os.environ.get("CMAKE_ARGS", "") or "not recorded (CMAKE_ARGS unset at bench time)",
             "machine": machine, "models": [b.stats.name for b in benches],
             "peak_rss_mib": round(main.step_peak_rss / 2 ** 20, 1),
             "tokens_per_second": round(main.tokens_per_second, 2)}
    if note:
        bench["note"] = note
    bench["points"] = [p.as_dict() for b in benches for p in b.points]
    data["bench"] = bench
    return data
