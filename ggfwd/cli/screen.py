"""Tables that fit the terminal they are printed on.

Devices are compared on laptops (often 80 columns) and in Termux on phones (40-60 columns). A rich table wider
than its console is squeezed: headers are cut to `devi…`, numbers to `1,0…`, and every row wraps over two lines.
So a command offers its layouts from the widest (every column) to the narrowest (one small block per item), and
the first that fits the console's width is printed; `--wide` prints the widest whatever the width (for a file,
or a pager that scrolls sideways).
"""

from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text

from ..progress import natural_width
from .options import flag

WIDE_OPTION = flag("--wide", help="Print every column, whatever the terminal's width.")


def light_table(*headers: str, right: tuple = ()) -> Table:
    """A table without side borders or vertical rules (two spaces between columns): about a third narrower than
    rich's default box. Columns fold their text instead of cutting it with an ellipsis."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for h in headers:
        table.add_column(h, justify="right" if h in right else "left", overflow="fold")
    return table


def print_fitting(console, layouts: list, wide: bool = False, title: str | None = None) -> None:
    """Print the first of `layouts` (widest first) that fits `console`, or the last; with `wide`, the first at its
    natural width. A layout is a renderable, which fits when its natural width does, or (renderable, columns) for
    one whose cells wrap by design (paragraphs), which fits from that many columns. `title` goes above it."""
    def need(layout) -> int:
        return layout[1] if isinstance(layout, tuple) else natural_width(console, layout)

    chosen = layouts[0] if wide else next((x for x in layouts if need(x) <= console.width), layouts[-1])
    width = console.width
    if wide:
        console.width = max(width, need(chosen))  # rich clamps print(width=...) to the console's own width
    heading = [Text(title, style="bold")] if title else []
    try:
        console.print(*heading, chosen[0] if isinstance(chosen, tuple) else chosen)
    finally:
        console.width = width
