"""Option helpers shared by the commands."""

import typer


def flag(*names: str, help: str):
    """A boolean flag: present or absent, shown in --help without a value placeholder."""
    return typer.Option(False, *names, help=help, metavar="")


MEMORY_HELP = ("How llama.cpp holds the model: standard (weights mapped, a KV stream per sequence) or lean "
               "(weights read, one shared KV stream: about half the memory at 7B; losses differ by about 0.1%) "
               "\\[default: standard].")
MEMORY_OPTION = typer.Option(None, "--memory", help=MEMORY_HELP)
