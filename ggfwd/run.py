"""A run, described once and put together once.

A run is what it reads (`RunInputs`: model, starting adapter, data, task, session settings), how it trains
(`TrainConfig`), for a federation how its clients are organised (`FedConfig`), and the folder it lives in.
`RunPlan` holds them together with the one validation of a run (`check`: every part, then the rules that tie
the parts together), so that no command line, script or server repeats a rule or misses one.

- `plan_run` makes the plan of a new run from the options a caller was given over the defaults (the demo's
  when neither a model nor data is named), or reads the plan saved in a run folder for a resume, refusing any
  option that would change it. Nothing is written before the plan is checked.
- `RunPlan.load` turns the plan into a scoring session's tokenized data and starting adapter, and
  `assemble` builds the driver that trains it (`Trainer`, `Federation` or `AsyncFederation`), resumed when the
  plan is a resume.

`ggfwd train`, `ggfwd federate` and `ggfwd serve` call these and only parse options, print and exit; the
benchmarks build `RunPlan`s directly.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .demo import demo_model, sst2_file
from .errors import UserError
from .federation.asynchronous import AsyncFederation
from .federation.simulate import SAVED_BEFORE, FedConfig, Federation, check_federation
from .inputs import RunInputs, refuse_changed
from .profiles import load_profile
from .trainer import TrainConfig, Trainer, read_state

# The inputs a command may be given (RunInputs fields), and those that are paths (made absolute)
INPUT_OPTIONS = ("model", "adapter", "data", "eval_data", "task", "train_limit", "min_words", "eval_limit", "rank",
                 "alpha", "targets", "max_tokens", "memory")
_PATHS = ("model", "adapter", "data", "eval_data")
DEMO_LIMITS = {"train_limit": 2000, "eval_limit": 256}  # the demo's data when no model or data is named


@dataclass
class RunPlan:
    kind: str  # train | federate | serve
    config: TrainConfig
    inputs: RunInputs
    out: Path
    fed: FedConfig | None = None  # for a federation
    calibration: dict | None = None  # the eps calibration the run was started with
    state: dict | None = None  # the saved state when resuming

    @property
    def resuming(self) -> bool:
        return self.state is not None

    def check(self) -> None:
        """Every setting, and the rules between them, before anything is created on disk (one line each)."""
        self.config.check()
        self.inputs.check()
        if self.fed is not None:
            check_federation(self.config, self.fed)

    def load(self, session):
        """(training data, evaluation data or None, starting adapter), tokenized by `session`."""
        return self.inputs.load(session, self.config.seed)

    def profiles(self, folder: Path | None = None) -> list:
        """One device profile per client of a federation (each profile read once)."""
        cache: dict = {}
        for name in self.fed.device_names():
            if name not in cache:
                cache[name] = load_profile(name, dirs=[folder] if folder else None)
        return [cache[name] for name in self.fed.device_names()]


def inputs_given(options: dict) -> dict:
    """The RunInputs fields among a command's options (None: not given); paths made absolute."""
    return {k: (None if options.get(k) is None else str(Path(options[k]).resolve())) if k in _PATHS
            else options.get(k) for k in INPUT_OPTIONS}


def plan_run(kind: str, given: dict, inputs: dict, out: Path | None, resume: bool, demo: dict,
             fed_given: dict | None = None, fed_demo: dict | None = None) -> RunPlan:
    """The plan of a new run from `given` TrainConfig options and `inputs` (RunInputs options) over the
    defaults (`demo` TrainConfig settings and the demo data when neither model nor data is named; for a
    federation, `fed_given` FedConfig options over `fed_demo`); or, with `resume`, the plan saved in `out`,
    where any given option other than --steps (--rounds) that differs is refused. The plan is checked."""
    if isinstance(given.get("layers"), str):
        given["layers"] = [int(x) if x.strip().isdigit() else x.strip() for x in given["layers"].split(",") if x.strip()]
    fed = None
    if resume:
        if out is None:
            raise UserError("--resume needs --out RUNDIR")
        state = read_state(out)
        config = TrainConfig.from_dict(state["config"])
        for key, value in given.items():
            if key != "steps" and value != getattr(config, key):
                raise UserError(f"--{key.replace('_', '-')} {value} differs from the run's {getattr(config, key)}; "
                                "a resumed run keeps its settings (only --steps may change)")
        if "steps" in given:
            config.steps = given["steps"]
        run_inputs = RunInputs.from_dict(state["meta"])
        refuse_changed(run_inputs, inputs)
        if fed_given is not None:
            known = {f.name for f in fields(FedConfig)}
            fed = FedConfig(**{**SAVED_BEFORE, **{k: v for k, v in (state.get("federation") or {}).items()
                                                  if k in known}})
            for k, v in fed_given.items():
                if v != getattr(fed, k):
                    raise UserError(f"--{k.replace('_', '-')} {v} differs from the run's {getattr(fed, k)}; a "
                                    "resumed federation keeps its clients, devices and partition (only --rounds "
                                    "may change)")
        plan = RunPlan(kind, config, run_inputs, Path(out), fed, state["meta"].get("calibration"), state)
    else:
        is_demo = inputs["model"] is None and inputs["data"] is None
        config = TrainConfig(**{**asdict(TrainConfig()), **(demo if is_demo else {}), **given})
        chosen = {k: v for k, v in inputs.items() if v is not None}
        chosen.setdefault("data", str(sst2_file("train")))
        if is_demo:
            chosen.setdefault("eval_data", str(sst2_file("dev")))
            for k, v in DEMO_LIMITS.items():
                chosen.setdefault(k, v)
        if "model" not in chosen:
            chosen["model"] = str(demo_model())
        if fed_given is not None:
            fed_given = dict(fed_given)
            for k, v in (fed_demo or {}).items():
                if k == "devices" and "clients" in fed_given:
                    continue  # --clients alone: every client on the default device
                fed_given.setdefault(k, v)
            fed = FedConfig(**fed_given)
        out = out or Path("runs") / time.strftime(f"{kind}-%Y%m%d-%H%M%S")
        if (out / "state.json").exists():
            raise UserError(f"{out} already holds a run: use --resume to continue it or choose another --out")
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a folder")
        plan = RunPlan(kind, config, RunInputs(**chosen), Path(out), fed)
    plan.check()
    return plan


def assemble(plan: RunPlan, session, loaded=None, profiles=None, model_stats=None):
    """The driver of `plan` on an open `session`: a `Trainer`, or for a federation a `Federation` (synchronous
    rounds) or `AsyncFederation` (--mode async) over `profiles` and `model_stats`. `loaded`: the plan's
    (training data, evaluation data, adapter) when the caller loaded them already. The run folder is created
    here, once the data has been accepted; a resume continues from its last checkpoint."""
    train, evaluation, adapter = loaded if loaded is not None else plan.load(session)
    plan.out.mkdir(parents=True, exist_ok=True)
    if plan.fed is None:
        driver = Trainer(session, adapter, train, plan.config, plan.out, eval_data=evaluation, inputs=plan.inputs,
                         calibration=plan.calibration)
    else:
        kind = AsyncFederation if plan.fed.mode == "async" else Federation
        driver = kind(session, adapter, train, plan.config, plan.out, eval_data=evaluation, inputs=plan.inputs,
                      calibration=plan.calibration, fed=plan.fed, profiles=profiles, model_stats=model_stats)
    if plan.resuming:
        driver.resume()
    return driver
