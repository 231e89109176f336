"""Rich progress bars for long loops: items/s and ETA on a terminal, silent otherwise.

Rich allows one live display per console, so a run owns one `ProgressBoard` and every
loop adds its own task line to it (stage units above, items of the current unit below).
rich loads with the first bar shown: a run with nothing to do, or one whose stderr is not
a terminal, starts without it (docs/benchmarks.md, CLI start-up).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress


@functools.cache
def console() -> Console:
    """The stderr console that the bars and the terminal's log lines share."""
    from rich.console import Console

    # soft_wrap: long paths and SQL stay on one line (copy-pasteable), also in logs and CI.
    return Console(stderr=True, soft_wrap=True)


def _progress() -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(TextColumn):
        def __init__(self) -> None:
            super().__init__("")

        def render(self, task) -> Text:  # type: ignore[override]
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:,.1f} it/s")

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    RateColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console())


class ProgressBoard:
    """One live display shared by nested loops; a no-op when stderr is not a terminal.
    The display starts with the first task that has work (a total above zero)."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress: Progress | None = None

    def __enter__(self) -> ProgressBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """Yield `advance(n)` for a task line that disappears when the loop ends."""
        if not self.enabled or (self._progress is None and total == 0):
            yield lambda n=1: None
            return
        if self._progress is None:
            self._progress = _progress()
            self._progress.start()
        progress = self._progress
        task_id = progress.add_task(description, total=total)
        try:
            yield lambda n=1: progress.advance(task_id, n)
        finally:
            progress.remove_task(task_id)
