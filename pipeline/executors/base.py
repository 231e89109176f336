"""The executor interface: run a stage's jobs somewhere, report each job's end to the driver.

An executor never touches the catalog. For each job it calls `finished(Outcome)` once, in
the driver's process: with the unit's record when the worker wrote one (done or failed), or
with `record=None` and a reason when the worker ended without one (killed, node lost,
preempted): the driver retries those up to `run.max_retries`. See docs/distributed.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pipeline.config import Config
from pipeline.frozen import frozen
from pipeline.jobs import Job
from pipeline.records import UnitRecord, read_record

# Stages that compute on the GPU when there is one; index too when index.use_gpu is on.
GPU_STAGES = frozenset({"extract", "train", "embed", "score"})


def gpu_stages(config: Config) -> frozenset[str]:
    """The stages a cluster executor gives a GPU (when it has GPUs to give)."""
    return GPU_STAGES | ({"index"} if config.index.use_gpu else set())


class HandedOff(Exception):  # noqa: N818 - not an error: the run goes on elsewhere
    """The executor handed the work to someone else (e.g. wrote a Slurm script for the user
    to submit); the driver stops here and says what to do next."""


@frozen
class Outcome:
    job: Job
    record: UnitRecord | None  # None: the worker ended without writing one
    reason: str | None = None  # why there is no record (infrastructure failure)


Finished = Callable[[Outcome], None]


def read_own_record(job: Job) -> UnitRecord | None:
    """The record `job`'s attempt wrote, if any (a worker may die right after writing it)."""
    try:
        record = read_record(job.out_dir, job.unit_key)
    except ValueError:  # half a file: not written by os.replace, so not a record of ours
        return None
    if record is None or (record.attempt, record.fingerprint) != (job.attempt, job.fingerprint):
        return None
    return record


def run_job_json(job_json: str, threads: int) -> str:
    """In a worker process (pool worker, Ray actor): run the job on `threads` torch threads
    and return its record's JSON (failed ones too). An error before the unit wrote a record
    is raised for the executor to see as a lost attempt."""
    import os

    import torch

    from pipeline.worker import run_job

    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    job = Job.from_json(job_json)
    try:
        return run_job(job).to_json()
    except Exception:
        record = read_own_record(job)
        if record is None:
            raise
        return record.to_json()


class Executor:
    """Base class: `run` blocks until every job has ended (or raises)."""

    name = "base"

    def run(self, jobs: Sequence[Job], finished: Finished) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers (pools, actors) at the end of a run."""
