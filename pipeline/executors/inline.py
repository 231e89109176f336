"""`inline`: run each job in the driver's own process, one after another (the default)."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.executors.base import Executor, Finished, Outcome
from pipeline.jobs import Job
from pipeline.worker import Progress, no_progress, run_job


class InlineExecutor(Executor):
    name = "inline"

    def __init__(self, progress: Progress = no_progress) -> None:
        self.progress = progress

    def run(self, jobs: Sequence[Job], finished: Finished) -> None:
        # A unit that raises wrote its failed record; the error goes on to the driver as is.
        for job in jobs:
            finished(Outcome(job, run_job(job, self.progress)))
