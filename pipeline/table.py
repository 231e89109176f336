"""Text tables for the CLI, drawn as rich draws its default table, without importing rich.

Importing and laying out rich's Table cost ~20 ms and ~50 ms (the two wide tables `run all`
prints), a third of the start-up budget of `status`, `sql` and a no-op `run all`
(docs/benchmarks.md, CLI start-up). A table here is never wrapped: every cell stays on one
line, so a long path or SQL can be copied and the output piped to tools unchanged.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from typing import NamedTuple

# ANSI SGR codes of the few styles the CLI uses.
_SGR = {"bold": "1", "dim": "2", "italic": "3", "red": "31", "bold red": "1;31"}


class Styled(NamedTuple):
    """A cell (or message) shown in a style (a key of _SGR) where colour is on."""

    text: str
    style: str


Cell = str | Styled


def color_on(stream) -> bool:  # noqa: ANN001 - a text stream
    """Colour for a terminal, unless NO_COLOR is set (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def paint(text: str, style: str, color: bool) -> str:
    return f"\x1b[{_SGR[style]}m{text}\x1b[0m" if color and text else text


def render(columns: Sequence[str], rows: Sequence[Sequence[Cell]], title: str | None = None,
           color: bool = False) -> str:
    """The table as lines of text: rich's heavy-head box, cells padded by one space and
    left-aligned, the title centred above (wrapped to the table's width). `color`: ANSI
    styles (bold header, italic title, styled cells)."""
    texts = [[c.text if isinstance(c, Styled) else c for c in row] for row in rows]
    assert all(len(row) == len(columns) for row in texts), "a row per column"
    widths = [max([len(name), *(len(row[i]) for row in texts)]) for i, name in
              enumerate(columns)]

    def rule(left: str, fill: str, cross: str, right: str) -> str:
        return left + cross.join(fill * (w + 2) for w in widths) + right

    def line(cells: Sequence[Cell], edge: str, style: str | None = None) -> str:
        padded = []
        for cell, width in zip(cells, widths):
            text, how = (cell.text, cell.style) if isinstance(cell, Styled) else (cell, style)
            gap = " " * (width - len(text))
            padded.append(" " + (paint(text, how, color) if how else text) + gap + " ")
        return edge + edge.join(padded) + edge

    out = []
    table_width = sum(widths) + 3 * len(widths) + 1
    for part in textwrap.wrap(title, table_width) if title else []:
        left = (table_width - len(part)) // 2
        out.append(" " * left + paint(part, "italic", color) + " " * (table_width - left -
                                                                      len(part)))
    out.append(rule("┏", "━", "┳", "┓"))
    out.append(line(columns, "┃", "bold"))
    out.append(rule("┡", "━", "╇", "┩"))
    out.extend(line(row, "│") for row in rows)
    out.append(rule("└", "─", "┴", "┘"))
    return "\n".join(out)
