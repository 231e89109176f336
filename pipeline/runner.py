"""The runner: plan each stage once, run the units not done, skip the rest, resume after crashes.

A unit is done when the catalog says so for its fingerprint; that mark is the last thing a
unit writes. Anything else (a `running` mark of a dead process, a temporary file) is
leftover of a crash and is redone or removed. See docs/resume.md.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.artifacts import remove_stale_tmp
from pipeline.catalog import Catalog, MetricRecord, PlanRow, UnitRow
from pipeline.config import Config
from pipeline.device import resolve_device
from pipeline.progress import ProgressBoard
from pipeline.stage import PipelineError, Stage, StageContext, shard_key

GOOD_ITEMS = "good_items"  # the metric holding UnitResult.good

log = logging.getLogger(__name__)


@dataclass
class StageReport:
    stage: str
    fingerprint: str
    units: int = 0
    ran: int = 0
    skipped: int = 0
    busy: list[str] = field(default_factory=list)


def stage_closure(stages: Sequence[Stage], targets: Sequence[str]) -> list[Stage]:
    """The target stages and everything they need, in pipeline order."""
    by_name = {s.name: s for s in stages}
    unknown = [t for t in targets if t not in by_name]
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown}; use 'all' or one of {list(by_name)}")
    wanted: set[str] = set()
    todo = list(targets)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(by_name[name].needs)
    return [s for s in stages if s.name in wanted]


def downstream(stages: Sequence[Stage], name: str) -> list[Stage]:
    """`name` and every stage that depends on it, directly or not, in pipeline order."""
    hit = {name}
    for stage in stages:
        if hit.intersection(stage.needs):
            hit.add(stage.name)
    return [s for s in stages if s.name in hit]


def fingerprints(stages: Sequence[Stage], config: Config) -> dict[str, str]:
    """Every stage's fingerprint under `config` (stages in pipeline order)."""
    result: dict[str, str] = {}
    for stage in stages:
        inputs = {n: result[n] for n in stage.needs}
        result[stage.name] = stage.fingerprint(config, inputs)
    return result


def plan_meta(stage: Stage, config: Config, inputs: dict[str, str]) -> dict:
    """What the catalog's `stages` table records of a plan besides its fingerprint."""
    return {"code_version": stage.version, "config": stage.config_values(config),
            "inputs": inputs, "notes": stage.notes(config)}


def plan_rows(stages: Sequence[Stage], config: Config) -> list[PlanRow]:
    """Every stage's plan under `config`, as `stages` table rows (for Catalog.query_plans)."""
    fps = fingerprints(stages, config)
    rows = []
    for stage in stages:
        meta = plan_meta(stage, config, {n: fps[n] for n in stage.needs})
        rows.append(PlanRow(stage.name, fps[stage.name], meta["code_version"],
                            json.dumps(meta["config"]), json.dumps(meta["inputs"]),
                            meta["notes"]))
    return rows


def too_many_failures(catalog: Catalog, stage: str, fingerprint: str,
                      limit: float) -> tuple[str, int, int] | None:
    """(item kind, bad, good) of the kind of item with the largest share of bad inputs in a
    plan, when that share is over `limit` (data.max_failure_ratio: the run stops there)."""
    counts = catalog.failure_counts(stage, fingerprint, GOOD_ITEMS)
    over = [(bad / (bad + good), kind, bad, good) for kind, bad, good in counts
            if bad > limit * (bad + good)]
    return max(over)[1:] if over else None


def failure_summary(kind: str, bad: int, good: int, limit: float) -> str:
    """'5 of 406 gallery items are bad inputs (1.23%, over data.max_failure_ratio = 0.01)'."""
    return (f"{bad} of {bad + good} {kind} items are bad inputs ({bad / (bad + good):.2%}, "
            f"over data.max_failure_ratio = {limit})")


