"""Option helpers shared by the commands."""

import typer


def flag(*names: str, help: str):
    """A boolean flag: present or absent, shown in --help without a value placeholder."""
    return typer.Option(False, *names, help=help, metavar="")
