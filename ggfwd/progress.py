"""Rich progress bars with ETA, the same look everywhere."""

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(console, disable: bool = False, *extra_columns) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    *extra_columns, TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, disable=disable, transient=False)
