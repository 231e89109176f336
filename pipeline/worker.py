"""Run one unit from a `Job`: lease, stage code, artifacts, then the record. Never the catalog.

    fsr-pipe worker JOB.json [UNIT ...]   # what a Slurm array task runs

Every executor ends here (inline in the driver's process, a pool process, a Ray actor, a
Slurm task). A stage instance lives as long as its process, so the models it loads are built
once per worker. See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from pipeline.artifacts import remove_stale_tmp
from pipeline.jobs import Job, PlanMissing, read_plan
from pipeline.leases import Holding, UnitBusy, check_free, this_host
from pipeline.records import (
    GOOD_ITEMS,
    MetricRecord,
    UnitRecord,
    UnitRow,
    record_path,
    relative_artifacts,
    write_record,
)
from pipeline.stage import PipelineError, Stage, StageContext, load_factory

log = logging.getLogger(__name__)

Progress = Callable[[str, int | None], AbstractContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def no_progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    yield lambda n=1: None


_STAGES: dict[str, dict[str, Stage]] = {}  # factory name -> stage name -> instance


def stage_instance(factory: str, name: str) -> Stage:
    """This process's instance of a stage of `factory` (it caches its models between units)."""
    if factory not in _STAGES:
        _STAGES[factory] = {s.name: s for s in load_factory(factory)()}
    stages = _STAGES[factory]
    if name not in stages:
        raise PipelineError(f"unknown stage {name!r}; stages: {list(stages)}")
    return stages[name]


def context(job: Job, progress: Progress = no_progress) -> StageContext:
    plan = read_plan(job.plan_file)
    return StageContext(config=job.load_config(), inputs=plan.inputs, stage=job.stage,
                        fingerprint=job.fingerprint, progress=progress,
                        log=logging.getLogger(f"stages.{job.stage}"))


def run_job(job: Job, progress: Progress = no_progress) -> UnitRecord:
    """Run the unit, write its record last and return it. A unit that raises gets a
    `failed` record (Ctrl-C and SIGTERM too) and the error propagates."""
    stage = stage_instance(job.factory, job.stage)
    out_dir = job.out_dir
    started = time.time()
    base = dict(stage=job.stage, fingerprint=job.fingerprint, unit_key=job.unit_key,
                host=this_host(), pid=os.getpid(), attempt=job.attempt, started_at=started)
    try:
        check_free(out_dir, job.unit_key, job.load_config().run.lease_s)  # before any write
    except UnitBusy as exc:
        raise PipelineError(str(exc)) from None
    try:
        ctx = context(job, progress)
        expected = stage.fingerprint(ctx.config, ctx.inputs.fingerprints)
        if expected != job.fingerprint:
            raise PipelineError(
                f"{job.stage} {job.unit_key}: this worker computes fingerprint {expected}, "
                f"the driver planned {job.fingerprint}; run the same fsr-pipe version and "
                "config on every node")
    except (PipelineError, PlanMissing) as exc:  # would fail on every retry: a failed record
        error = f"{type(exc).__name__}: {exc}"
        write_record(UnitRecord(**base, status="failed", finished_at=time.time(),
                                error=error), out_dir)
        raise
    record_path(out_dir, job.unit_key).unlink(missing_ok=True)  # an earlier attempt's
    remove_stale_tmp(out_dir / job.unit_key)
    try:
        with Holding(out_dir, job.unit_key, job.attempt, ctx.config.run.heartbeat_s):
            result = stage.run(ctx, UnitRow(job.stage, job.unit_key, job.fingerprint,
                                            "running", job.params))
            good = [MetricRecord(GOOD_ITEMS, float(n), {"item_kind": kind})
                    for kind, n in sorted(result.good.items())]
            record = UnitRecord(**base, status="done", finished_at=time.time(),
                                rows=result.rows, failures=result.failures,
                                artifacts=relative_artifacts(result.artifacts,
                                                             ctx.config.work_dir),
                                metrics=[*result.metrics, *good])
            write_record(record, out_dir)
    except BaseException as exc:  # Ctrl-C and SIGTERM too: say what stopped it
        # A signal may land anywhere up to the done record's rename; once that is on disk the
        # unit is done, whatever comes after.
        if not record_path(out_dir, job.unit_key).exists():
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            write_record(UnitRecord(**base, status="failed", finished_at=time.time(),
                                    error=error), out_dir)
            log.error("%s %s failed after %.1fs: %s", job.stage, job.unit_key,
                      time.time() - started, str(exc) or type(exc).__name__)
        raise
    log.info("%s %s: %d rows (%d bad inputs) in %.1fs -> %s", job.stage, job.unit_key,
             record.rows, len(record.failures), record.seconds, out_dir / job.unit_key)
    return record


def run_job_file(path: Path, units: list[str] | None = None) -> list[UnitRecord]:
    """`fsr-pipe worker`: run the units of a job file (one job, or a list for an array)."""
    import json

    data = json.loads(Path(path).read_text())
    jobs = [Job(**j) for j in data["jobs"]] if "jobs" in data else [Job(**data)]
    if units:
        by_key = {j.unit_key: j for j in jobs}
        missing = [u for u in units if u not in by_key]
        if missing:
            raise PipelineError(f"{path}: no job for unit(s) {missing}; it has "
                                f"{list(by_key)[:5]}{' ...' if len(by_key) > 5 else ''}")
        jobs = [by_key[u] for u in units]
    return [run_job(job) for job in jobs]
