"""The `ggfwd` command line (typer). One module per command family (`eval`, `train`, ...); this file only
wires them up and turns a UserError into one line on stderr and exit code 2."""

from __future__ import annotations

import sys

import typer

from ..errors import UserError

app = typer.Typer(
    name="ggfwd",
    help="Forward-only (backpropagation-free) LoRA fine-tuning of LLMs through llama.cpp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Forward-only (backpropagation-free) LoRA fine-tuning of LLMs through llama.cpp."""


def _register() -> None:
    from .eval import eval_command
    from .train import calibrate_command, plot_command, train_command

    app.command("eval", help="Score a model (and optional adapter) on a dataset: accuracy, loss, tokens/s.")(eval_command)
    app.command("train", help="Train a LoRA adapter with perturbed inferences only. "
                              "With no arguments: the Gemma-3-270M SST-2 demo.")(train_command)
    app.command("calibrate", help="Measure the loss noise floor and curvature on two batches and choose eps.")(calibrate_command)
    app.command("plot", help="Draw a run's loss and accuracy curves to a PNG.")(plot_command)
    from .federate import federate_command

    app.command("federate", help="Federated training simulated in one process: clients with private data on "
                                 "device profiles, seeds and scalars both ways. With no arguments: an SST-2 demo.")(federate_command)
    from .serve import certs_command, join_command, serve_command

    app.command("serve", help="Coordinate a federation across machines on Flower: start a SuperLink and run the "
                              "rounds; nodes join with ggfwd join (needs the federated extra).")(serve_command)
    app.command("join", help="Join a federation started by ggfwd serve as a Flower SuperNode, training on this "
                             "device's own data (needs the federated extra).")(join_command)
    app.command("certs", help="Make a CA, a server certificate and node keys for ggfwd serve on a LAN.")(certs_command)
    from .devices import app as devices_app; app.add_typer(devices_app, name="devices", help="Device profiles: list, show, compare for a model and training shape, measure this machine (bench).")  # noqa: E702
    from .convert import convert_command, export_command

    app.command("convert", help="Convert a Hugging Face checkpoint (or a GGUF) into a GGUF base model "
                                "plus a separate F32 LoRA adapter.")(convert_command)
    app.command("export", help="Export a trained adapter to PEFT (safetensors) or a llama.cpp GGUF.")(export_command)


_register()


def _warn_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main() -> None:
    import warnings

    warnings.showwarning = _warn_one_line
    try:
        app()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
