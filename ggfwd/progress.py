"""Rich progress bars with ETA, the same look everywhere, fitted to the console's width.

A terminal is often 80 columns wide, and Termux on a phone 40-60; rich cuts a line that does not fit into
`training ━━━ 2… loss 0.3504 ... 0:… eta 0:…`. So the bar narrows with the console (40 cells from 100 columns,
down to 10), the elapsed time is left out below 70 columns, and a run's live figures (a task's `info` field:
loss, accuracy, bytes) sit beside the bar when the whole line fits, else on lines of their own under it, broken
between two figures, never inside one.
"""

from __future__ import annotations

from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

FIGURE_SEPARATOR = "  "  # between the figures of an `info` field; the only place a line of figures breaks


def natural_width(console, renderable) -> int:
    """The width `renderable` takes when nothing has to wrap or be cut (rich clamps a plain measurement to the
    console's width, which would make everything look as if it fitted)."""
    return Measurement.get(console, console.options.update_width(100_000), renderable).maximum


def progress_bar(console, disable: bool = False, *extra_columns, info: bool = False) -> Progress:
    """A progress display on `console`. With `info`, every task carries an `info` field (figures separated by
    two spaces) shown beside its bar or under it, whichever fits the console."""
    width = console.width
    columns = [TextColumn("[bold]{task.description}"), BarColumn(bar_width=max(10, min(40, width - 60))),
               MofNCompleteColumn(), *extra_columns]
    timing = [TimeElapsedColumn()] if width >= 70 else []
    timing += [TextColumn("eta"), TimeRemainingColumn(compact=width < 70)]
    if not info:
        return Progress(*columns, *timing, console=console, disable=disable, transient=False)
    return _FiguresProgress(columns, timing, console=console, disable=disable, transient=False)


def pack_figures(info: str, width: int) -> list[str]:
    """The figures of `info` on as few lines of at most `width` characters as they fit; a figure longer than the
    width gets a line of its own."""
    lines: list[str] = []
    for figure in (f.strip() for f in info.split(FIGURE_SEPARATOR)):
        if not figure:
            continue
        if lines and len(lines[-1]) + len(FIGURE_SEPARATOR) + len(figure) <= width:
            lines[-1] += FIGURE_SEPARATOR + figure
        else:
            lines.append(figure)
    return lines


class _FiguresProgress(Progress):
    """Progress whose tasks' `info` goes between the count and the times when the line fits, else below."""

    def __init__(self, columns: list, timing: list, console, **kw):
        self._console = console  # rich asks for the renderables before it sets self.live (and self.console)
        self._beside = [*columns, TextColumn("{task.fields[info]}"), *timing]
        self._below = [*columns, *timing]
        super().__init__(*self._beside, console=console, **kw)

    def _table(self, columns) -> Table:
        table = Table.grid(*(c.get_table_column().copy() for c in columns), padding=(0, 1), expand=self.expand)
        for task in self.tasks:
            if task.visible:
                table.add_row(*(c(task) for c in columns))
        return table

    def get_renderables(self):
        width = self._console.width
        beside = self._table(self._beside)
        if natural_width(self._console, beside) <= width:
            yield beside
            return
        yield self._table(self._below)
        for task in self.tasks:
            if task.visible and task.fields.get("info"):
                yield Text("\n".join(pack_figures(task.fields["info"], width)))
