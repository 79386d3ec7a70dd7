"""`ggfwd devices list | show | compare | bench`: device profiles from the terminal.

- `list`: every profile found (built-in, `--profiles DIR`, `$GGFWD_PROFILES`, the user folder) with where its
  numbers come from.
- `show NAME`: one profile in full.
- `compare NAME...`: for one model and training configuration, side by side: predicted peak memory against
  each device's budget, seconds per forward pass, per perturbation and per step, perturbations per minute,
  time for 1,000 passes; `--plot FILE.png` draws it.
- `bench`: measures this machine through the real scoring session and trainer and writes a profile.

Tables fit the terminal (`screen.print_fitting`): a row per device with every column where that fits, else
fewer columns or a column per device, else a block per device; `--wide` prints every column. The profile,
memory and speed modules are imported inside the commands: together about 20 ms of every `ggfwd` start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..errors import UserError
from .options import MEMORY_OPTION, flag
from .screen import WIDE_OPTION, light_table, print_fitting

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Device profiles: list, show, compare for a model and training shape, measure this machine.")
err = Console(stderr=True)
MIB = 2 ** 20

PROFILES_OPTION = typer.Option(None, "--profiles", help="Extra folder of profile TOML files (searched first; "
                                                        "$GGFWD_PROFILES works too).")
JSON_OPTION = flag("--json", help="Print JSON on stdout instead of a table.")
SHOW_TABLE_WIDTH = 120  # `devices show` as three columns from this width: its sources are paragraphs


def _dirs(profiles: Optional[Path]):
    return [profiles] if profiles else None


def _short(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _origin(p) -> str:
    """Where the speed comes from, in a few words: the bench run, or the first cited address."""
    import re

    text = p.section("speed").get("source", "")
    if "ggfwd devices bench" in text and "bench" in p.raw:
        return f"measured by ggfwd devices bench, {p.raw['bench'].get('date', '')}"
    url = re.search(r"https?://[^\s)]+", text)
    return f"cited: {url.group(0).rstrip('.,;')}" if url else _short(text, 60)


def _rates(p, sep: str = ", ") -> str:
    return sep.join(f"{q} {r:,.0f}" for q, r in p.gflops.items())


def _memory(p) -> str:
    return f"{p.memory_budget_mib / 1024:.1f} / {p.memory_total_mib / 1024:.1f}"


@app.command("list", help="List every device profile found, with the source of its numbers.")
def list_command(profiles: Optional[Path] = PROFILES_OPTION, as_json: bool = JSON_OPTION, wide: bool = WIDE_OPTION):
    from ..profiles import list_profiles

    found = list_profiles(_dirs(profiles))
    if as_json:
        print(json.dumps([p.as_dict() for p in found]))
        return
    full = Table()
    for col in ("name", "kind", "os", "backend", "threads", "budget / RAM GiB", "GFLOP/s", "source of the speed"):
        full.add_column(col, justify="right" if col in ("threads", "budget / RAM GiB", "GFLOP/s") else "left",
                        overflow="fold")
    # About 80 columns: no os, the backend with its threads, one rate per line, the sources as notes below.
    compact = light_table("name", "kind", "backend", "budget /\nRAM GiB", "GFLOP/s", "source",
                          right=("budget /\nRAM GiB", "GFLOP/s"))
    origins: dict[str, int] = {}
    # Narrower: a block per profile.
    blocks = Table.grid(padding=(0, 2))
    blocks.add_column(overflow="fold")
    blocks.add_column(overflow="fold")
    for i, p in enumerate(found):
        origin = _origin(p)
        note = origins.setdefault(origin, len(origins) + 1)
        full.add_row(p.name, p.kind, p.os, p.backend, str(p.threads), _memory(p), _rates(p), escape(origin))
        compact.add_row(p.name, p.kind, f"{p.backend} x{p.threads}", _memory(p), _rates(p, "\n"), f"\\[{note}]")
        if i:
            blocks.add_row("", "")
        blocks.add_row(Text(p.name, style="bold"), f"{p.kind}, {p.os}, {p.backend} x{p.threads}")
        blocks.add_row("memory", f"{_memory(p)} GiB (budget / RAM)")
        blocks.add_row("GFLOP/s", _rates(p))
        blocks.add_row("speed from", escape(origin))
    notes = Text("\n".join(f"[{n}] {origin}" for origin, n in origins.items()))
    print_fitting(Console(), [full, Group(compact, notes), blocks], wide, title=f"ggfwd device profiles ({len(found)})")


@app.command("show", help="Show one profile in full: every number and where it comes from.")
def show_command(name: str = typer.Argument(..., help="Profile name or path to a .toml file."),
                 profiles: Optional[Path] = PROFILES_OPTION, as_json: bool = JSON_OPTION,
                 wide: bool = WIDE_OPTION):
    from ..profiles import load_profile

    p = load_profile(name, _dirs(profiles))
    if as_json:
        print(json.dumps(p.as_dict()))
        return
    rows = [("device", f"{p.kind}, {p.os}, {p.backend} backend, {p.threads} threads", p.source)]
    for section in ("memory", "speed", "numerics", "network", "availability"):
        values = {k: v for k, v in p.section(section).items() if k != "source"}
        if values:
            shown = "\n".join(f"{k} = {json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items())
            rows.append((section, shown, p.section(section).get("source", "")))
    bench = p.section("bench")
    if bench:
        points = bench.pop("points", [])
        shown = "\n".join(f"{k} = {v}" for k, v in bench.items())
        shown += "".join(f"\n{q['model']}: {q['tokens']} tokens, {q['seconds']:.3f} s" for q in points)
        rows.append(("bench", shown, "what the ggfwd devices bench run recorded"))
    rows.append(("file", str(p.path), ""))
    table = Table(show_lines=True)
    for col in ("field", "value", "source"):
        table.add_column(col, overflow="fold")
    # Narrower than SHOW_TABLE_WIDTH, the sources (paragraphs) go under the values, across the whole width.
    blocks = Table.grid(padding=(0, 2))
    blocks.add_column(overflow="fold")
    blocks.add_column(overflow="fold")
    for i, (field, shown, source) in enumerate(rows):
        table.add_row(field, escape(shown), escape(source))
        if i:
            blocks.add_row("", "")
        blocks.add_row(Text(field, style="bold"), escape(shown))
        if source:
            blocks.add_row("", Text(f"source: {source}", style="dim"))
    print_fitting(Console(), [(table, SHOW_TABLE_WIDTH), blocks], wide, title=f"{p.name}: {p.description}")


def _comparison(names, model, rank, targets, batch_size, tokens, directions, optimizer, profiles, memory="standard"):
    from ..demo import demo_model
    from ..memory import TrainingShape, predict_memory
    from ..modelstats import ModelStats
    from ..profiles import load_profile

    if not names:
        raise UserError("name at least one device profile to compare")
    devices = [load_profile(n, _dirs(profiles)) for n in names]
    shape = TrainingShape(batch_size=batch_size, tokens=tokens, rank=rank,
                          targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
                          directions=directions, optimizer=optimizer, memory=memory)
    stats = ModelStats.from_gguf(model or demo_model())
    n_lora = stats.lora_params(shape.targets, shape.rank)
    if stats.tied_embeddings and any("token_embd" in t for t in shape.targets):
        raise UserError("this model ties its embeddings: an adapter on token_embd is not possible")
    rows = []
    for p in devices:
        mem = predict_memory(stats, shape, runtime_bytes=int(p.runtime_mib * MIB), backend=p.backend)
        s_pass = p.seconds_per_pass(stats, shape.tokens_per_pass, shape.outputs_per_pass, shape.tokens)
        flops = stats.flops_per_pass(shape.tokens_per_pass, shape.outputs_per_pass, shape.tokens)
        by_type = stats.flops_by_type(shape.tokens_per_pass, shape.outputs_per_pass, shape.tokens)
        per_step = shape.passes_per_step * s_pass
        rows.append({
            "profile": p.name, "kind": p.kind, "backend": p.backend, "threads": p.threads,
            "memory_bytes": mem.total, "memory_parts": mem.as_dict(), "budget_bytes": p.memory_budget_bytes,
            "fits": mem.total <= p.memory_budget_bytes, "headroom_bytes": p.memory_budget_bytes - mem.total,
            "gflop_per_pass": flops / 1e9, "effective_gflops": flops / 1e9 / max(s_pass - p.overhead_s, 1e-12),
            "rates_used": {k: {"gflops": p.rate(k)[0], "from": p.rate(k)[1], "gflop": f / 1e9} for k, f in by_type.items()},
            "seconds_per_pass": s_pass, "seconds_per_perturbation": 2 * s_pass, "seconds_per_step": per_step,
            "perturbations_per_minute": 60.0 / (2 * s_pass), "seconds_per_1000_passes": 1000 * s_pass,
        })
    return {"model": {k: v for k, v in stats.as_dict().items()},
            "training": {"batch_size": shape.batch_size, "tokens": shape.tokens, "tokens_per_pass": shape.tokens_per_pass,
                         "rank": shape.rank, "targets": list(shape.targets), "lora_params": n_lora,
                         "directions": shape.directions, "passes_per_step": shape.passes_per_step,
                         "optimizer": shape.optimizer, "memory": shape.memory},
            "devices": rows}


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# What `devices compare` shows of each device: (header, short header for narrow tables, cell from the row).
_FIGURES = [
    ("backend", "backend", lambda r: f"{r['backend']} x{r['threads']}"),
    ("peak memory MiB", "MiB", lambda r: f"{r['memory_bytes'] / MIB:,.0f}"),
    ("budget MiB", "", lambda r: f"{r['budget_bytes'] / MIB:,.0f}"),
    ("fits", "fits", lambda r: (f"[green]yes[/] (+{r['headroom_bytes'] / MIB:,.0f})" if r["fits"]
                                else f"[red]no[/] (short {-r['headroom_bytes'] / MIB:,.0f})")),
    ("GFLOP/s", "GFLOP/s", lambda r: f"{r['effective_gflops']:,.0f}"),
    ("s / pass", "s/pass", lambda r: f"{r['seconds_per_pass']:.3g}"),
    ("s / perturbation", "", lambda r: f"{r['seconds_per_perturbation']:.3g}"),
    ("perturbations / min", "", lambda r: f"{r['perturbations_per_minute']:.3g}"),
    ("1,000 passes", "1k passes", lambda r: _duration(r["seconds_per_1000_passes"])),
]


def _comparison_layouts(rows: list) -> list:
    """`devices compare`'s layouts, widest first: a row per device with every figure; a column per device (three
    devices fit 80 columns); a row per device with the figures that have a short header (the budget is the peak
    plus what `fits` says is left; a perturbation is two passes); a column per device, one device at a time."""
    left = ("device", "backend", "fits")
    full = Table()
    for header in ("device", *(h for h, _, _ in _FIGURES)):
        full.add_column(header, justify="left" if header in left else "right", overflow="fold")
    short = [(h, cell) for _, h, cell in _FIGURES if h]
    compact = light_table("device", *(h for h, _ in short), right=tuple(h for h, _ in short if h not in left))
    for r in rows:
        full.add_row(r["profile"], *(cell(r) for _, _, cell in _FIGURES))
        compact.add_row(r["profile"], *(cell(r) for _, cell in short))

    def by_column(devices: list) -> Table:
        table = light_table("", *(r["profile"] for r in devices), right=tuple(r["profile"] for r in devices))
        for header, _, cell in _FIGURES:
            table.add_row(header, *(cell(r) for r in devices))
        return table

    one_by_one = []
    for r in rows:
        one_by_one += [Text(""), by_column([r])] if one_by_one else [by_column([r])]
    return [full, by_column(rows), compact, Group(*one_by_one)]


@app.command("compare", help="Compare devices for one model and training shape: memory against budget, "
                             "seconds per pass, perturbations per minute, time for 1,000 passes.")
def compare_command(
    names: List[str] = typer.Argument(None, help="Profile names (or .toml paths) to compare."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Base GGUF model (default: the demo Gemma-3-270M)."),
    rank: int = typer.Option(8, help="LoRA rank."),
    targets: str = typer.Option("attn_q,attn_v", help="Comma-separated weight patterns the adapter covers."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Examples per forward pass."),
    tokens: int = typer.Option(64, help="Tokens per example (the session is sized for exactly this)."),
    directions: int = typer.Option(1, help="Perturbation directions per step (2 passes each, central differences)."),
    optimizer: str = typer.Option("sgd", help="sgd or adam (adam keeps two more values per trained parameter)."),
    memory: Optional[str] = MEMORY_OPTION,
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw a bar chart to this .png file."),
    profiles: Optional[Path] = PROFILES_OPTION,
    as_json: bool = JSON_OPTION,
    wide: bool = WIDE_OPTION,
):
    if plot is not None and plot.suffix.lower() != ".png":
        raise UserError(f"--plot writes a PNG: give a file name ending in .png, got {plot}")
    result = _comparison(names, model, rank, targets, batch_size, tokens, directions, optimizer, profiles,
                         memory or "standard")
    if plot is not None:
        _plot(result, plot)
    if as_json:
        print(json.dumps(result))
        return
    m, t = result["model"], result["training"]
    title = (f"{m['name']} ({m['params'] / 1e9:.2f}B, {m['quant']}): batch {t['batch_size']} x {t['tokens']} tokens, "
             f"rank-{t['rank']} LoRA on {','.join(t['targets'])} ({t['lora_params']:,} values), "
             f"{t['directions']} direction(s)/step, {t['memory']} memory")
    print_fitting(Console(), _comparison_layouts(result["devices"]), wide, title=title)
    err.print(f"{result['devices'][0]['gflop_per_pass']:,.1f} GFLOP per pass; GFLOP/s: each device's rates "
              "(by weight type, or its default) applied to this model's mix of types")
    if plot is not None:
        err.print(f"wrote {plot}")


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'ggfwd[plot]'") from None
    from ..files import atomic_path

    rows = result["devices"]
    names = [r["profile"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 4), 4))
    ax = axes[0]
    ax.bar(names, [r["seconds_per_pass"] for r in rows], color="tab:blue")
    ax.set_yscale("log")
    ax.set_ylabel("seconds per forward pass (log)")
    ax.set_title("speed")
    ax = axes[1]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["memory_bytes"] / MIB for r in rows], width=0.4, label="predicted peak")
    ax.bar([i + 0.2 for i in x], [r["budget_bytes"] / MIB for r in rows], width=0.4, label="budget")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("MiB")
    ax.set_title("memory")
    ax.legend()
    for a in axes:
        a.tick_params(axis="x", rotation=30)
    m, t = result["model"], result["training"]
    fig.suptitle(f"{m['name']}: batch {t['batch_size']} x {t['tokens']} tokens, rank {t['rank']}")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


@app.command("bench", help="Measure this machine through the real scoring session (adapter reloaded before "
                           "every pass) and trainer, fit the speed model and write a profile.")
def bench_command(
    model: Optional[List[Path]] = typer.Option(None, "--model", "-m", help="GGUF model(s) to measure (repeat for several "
                                                                          "sizes; default: the demo Gemma-3-270M)."),
    save: Optional[str] = typer.Option(None, "--save", help="Write the profile as NAME.toml into --profiles DIR, the "
                                                            "first folder of $GGFWD_PROFILES, or the user folder."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the profile to this .toml file instead."),
    threads: Optional[int] = typer.Option(None, min=1, help="Compute threads (default: physical cores)."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Examples per pass."),
    tokens: int = typer.Option(64, help="Tokens per example."),
    repeats: int = typer.Option(3, min=1, help="Timed passes per batch shape (median)."),
    steps: int = typer.Option(2, min=1, help="Training steps measured for the peak memory."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", metavar="", help="Also measure noise floor and eps on SST-2 batches."),
    batches: int = typer.Option(2, min=1, help="Calibration batches."),
    directions: int = typer.Option(4, min=1, help="Calibration directions per batch."),
    smoke: bool = flag("--smoke", help="Smallest run that exercises every part (1 repeat, 1 step, a "
                                       "3-candidate calibration on 1 batch): seconds on a tiny model."),
    kind: str = typer.Option("server", help="Device kind written to the profile: phone, laptop, desktop, sbc, server."),
    budget: float = typer.Option(0.5, help="Memory budget as a fraction of total memory (written as derived)."),
    availability: float = typer.Option(1.0, help="Chance this machine is online in a round (written as assumed)."),
    description: Optional[str] = typer.Option(None, help="Profile description (default: from the hardware)."),
    profiles: Optional[Path] = PROFILES_OPTION,
    as_json: bool = JSON_OPTION,
    verbose: bool = flag("--verbose", "-v", help="Show llama.cpp's log."),
):
    from ..demo import demo_model
    from ..devicebench import fit_speed, measure_model, profile_dict
    from ..profiles import KINDS, save_profile, search_dirs
    from ..progress import progress_bar
    from ..session import default_threads

    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, got '{kind}'")
    if not 0 < budget <= 1:
        raise UserError(f"--budget is a fraction of total memory in (0, 1], got {budget}")
    if not 0 < availability <= 1:
        raise UserError(f"--availability must lie in (0, 1], got {availability}")
    if save is not None and (not save or not all(c.isalnum() or c in "-_." for c in save) or save.startswith(".")):
        raise UserError(f"--save takes a profile name (letters, digits, '-', '_', '.'), got '{save}'")
    if save and out:
        raise UserError("--save and --out both say where to write the profile: give one")
    if out is not None and out.suffix != ".toml":
        raise UserError(f"--out must name a .toml file, got {out}")
    paths = list(model or []) or [demo_model()]
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"model file not found: {p}")
    threads = threads or default_threads()
    if smoke:
        repeats, steps, batches, directions = 1, 1, 1, 1
    candidates = (0.01, 0.1, 0.3) if smoke else None
    name = save or (out.stem if out else "this-machine")
    target = out
    if save:
        folder = search_dirs(_dirs(profiles))[0]
        target = folder / f"{save}.toml"
    benches = []
    with progress_bar(err, as_json) as bar:
        jobs = {}

        def progress(done, total, what, key):
            if key not in jobs:
                jobs[key] = bar.add_task(Path(key).name, total=total)
            bar.update(jobs[key], completed=done, total=total, description=what)

        for p in paths:
            benches.append(measure_model(p, threads=threads, batch_size=batch_size, tokens=tokens, repeats=repeats,
                                         steps=steps, calibrate=calibrate, calibration_batches=batches,
                                         calibration_directions=directions, candidates=candidates,
                                         on_progress=lambda d, t, w, key=str(p): progress(d, t, w, key),
                                         verbose=verbose))
    data = profile_dict(name, benches, threads=threads, description=description, kind=kind,
                        budget_fraction=budget, availability=availability,
                        note="smoke run: too few passes to trust" if smoke else "")
    if target is not None:
        save_profile(data, target)
    rates, overhead = fit_speed([q for b in benches for q in b.points])
    if as_json:
        print(json.dumps({"profile": data, "path": str(target) if target else None,
                          "predicted_memory": [b.predicted.as_dict() for b in benches],
                          "measured_step_peak_rss": [b.step_peak_rss for b in benches]}))
        return
    headers = ("model", "tokens\nper pass", "s per\npass", "tokens\nper s", "fitted\ns/pass", "step peak\nMiB",
               "predicted\nMiB")
    table = light_table(*headers, right=headers[1:])  # about 80 columns with the demo model's file name
    blocks = Table.grid(padding=(0, 2))  # narrower: a block per model
    blocks.add_column(overflow="fold")
    blocks.add_column(overflow="fold")
    for i, b in enumerate(benches):
        if i:
            blocks.add_row("", "")
        blocks.add_row(Text(b.stats.name, style="bold"), f"training step peak {b.step_peak_rss / MIB:,.0f} MiB, "
                                                          f"predicted {b.predicted.total / MIB:,.0f}")
        for q in b.points:
            fit = overhead + sum(f / (rates.get(k, rates["default"]) * 1e9) for k, f in q.flops.items())
            table.add_row(b.stats.name, str(q.tokens), f"{q.seconds:.3f}", f"{q.tokens / q.seconds:.0f}", f"{fit:.3f}",
                          f"{b.step_peak_rss / MIB:,.0f}", f"{b.predicted.total / MIB:,.0f}")
            blocks.add_row(f"{q.tokens} tokens", f"{q.seconds:.3f} s per pass (fitted {fit:.3f}), "
                                                 f"{q.tokens / q.seconds:.0f} tokens/s")
    print_fitting(Console(), [table, blocks], title=f"ggfwd devices bench: {threads} thread(s), batch {batch_size} x "
                                                    f"{tokens} tokens")
    Console().print(f"speed model: {', '.join(f'{r:.1f} GFLOP/s for {q}' for q, r in rates.items())}, "
                    f"overhead {overhead * 1000:.1f} ms per pass")
    for b in benches:
        if b.calibration is not None:
            Console().print(f"{b.stats.name}: noise floor {b.calibration.noise_floor:.3g}, eps {b.calibration.eps:g}")
        elif b.calibration_note:
            Console().print(f"{b.stats.name}: {b.calibration_note}")
    if target is not None:
        Console().print(f"wrote {target} (compare it: ggfwd devices compare {name}"
                        f"{' --profiles ' + str(profiles) if profiles else ''})")
    else:
        Console().print("profile not written: give --save NAME or --out FILE.toml")
