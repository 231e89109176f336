"""What a worker needs to run a unit without the catalog: a stage's frozen plan file and a job.

The driver writes `<stage>/<fingerprint>/_plan.json` once per plan: the units with their
parameters and everything the stage reads of the stages it needs (their fingerprints, their
artifacts with paths relative to the run directory, the bad inputs they recorded, their unit
keys). A `Job` names one unit of such a plan and carries the config; it pickles and goes to a
JSON file, so a process pool, a Ray actor or a Slurm array task can run it. See
docs/distributed.md.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.config import Config, config_from_dict, to_dict
from pipeline.frozen import frozen

PLAN_FILE = "_plan.json"


class PlanMissing(FileNotFoundError):
    """No frozen plan file for a stage under this config (the driver has not planned it)."""


@frozen
class Inputs:
    """What a stage's plan reads of the stages it needs (resolved by the driver)."""

    fingerprints: dict[str, str]  # upstream stage -> fingerprint
    # upstream stage -> [(unit_key, kind, path relative to the run directory, rows)]
    artifacts: dict[str, list[tuple[str, str, str, int | None]]]
    failed: dict[str, dict[str, list[int]]]  # upstream stage -> item kind -> item ids
    units: dict[str, list[tuple[str, dict[str, Any]]]]  # upstream stage -> (key, params)

    def paths(self, work_dir: Path, stage: str, kind: str,
              unit_key: str | None = None) -> list[str]:
        """Absolute paths of `stage`'s files of one kind (optionally of one unit), in order."""
        return [str(work_dir / path) for key, k, path, _ in self.artifacts.get(stage, [])
                if k == kind and (unit_key is None or key == unit_key)]

    def rows(self, work_dir: Path, stage: str, kind: str) -> list[tuple[str, str, int]]:
        """(unit_key, absolute path, rows) of `stage`'s files of one kind, in unit order."""
        return [(key, str(work_dir / path), rows or 0)
                for key, k, path, rows in self.artifacts.get(stage, []) if k == kind]

    def failed_items(self, stage: str, item_kind: str) -> set[int]:
        return set(self.failed.get(stage, {}).get(item_kind, []))


@frozen
class StagePlan:
    stage: str
    fingerprint: str
    units: list[tuple[str, dict[str, Any]]]
    inputs: Inputs

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> StagePlan:
        data = json.loads(text)
        inputs = data["inputs"]
        return cls(data["stage"], data["fingerprint"], [tuple(u) for u in data["units"]],
                   Inputs(inputs["fingerprints"],
                          {s: [tuple(a) for a in rows] for s, rows in inputs["artifacts"].items()},
                          inputs["failed"],
                          {s: [tuple(u) for u in rows] for s, rows in inputs["units"].items()}))


def plan_path(work_dir: Path, stage: str, fingerprint: str) -> Path:
    return work_dir / stage / fingerprint / PLAN_FILE


def write_plan(plan: StagePlan, work_dir: Path) -> Path:
    """Write the plan file unless it exists (a plan is frozen: the first one stands)."""
    from pipeline.artifacts import write_bytes

    path = plan_path(work_dir, plan.stage, plan.fingerprint)
    if not path.exists():
        write_bytes(plan.to_json().encode(), path)
    return path


def read_plan(path: str) -> StagePlan:
    """A plan file (cached: a worker process reads each plan once, unless it is rewritten:
    `fsr-pipe reset` then a new run)."""
    try:
        stamp = Path(path).stat().st_mtime_ns
    except FileNotFoundError:
        raise PlanMissing(path) from None
    return _read_plan(path, stamp)


@functools.lru_cache(maxsize=16)
def _read_plan(path: str, stamp: int) -> StagePlan:
    return StagePlan.from_json(Path(path).read_text())


@frozen
class Job:
    """One unit to run: picklable and JSON-able, self-contained given the run directory."""

    stage: str
    fingerprint: str
    unit_key: str
    params: dict[str, Any]
    plan_file: str  # absolute path of the stage's _plan.json
    config: dict[str, Any]  # pipeline.config.to_dict of the driver's config
    base_dir: str
    factory: str  # pipeline.stage.factory_name of the driver's stages: workers build the same
    attempt: int = 1

    @classmethod
    def of(cls, config: Config, plan_file: Path, unit_key: str, params: dict[str, Any],
           stage: str, fingerprint: str, factory: str, attempt: int = 1) -> Job:
        return cls(stage, fingerprint, unit_key, params, str(plan_file), to_dict(config),
                   config.base_dir, factory, attempt)

    def load_config(self) -> Config:
        return _config(json.dumps(self.config, sort_keys=True), self.base_dir)

    @property
    def out_dir(self) -> Path:
        """The stage plan's folder: the unit's artifacts, record and lease go under it."""
        return self.load_config().work_dir / self.stage / self.fingerprint

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Job:
        return cls(**json.loads(text))


@functools.lru_cache(maxsize=8)
def _config(text: str, base_dir: str) -> Config:
    return config_from_dict(json.loads(text), base_dir)
