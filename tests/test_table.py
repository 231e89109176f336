"""pipeline.table draws what rich's default Table draws (the README shows its output), without
rich: the light commands start without it (issue 19)."""

from __future__ import annotations

import pytest
from rich.console import Console
from rich.table import Table

from pipeline.table import Styled, render

RECALL_TITLE = ("Query by query at R@1: +queries only FSR finds, -queries only the other "
                "finds; p: exact sign test (small p: a real difference)")


def drawn_by_rich(columns: list[str], rows: list[list[str]], title: str | None) -> str:
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*row)
    console = Console(width=400, color_system=None)
    with console.capture() as capture:
        console.print(table)
    return capture.get().rstrip("\n")


@pytest.mark.parametrize(("columns", "rows", "title"), [
    (["protocol", "queries", "fusion", "n", "FSR vs untr"],
     [["gallery", "art", "none", "31", "+8 -2 p=0.11"],
      ["batch", "single styles", "softmax-max", "124", "+11 -10 p=1"]], RECALL_TITLE),
    (["stage", "notes"], [["ingest", ""], ["extract", "VGG weights: seeded random init"]],
     "fsr-pipe status: /tmp/run"),
    (["a"], [], None),
    (["a wide header", "b"], [["x", "a much wider cell than its header"]], "t"),
])
def test_same_text_as_rich(columns, rows, title) -> None:
    assert render(columns, rows, title) == drawn_by_rich(columns, rows, title)


def test_styles_only_with_color() -> None:
    rows = [["x", Styled("not planned", "dim")]]
    plain = render(["a", "b"], rows)
    assert "\x1b" not in plain and "not planned" in plain
    colored = render(["a", "b"], rows, color=True)
    assert "\x1b[2mnot planned\x1b[0m" in colored and "\x1b[1ma\x1b[0m" in colored
    # the escape codes take no width: the lines strip to the plain table
    assert [len(line) for line in plain.splitlines()] == [
        len(line.replace("\x1b[2m", "").replace("\x1b[1m", "").replace("\x1b[0m", ""))
        for line in colored.splitlines()]
