"""Option helpers shared by the commands."""

import typer


def flag(*names: str, help: str):
    """A boolean flag: present or absent, shown in --help without a value placeholder."""
    return typer.Option(False, *names, help=help, metavar="")


MEMORY_HELP = ("How llama.cpp holds the model: standard (weights mapped, a KV stream per sequence) or lean "
               "(weights read, one shared KV stream: about half the memory at 7B; losses differ by about 0.1%) "
               "\\[default: standard].")
MEMORY_OPTION = typer.Option(None, "--memory", help=MEMORY_HELP)

LR_SCALING_OPTION = typer.Option(
    None, "--lr-scaling",
    help="Step size of an update that averages N directions (over clients and their directions): linear (N x "
         "--lr), sqrt (sqrt(N) x --lr), none, or auto (sqrt; none with --max-staleness) \\[default: auto].")
LR_SCALE_MAX_OPTION = typer.Option(None, "--lr-scale-max", help="Cap on that factor (0: none) \\[default: 0].")
SPREAD_OPTION = typer.Option(
    None, "--spread",
    help="Where a step's (a client's) directions are scored: all on one batch (directions), or each on its own "
         "batch (batches; central schemes) \\[default: directions].")
