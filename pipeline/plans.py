"""What the driver knows of plans without running anything: the stages a target needs,
fingerprints, the `stages` table's rows, records to ingest and the bad-input limit.

Light to import (no executors, jobs or workers): `fsr-pipe status`, `sql` and `reset` use
these and nothing of the runner (docs/benchmarks.md, CLI start-up).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from pipeline.catalog import Catalog
from pipeline.config import Config
from pipeline.records import GOOD_ITEMS, PlanRow, UnitRecord, check_record, read_records
from pipeline.stage import PipelineError, Stage

log = logging.getLogger(__name__)


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


def plan_meta(stage: Stage, config: Config, inputs: dict[str, str],
              position: int | None = None) -> dict:
    """What the catalog's `stages` table records of a plan besides its fingerprint;
    `position`: the stage's place in the pipeline."""
    return {"code_version": stage.version, "config": stage.config_values(config),
            "inputs": inputs, "notes": stage.notes(config), "position": position}


def plan_rows(stages: Sequence[Stage], config: Config,
              fps: dict[str, str] | None = None) -> list[PlanRow]:
    """Every stage's plan under `config`, as `stages` table rows (for Catalog.query_plans).
    `fps`: their fingerprints, when the caller has them (a folder source walks its dataset
    for each computation)."""
    fps = fps or fingerprints(stages, config)
    rows = []
    for position, stage in enumerate(stages):
        meta = plan_meta(stage, config, {n: fps[n] for n in stage.needs}, position)
        rows.append(PlanRow(stage.name, fps[stage.name], meta["code_version"],
                            json.dumps(meta["config"]), json.dumps(meta["inputs"]),
                            meta["notes"], position))
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


def ingest_records(catalog: Catalog, stage: str, fingerprint: str, work_dir: Path,
                   records: list[UnitRecord] | None = None,
                   status: dict[str, str] | None = None) -> int:
    """Copy the stage plan's records that are not in the catalog yet (or `records`, just
    received) into it; records that do not count are logged and left out. Returns units.
    `status`: the plan's unit key -> status, when the caller has just read it."""
    if status is None:
        status = catalog.unit_status(stage, fingerprint)
    out_dir = work_dir / stage / fingerprint
    if records is None:
        records = read_records(out_dir, skip={k for k, s in status.items() if s == "done"})
    good, planned = [], set(status)
    for record in records:
        why = check_record(record, fingerprint, planned, work_dir)
        if why:
            log.warning("%s %s: record ignored (%s); the unit is redone", stage,
                        record.unit_key, why)
        elif status.get(record.unit_key) != "done":
            good.append(record)
    if good:
        catalog.ingest(good, work_dir)
    return len(good)