class Runner:
    def __init__(self, config: Config, stages: Sequence[Stage], board: ProgressBoard) -> None:
        self.config = config
        self.stages = list(stages)
        self.board = board
        self.catalog = Catalog.in_dir(config.work_dir, config.run.catalog_timeout_s)
        self.fingerprints = fingerprints(self.stages, config)

    def context(self, stage: Stage) -> StageContext:
        return StageContext(
            config=self.config,
            catalog=self.catalog,
            stage=stage.name,
            fingerprint=self.fingerprints[stage.name],
            inputs={n: self.fingerprints[n] for n in stage.needs},
            progress=self.board.task,
            log=logging.getLogger(f"stages.{stage.name}"),
        )

    def run(self, targets: Sequence[str], shard: int | None = None,
            with_upstream: bool = True) -> list[StageReport]:
        """Run target stages (and, with_upstream, what they need); `shard` picks one unit."""
        if with_upstream:
            order = stage_closure(self.stages, targets)
        else:
            order = [s for s in self.stages if s.name in targets]
            if unknown := sorted(set(targets) - {s.name for s in order}):
                raise PipelineError(f"unknown stage(s) {unknown}; stages: "
                                    f"{[s.name for s in self.stages]}")
        resolve_device(self.config.run.device)
        for stage in order:
            stage.check(self.config)
        self.catalog.init()
        if not with_upstream:
            for stage in order:
                self._require_upstream_done(stage)
        reports = []
        with self.board.task("stages", len(order)) as advance:
            for stage in order:
                reports.append(self._run_stage(stage, shard))
                advance(1)
        return reports

    def _require_upstream_done(self, stage: Stage) -> None:
        for name in stage.needs:
            units = self.catalog.units(name, self.fingerprints[name])
            if not units or any(u.status != "done" for u in units):
                raise PipelineError(
                    f"stage {stage.name} needs {name}, which is not complete for the current "
                    f"config; run `fsr-pipe run {name}` first (see `fsr-pipe status`)"
                )
            self._check_failures(name, self.fingerprints[name])  # as `run` would have stopped

    def plan(self, stage: Stage) -> list[UnitRow]:
        """The stage's frozen plan for its fingerprint, planning it now if there is none."""
        ctx = self.context(stage)
        units = self.catalog.units(stage.name, ctx.fingerprint)
        meta = plan_meta(stage, self.config, ctx.inputs)
        if units:
            if self.catalog.current_fingerprint(stage.name) != ctx.fingerprint:
                self.catalog.save_plan(stage.name, ctx.fingerprint, meta, [])
            return units
        planned = stage.plan(ctx)
        keys = [u.key for u in planned]
        assert len(set(keys)) == len(keys), f"{stage.name}: duplicate unit keys"
        self.catalog.save_plan(
            stage.name, ctx.fingerprint, meta, [(u.key, u.params) for u in planned]
        )
        log.info("%s: planned %d unit(s), fingerprint %s", stage.name, len(planned),
                 ctx.fingerprint)
        return self.catalog.units(stage.name, ctx.fingerprint)

    def _run_stage(self, stage: Stage, shard: int | None) -> StageReport:
        ctx = self.context(stage)
        if note := stage.notes(self.config):
            log.warning("%s: %s", stage.name, note)
        units = self.plan(stage)
        report = StageReport(stage.name, ctx.fingerprint, units=len(units))
        if shard is not None:
            wanted = shard_key(shard)
            units = [u for u in units if u.key == wanted]
            if not units:
                keys = [u.key for u in self.catalog.units(stage.name, ctx.fingerprint)]
                if not any(k.startswith("shard-") for k in keys):
                    raise PipelineError(
                        f"stage {stage.name} is not sharded (its unit: {', '.join(keys)}); "
                        f"run it without --shard"
                    )
                raise PipelineError(
                    f"stage {stage.name} has no unit {wanted}; its units: "
                    f"{keys[:3]}{' ...' if len(keys) > 3 else ''} ({len(keys)} in all)"
                )
        removed = remove_stale_tmp(ctx.out_dir)
        if removed:
            log.info("%s: removed %d temporary file(s) left by a crashed run", stage.name, removed)
        todo = [u for u in units if u.status != "done"]
        report.skipped = len(units) - len(todo)
        try:
            with self.board.task(stage.name, len(todo)) as advance:
                for unit in todo:
                    outcome = self._run_unit(stage, ctx, unit)
                    if outcome.startswith("busy"):
                        report.busy.append(f"{unit.key} ({outcome})")
                    elif outcome == "done":
                        report.skipped += 1
                    else:
                        report.ran += 1
                    advance(1)
        except Exception:
            # A failed unit: the stored views still show the units that finished before it
            # (to a plain duckdb client). Not on Ctrl-C/SIGTERM, which should exit at once.
            self._refresh_views(stage, quiet=True)
            raise
        self._refresh_views(stage)
        if report.busy:
            raise PipelineError(
                f"stage {stage.name}: {len(report.busy)} unit(s) are being run by other "
                f"processes: {', '.join(report.busy[:3])}; run again when they finish"
            )
        if shard is None or self._complete(stage):
            self._check_failures(stage.name, ctx.fingerprint)
        return report

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

    def _run_unit(self, stage: Stage, ctx: StageContext, unit: UnitRow) -> str:
        claim = self.catalog.claim(stage.name, unit.key, ctx.fingerprint)
        if claim != "claimed":
            return claim
        started = time.monotonic()
        try:
            result = stage.run(ctx, unit)
            seconds = time.monotonic() - started
            good = [MetricRecord(GOOD_ITEMS, float(n), {"item_kind": kind})
                    for kind, n in sorted(result.good.items())]
            self.catalog.finish(
                stage.name, unit.key, ctx.fingerprint, result.rows, seconds,
                result.artifacts, result.failures, [*result.metrics, *good],
            )
        except BaseException as exc:  # Ctrl-C and SIGTERM too: never leave a `running` mark
            seconds = time.monotonic() - started
            reason = str(exc) or type(exc).__name__  # KeyboardInterrupt has no message
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self.catalog.fail(stage.name, unit.key, ctx.fingerprint, error, seconds)
            log.error("%s %s failed after %.1fs: %s", stage.name, unit.key, seconds, reason)
            raise
        log.info("%s %s: %d rows (%d bad inputs) in %.1fs -> %s", stage.name, unit.key, result.rows,
                 len(result.failures), seconds, ctx.out_dir / unit.key)
        return "ran"

    def _check_failures(self, stage: str, fingerprint: str) -> None:
        limit = self.config.data.max_failure_ratio
        if excess := too_many_failures(self.catalog, stage, fingerprint, limit):
            raise PipelineError(
                f"stage {stage}: {failure_summary(*excess, limit)}; see them with "
                f"fsr-pipe sql \"SELECT * FROM failures_by_reason WHERE stage = '{stage}'\". "
                f"Fix the inputs and redo the stage (fsr-pipe reset {stage} -y; fsr-pipe run "
                f"{stage}), or raise data.max_failure_ratio"
            )
