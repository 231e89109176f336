"""Unit records: the file a worker writes last, the source of truth for "this unit is done".

`<stage>/<fingerprint>/_records/<unit>.json` holds the unit's artifacts (paths relative to the
run directory, bytes, sha256), bad inputs, metrics, host, pid, attempt and times. Workers
write it atomically after every artifact; the driver alone copies records into the catalog
(`Catalog.ingest`). A record counts only if its fingerprint is the planned one and its files
exist with the recorded sizes (`check_record`). See docs/distributed.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, field
from pathlib import Path
from typing import Any

from pipeline.frozen import frozen

RECORDS = "_records"
GOOD_ITEMS = "good_items"  # the metric holding UnitResult.good (the bad-input limit's base)


# What stages hand back and the catalog stores (no DuckDB here: workers never load it).


@frozen
class UnitRow:
    stage: str
    key: str
    fingerprint: str
    status: str
    params: dict[str, Any]
    host: str | None = None
    pid: int | None = None
    attempts: int = 0


@frozen
class ArtifactRecord:
    kind: str
    path: str
    rows: int | None
    bytes: int
    sha256: str


@frozen
class FailureRecord:
    item_kind: str
    item_id: int | None
    path: str | None
    reason: str


@frozen
class MetricRecord:
    name: str
    value: float
    labels: dict[str, Any] = field(default_factory=dict)


@frozen
class ViewSpec:
    """A catalog view over the Parquet files of one artifact kind of a stage's current plan."""

    name: str
    stage: str
    kind: str
    # Column list used when no file exists yet, so the view always binds.
    empty_columns: str


@frozen
class PlanRow:
    """A stage's plan as the `stages` table stores it (without planned_at)."""

    stage: str
    fingerprint: str
    code_version: str
    config_json: str
    inputs_json: str
    notes: str | None = None
    position: int | None = None  # the stage's place in the pipeline (stage_summary's order)


@frozen
class UnitRecord:
    stage: str
    fingerprint: str
    unit_key: str
    status: str  # done | failed
    host: str
    pid: int
    attempt: int
    started_at: float  # unix time
    finished_at: float
    rows: int = 0
    error: str | None = None
    artifacts: list[ArtifactRecord] = field(default_factory=list)  # paths relative to work_dir
    failures: list[FailureRecord] = field(default_factory=list)
    metrics: list[MetricRecord] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.finished_at - self.started_at

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> UnitRecord:
        data: dict[str, Any] = json.loads(text)
        data["artifacts"] = [ArtifactRecord(**a) for a in data["artifacts"]]
        data["failures"] = [FailureRecord(**f) for f in data["failures"]]
        data["metrics"] = [MetricRecord(**m) for m in data["metrics"]]
        return cls(**data)


def record_path(out_dir: Path, unit_key: str) -> Path:
    return out_dir / RECORDS / f"{unit_key}.json"


def run_relative(path: str | Path, work_dir: Path) -> str:
    """A path under the run directory made relative to it (others stay absolute), as records
    and plan files store them; `work_dir / it` gives the absolute path back."""
    path, root = Path(path).resolve(), work_dir.resolve()
    return os.path.relpath(path, root) if path.is_relative_to(root) else str(path)


def relative_artifacts(artifacts: list[ArtifactRecord], work_dir: Path) -> list[ArtifactRecord]:
    """Artifact records with their paths relative to the run directory."""
    return [ArtifactRecord(a.kind, run_relative(a.path, work_dir), a.rows, a.bytes, a.sha256)
            for a in artifacts]


def write_record(record: UnitRecord, out_dir: Path) -> Path:
    """Atomically write a unit's record (the unit's last write)."""
    from pipeline.artifacts import write_bytes  # artifacts imports leases; keep this module light

    return write_bytes(record.to_json().encode(), record_path(out_dir, record.unit_key))


def read_record(out_dir: Path, unit_key: str) -> UnitRecord | None:
    """One unit's record, or None when it has none (yet)."""
    try:
        return UnitRecord.from_json(record_path(out_dir, unit_key).read_text())
    except FileNotFoundError:
        return None


def read_records(out_dir: Path, skip: set[str] | frozenset[str] = frozenset()) -> list[UnitRecord]:
    """The records under a stage plan's folder, except those of the units in `skip`."""
    folder = out_dir / RECORDS
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        name = entry.name
        if name.startswith(".") or not name.endswith(".json") or name[:-5] in skip:
            continue
        try:
            found.append(UnitRecord.from_json(Path(entry.path).read_text()))
        except FileNotFoundError:  # removed by a unit starting over
            continue
    return found


def check_record(record: UnitRecord, fingerprint: str, planned: set[str],
                 work_dir: Path) -> str | None:
    """Why a record does not count (None when it does): wrong plan, missing or changed files."""
    if record.fingerprint != fingerprint:
        return f"fingerprint {record.fingerprint}, not the planned {fingerprint}"
    if record.unit_key not in planned:
        return f"unit {record.unit_key} is not in the plan"
    if record.status != "done":
        return None
    for a in record.artifacts:
        path = work_dir / a.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"its file {path} is missing"
        if size != a.bytes:
            return f"its file {path} has {size} bytes, the record says {a.bytes}"
    return None


# The score stage's tables (pipeline.evaluation builds them, its views read them): columns as
# DuckDB types, here so that a view needs no numpy or pyarrow.
METRICS = ("metric VARCHAR, method VARCHAR, style VARCHAR, protocol VARCHAR, fusion VARCHAR, "
           "k INTEGER, value DOUBLE, n_queries BIGINT")
RESULTS = ("method VARCHAR, style VARCHAR, fusion VARCHAR, query_id BIGINT, partner_id BIGINT, "
           "rank INTEGER, image_id BIGINT, score FLOAT")
RANKS = ("method VARCHAR, style VARCHAR, protocol VARCHAR, fusion VARCHAR, query_id BIGINT, "
         "partner_id BIGINT, target_id BIGINT, class_label VARCHAR, rank INTEGER")
