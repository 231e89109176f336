"""Rich progress bars for long loops: items/s and ETA on a terminal, silent otherwise.

Rich allows one live display per console, so a run owns one `ProgressBoard` and every
loop adds its own task line to it (stage units above, items of the current unit below).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# soft_wrap: long paths and SQL stay on one line (copy-pasteable), also in logs and CI.
console = Console(stderr=True, soft_wrap=True)


class _RateColumn(TextColumn):
    def __init__(self) -> None:
        super().__init__("")

    def render(self, task) -> Text:  # type: ignore[override]
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.1f} it/s")


class ProgressBoard:
    """One live display shared by nested loops; a no-op when stderr is not a terminal."""

    def __init__(self, enabled: bool | None = None) -> None:
        enabled = console.is_terminal if enabled is None else enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )

    def __enter__(self) -> ProgressBoard:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """Yield `advance(n)` for a task line that disappears when the loop ends."""
        task_id = self._progress.add_task(description, total=total)
        try:
            yield lambda n=1: self._progress.advance(task_id, n)
        finally:
            self._progress.remove_task(task_id)
