"""The driver: plan each stage once, hand the units not done to an executor, ingest records.

A unit is done when its record (written last by the worker, beside its artifacts) is in the
catalog for its fingerprint; the driver is the catalog's only writer. Anything else (a lease
whose process is gone, a temporary file) is leftover of a crash and is redone or removed.
See docs/resume.md and docs/distributed.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.artifacts import remove_stale_tmp
from pipeline.catalog import Catalog
from pipeline.config import Config
from pipeline.executors import Executor, Outcome, make_executor
from pipeline.jobs import Inputs, Job, StagePlan, plan_path, write_plan
from pipeline.leases import Lease, read_leases, release
from pipeline.plans import (
    failure_summary,
    fingerprints,
    ingest_records,
    plan_meta,
    stage_closure,
    too_many_failures,
)
from pipeline.records import UnitRecord, UnitRow, run_relative
from pipeline.stage import PipelineError, Stage, StageContext, StageFactory, factory_name

if TYPE_CHECKING:
    from pipeline.progress import ProgressBoard

INGEST_EVERY_S = 2.0  # ingest finished records at most this often (and when a round ends)

log = logging.getLogger(__name__)


@dataclass
class StageReport:
    stage: str
    fingerprint: str
    units: int = 0
    ran: int = 0
    skipped: int = 0
    retried: int = 0
    busy: list[str] = field(default_factory=list)


def upstream_inputs(catalog: Catalog, stage: Stage, fingerprints: dict[str, str],
                    work_dir: Path) -> Inputs:
    """What `stage` reads of the stages it needs, from the catalog (paths made relative)."""
    fps = {name: fingerprints[name] for name in stage.needs}
    artifacts, failed, units = {}, {}, {}
    for name, fp in fps.items():
        artifacts[name] = [(key, kind, run_relative(path, work_dir), rows)
                           for key, kind, path, rows in catalog.rows(
            "SELECT unit_key, kind, path, rows FROM artifacts WHERE stage = ? AND "
            "fingerprint = ? ORDER BY unit_key, path", [name, fp])]
        failed[name] = {}
        for kind, item in catalog.rows(
                "SELECT item_kind, item_id FROM item_failures WHERE stage = ? AND "
                "fingerprint = ? AND item_id IS NOT NULL ORDER BY ALL", [name, fp]):
            failed[name].setdefault(kind, []).append(item)
        units[name] = [(u.key, u.params) for u in catalog.units(name, fp)]
    return Inputs(fps, artifacts, failed, units)


class _Collector:
    """Receives a round of job outcomes: ingests records in batches (at most every
    INGEST_EVERY_S; the rest when the round ends), keeps the lost jobs for a retry, raises on
    the first failed unit."""

    def __init__(self, ingest, report: StageReport, advance) -> None:  # noqa: ANN001
        self.ingest = ingest
        self.report, self.advance = report, advance
        self.received: list[UnitRecord] = []
        self.lost: list[Outcome] = []
        self.last = time.monotonic()

    def finished(self, outcome: Outcome) -> None:
        if outcome.record is None:
            self.lost.append(outcome)
            return
        record = outcome.record
        self.received.append(record)
        if record.status == "failed":  # an application error stops the run: no retry
            self.flush()
            raise PipelineError(f"stage {record.stage}: unit {record.unit_key} failed on "
                                f"{record.host} (pid {record.pid}): {record.error}")
        self.report.ran += 1
        self.advance(1)
        if time.monotonic() - self.last >= INGEST_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.received:
            self.ingest(self.received)
            self.received = []
        self.last = time.monotonic()


class Runner:
    def __init__(self, config: Config, stages: StageFactory, board: ProgressBoard,
                 executor: Executor | None = None) -> None:
        self.config = config
        self.factory = factory_name(stages)  # the jobs carry it: workers build the same
        self.stages = list(stages())
        self.board = board
        self.catalog = Catalog.in_dir(config.work_dir, config.run.catalog_timeout_s)
        self.fingerprints = fingerprints(self.stages, config)
        self.executor = executor

    def context(self, stage: Stage, inputs: Inputs) -> StageContext:
        return StageContext(
            config=self.config,
            inputs=inputs,
            stage=stage.name,
            fingerprint=self.fingerprints[stage.name],
            progress=self.board.task,
            log=logging.getLogger(f"stages.{stage.name}"),
        )

    def run(self, targets: Sequence[str], with_upstream: bool = True,
            plan_only: bool = False) -> list[StageReport]:
        """Run target stages (and, with_upstream, what they need). plan_only: plan the
        targets and write their plan files for workers, run nothing (upstream must be done)."""
        if with_upstream and not plan_only:
            order = stage_closure(self.stages, targets)
        else:
            order = [s for s in self.stages if s.name in targets]
            if unknown := sorted(set(targets) - {s.name for s in order}):
                raise PipelineError(f"unknown stage(s) {unknown}; stages: "
                                    f"{[s.name for s in self.stages]}")
        # One catalog connection for all the bookkeeping; closed while units run (_run_stage).
        with self.catalog.held():
            return self._run(order, plan_only)

    def _run(self, order: list[Stage], plan_only: bool) -> list[StageReport]:
        # Checks (weights exist, the device is there) fail fast before any work; stages done
        # under their fingerprint have none to do, so a run with nothing to do loads no model
        # code (torch, open_clip, faiss) and returns at once.
        units = self._units(order)
        todo = order if plan_only else order[self._first_not_done(order, units):]
        if todo and self.config.run.executor in ("inline", "local"):  # else the workers'
            from pipeline.device import resolve_device

            resolve_device(self.config.run.device)
        for stage in todo:
            stage.check(self.config)
        self.catalog.init()
        if plan_only:
            reports = []
            for stage in order:
                self._require_upstream_done(stage)
                planned = self.plan(stage)
                reports.append(StageReport(stage.name, self.fingerprints[stage.name],
                                           units=len(planned)))
            return reports
        if not todo and (reports := self._all_done(order, units)) is not None:
            return reports  # nothing to run: no executor, no progress display
        if self.executor is None:
            with self.catalog.released():  # starting Ray or a pool takes a while
                self.executor = make_executor(self.config, self.board.task)
        reports = []
        try:
            with self.board.task("stages", len(order)) as advance:
                for stage in order:
                    reports.append(self._run_stage(stage))
                    advance(1)
        finally:
            self.executor.close()
        return reports

    def _units(self, order: Sequence[Stage]) -> dict[str, list[UnitRow]]:
        """Each stage's units under its fingerprint (one query; none before the catalog)."""
        if not self.catalog.path.exists():
            return {}
        return self.catalog.units_of([(s.name, self.fingerprints[s.name]) for s in order])

    def _first_not_done(self, order: Sequence[Stage], units: dict[str, list[UnitRow]]) -> int:
        """Index in `order` of the first stage not done under its fingerprint by what the
        catalog holds (records not yet ingested count as not done); len(order) if all are."""
        for i, stage in enumerate(order):
            if not units.get(stage.name) or any(u.status != "done" for u in units[stage.name]):
                return i
        return len(order)

    def _all_done(self, order: Sequence[Stage],
                  units: dict[str, list[UnitRow]]) -> list[StageReport] | None:
        """The reports of a run whose every unit is done, from two queries for all stages
        (`_run_stage` makes about seven per stage); None when a stage needs more than a look
        (its plan is not the current one or its plan file is missing): run them all then."""
        current, with_failures = self.catalog.plan_marks()
        if any(current.get(s.name) != self.fingerprints[s.name]
               or not plan_path(self.config.work_dir, s.name, self.fingerprints[s.name]).exists()
               for s in order):
            return None
        reports = []
        for stage in order:
            fp = self.fingerprints[stage.name]
            if note := stage.notes(self.config):
                log.warning("%s: %s", stage.name, note)
            self._tidy(stage)
            # records of units not in the plan are reported (as _run_stage does); none is new
            status = {u.key: u.status for u in units[stage.name]}
            if ingest_records(self.catalog, stage.name, fp, self.config.work_dir,
                              status=status):
                return None  # cannot happen (every unit is done); be safe: the full path
            if (stage.name, fp) in with_failures:
                self._check_failures(stage.name, fp)
            n = len(units[stage.name])
            reports.append(StageReport(stage.name, fp, units=n, skipped=n))
        return reports

    def _tidy(self, stage: Stage) -> dict[str, Lease]:
        """Remove the temporary files crashed runs left in the stage plan's folder; returns
        its leases."""
        out_dir = self.config.work_dir / stage.name / self.fingerprints[stage.name]
        leases = read_leases(out_dir)
        if removed := remove_stale_tmp(out_dir, leases, self.config.run.lease_s):
            log.info("%s: removed %d temporary file(s) left by a crashed run", stage.name,
                     removed)
        return leases

    def _require_upstream_done(self, stage: Stage) -> None:
        for name in stage.needs:
            fp = self.fingerprints[name]
            ingest_records(self.catalog, name, fp, self.config.work_dir)
            units = self.catalog.units(name, fp)
            if not units or any(u.status != "done" for u in units):
                raise PipelineError(
                    f"stage {stage.name} needs {name}, which is not complete for the current "
                    f"config; run `fsr-pipe run {name}` first (see `fsr-pipe status`)"
                )
            self._check_failures(name, fp)  # as `run` would have stopped

    def _position(self, stage: Stage) -> int:
        return [s.name for s in self.stages].index(stage.name)

    def plan(self, stage: Stage) -> list[UnitRow]:
        """The stage's frozen plan for its fingerprint (planning it now if there is none),
        with its plan file for workers written."""
        fp = self.fingerprints[stage.name]
        path = plan_path(self.config.work_dir, stage.name, fp)
        units = self.catalog.units(stage.name, fp)
        if units and path.exists():
            if self.catalog.current_fingerprint(stage.name) != fp:
                meta = plan_meta(stage, self.config, {n: self.fingerprints[n]
                                                      for n in stage.needs}, self._position(stage))
                self.catalog.save_plan(stage.name, fp, meta, [])
            return units
        inputs = upstream_inputs(self.catalog, stage, self.fingerprints, self.config.work_dir)
        ctx = self.context(stage, inputs)
        meta = plan_meta(stage, self.config, inputs.fingerprints, self._position(stage))
        if units:  # planned by an fsr-pipe without plan files: keep the catalog's plan
            planned = [(u.key, u.params) for u in units]
        else:
            planned = [(u.key, u.params) for u in stage.plan(ctx)]
            keys = [key for key, _ in planned]
            assert len(set(keys)) == len(keys), f"{stage.name}: duplicate unit keys"
        self.catalog.save_plan(stage.name, fp, meta, planned)
        units = self.catalog.units(stage.name, fp)  # the first plan stands
        write_plan(StagePlan(stage.name, fp, [(u.key, u.params) for u in units], inputs),
                   self.config.work_dir)
        log.info("%s: planned %d unit(s), fingerprint %s", stage.name, len(units), fp)
        return units

    def _run_stage(self, stage: Stage) -> StageReport:
        fp = self.fingerprints[stage.name]
        work_dir, lease_s = self.config.work_dir, self.config.run.lease_s
        if note := stage.notes(self.config):
            log.warning("%s: %s", stage.name, note)
        # The bookkeeping uses run()'s held connection; it is released while units run.
        switched = self.catalog.current_fingerprint(stage.name) != fp
        units = self.plan(stage)
        leases = self._tidy(stage)
        ingested = ingest_records(self.catalog, stage.name, fp, work_dir)
        status = {u.key: u for u in self.catalog.units(stage.name, fp)}
        report = StageReport(stage.name, fp, units=len(units))
        todo = [u for u in units if status[u.key].status != "done"]
        busy = {u.key: leases[u.key] for u in todo
                if u.key in leases and leases[u.key].state(lease_s) == "alive"}
        report.busy = [f"{key} ({lease.host}:{lease.pid})" for key, lease in busy.items()]
        todo = [u for u in todo if u.key not in busy]  # another worker runs them
        report.skipped = len(units) - len(todo) - len(busy)
        try:
            # other processes may open the catalog while units run (status, another driver)
            with self.catalog.released(), self.board.task(stage.name, len(todo)) as advance:
                self._dispatch(stage, todo, {u.key: status[u.key].attempts for u in todo},
                               report, advance)
        except BaseException:
            # Whatever finished (and the failed or interrupted unit's own record) goes into
            # the catalog, and the stored views show it to a plain duckdb client.
            ingest_records(self.catalog, stage.name, fp, work_dir)
            self._refresh_views(stage, quiet=True)
            raise
        if switched or ingested or report.ran:  # else its views show these files already
            self._refresh_views(stage)
        if report.busy:
            raise PipelineError(
                f"stage {stage.name}: {len(report.busy)} unit(s) are being run by other "
                f"processes: {', '.join(report.busy[:3])}; run again when they finish"
            )
        if self._complete(stage):
            self._check_failures(stage.name, fp)
        return report

    def _dispatch(self, stage: Stage, todo: list[UnitRow], attempts: dict[str, int],
                  report: StageReport, advance) -> None:  # noqa: ANN001
        """Run `todo` on the executor, ingesting records as they come; retry lost units."""
        fp = self.fingerprints[stage.name]
        work_dir = self.config.work_dir
        plan_file = plan_path(work_dir, stage.name, fp)
        params = {u.key: u.params for u in todo}
        queue = [u.key for u in todo]
        lost_count: dict[str, int] = {}
        while queue:
            jobs = [Job.of(self.config, plan_file, key, params[key], stage.name, fp,
                           self.factory, attempts[key] + 1) for key in queue]
            batch = _Collector(lambda records: ingest_records(
                self.catalog, stage.name, fp, work_dir, records), report, advance)
            try:
                self.executor.run(jobs, batch.finished)
            finally:
                batch.flush()
            queue = []
            for outcome in batch.lost:
                key = outcome.job.unit_key
                attempts[key] = outcome.job.attempt
                release(work_dir / stage.name / fp, key, outcome.job.attempt)
                lost_count[key] = lost_count.get(key, 0) + 1
                if lost_count[key] > self.config.run.max_retries:
                    raise PipelineError(
                        f"stage {stage.name}: unit {key} ended without a record "
                        f"{lost_count[key]} time(s), last: {outcome.reason}; see the worker "
                        "logs, or raise run.max_retries")
                log.warning("%s %s: worker ended without a record (%s); retry %d of %d",
                            stage.name, key, outcome.reason, lost_count[key],
                            self.config.run.max_retries)
                report.retried += 1
                queue.append(key)

    def _refresh_views(self, stage: Stage, quiet: bool = False) -> None:
        if not stage.views:
            return
        try:
            self.catalog.refresh_views(stage.views)
        except Exception as exc:
            if not quiet:
                raise
            log.warning("%s: views not refreshed (%s)", stage.name, exc)

    def _complete(self, stage: Stage) -> bool:
        units = self.catalog.units(stage.name, self.fingerprints[stage.name])
        return all(u.status == "done" for u in units)

    def _check_failures(self, stage: str, fingerprint: str) -> None:
        limit = self.config.data.max_failure_ratio
        if excess := too_many_failures(self.catalog, stage, fingerprint, limit):
            raise PipelineError(
                f"stage {stage}: {failure_summary(*excess, limit)}; see them with "
                f"fsr-pipe sql \"SELECT * FROM failures_by_reason WHERE stage = '{stage}'\". "
                f"Fix the inputs and redo the stage (fsr-pipe reset {stage} -y; fsr-pipe run "
                f"{stage}), or raise data.max_failure_ratio"
            )
