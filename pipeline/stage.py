"""What a stage is: a name, its inputs, how it plans units, and `run(unit) -> UnitResult`.

Stages are glue (they read inputs, call library code and write artifacts); the runner owns
fingerprints, the catalog and resuming. A stage writes every file atomically and returns
records; the worker writes the unit's record after that, and the driver ingests it into the
catalog. Stages never see the catalog: what they read of upstream stages comes resolved in
`StageContext.inputs` (the plan file, pipeline/jobs.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.config import Config, fingerprint_fields
from pipeline.frozen import frozen
from pipeline.records import ArtifactRecord, FailureRecord, MetricRecord, UnitRow, ViewSpec

if TYPE_CHECKING:
    from pipeline.jobs import Inputs  # the driver's plan file; workers load it


class PipelineError(RuntimeError):
    """A run cannot go on; the message says why and what to do."""


@frozen
class PlannedUnit:
    key: str
    params: dict[str, Any]


@dataclass
class UnitResult:
    rows: int
    artifacts: list[ArtifactRecord] = field(default_factory=list)
    failures: list[FailureRecord] = field(default_factory=list)
    metrics: list[MetricRecord] = field(default_factory=list)
    # Good items per item kind ("gallery", "query"), the denominators of the failure ratio
    # next to `failures`; recorded as `good_items` metrics. A stage that records failures
    # and leaves this empty is judged against `rows`.
    good: dict[str, int] = field(default_factory=dict)


def shard_key(shard: int) -> str:
    """Unit key of a shard: zero-padded so keys sort in shard order."""
    return f"shard-{shard:05d}"


@dataclass
class StageContext:
    """What a stage sees while planning and running."""

    config: Config
    inputs: Inputs  # what the stage reads of the stages it needs, resolved by the driver
    stage: str
    fingerprint: str
    progress: Callable[[str, int | None], AbstractContextManager[Callable[[int], None]]]
    log: logging.Logger

    @property
    def out_dir(self) -> Path:
        """Where this stage's artifacts go: a new folder for every fingerprint."""
        return self.config.work_dir / self.stage / self.fingerprint

    def input_paths(self, stage: str, kind: str, unit_key: str | None = None) -> list[str]:
        """Done artifact files of kind `kind` written by upstream `stage` (or one unit of it)."""
        return self.inputs.paths(self.config.work_dir, stage, kind, unit_key)

    def input_rows(self, stage: str, kind: str) -> list[tuple[str, str, int]]:
        """(unit_key, path, rows) of upstream `stage`'s files of one kind, in unit order."""
        return self.inputs.rows(self.config.work_dir, stage, kind)

    def input_units(self, stage: str) -> list[PlannedUnit]:
        """The units of upstream `stage`'s plan (e.g. to shard alike)."""
        return [PlannedUnit(key, params) for key, params in self.inputs.units[stage]]

    def input_failures(self, stage: str, item_kind: str) -> set[int]:
        """Ids of the `item_kind` items upstream `stage` recorded as bad inputs: recorded once
        there, a later stage skips them rather than decode and record them again."""
        return self.inputs.failed_items(stage, item_kind)

    def input_path(self, stage: str, kind: str, unit_key: str | None = None) -> str:
        paths = self.input_paths(stage, kind, unit_key)
        if len(paths) != 1:
            raise PipelineError(
                f"stage {self.stage}: expected one {kind!r} artifact from {stage}, found "
                f"{len(paths)}; run `fsr-pipe run {stage}` first"
            )
        return paths[0]


class Stage:
    """Base class; subclasses set the class attributes and implement plan/run."""

    name: ClassVar[str]
    section: ClassVar[str]  # the config section that defines its results
    needs: ClassVar[tuple[str, ...]] = ()
    # Bump when a change to the code changes what the stage writes: it re-runs stale units.
    version: ClassVar[str] = "1"
    views: ClassVar[tuple[ViewSpec, ...]] = ()

    def plan(self, ctx: StageContext) -> list[PlannedUnit]:
        raise NotImplementedError

    def run(self, ctx: StageContext, unit: UnitRow) -> UnitResult:
        raise NotImplementedError

    def check(self, config: Config) -> None:
        """Raise (ConfigError, FileNotFoundError, ...) for settings that would only fail
        later; the runner calls it for every stage it will run, before any of them works."""

    def notes(self, config: Config) -> str | None:
        """A line for `status` and the log (e.g. that weights are random)."""
        return None

    def config_values(self, config: Config) -> dict[str, Any]:
        return fingerprint_fields(config.section(self.section), config.resolve)

    def fingerprint(self, config: Config, inputs: dict[str, str]) -> str:
        """Hash of the stage's code version, config section, seed and upstream fingerprints."""
        payload = {
            "stage": self.name,
            "version": self.version,
            "config": self.config_values(config),
            "seed": config.run.seed,
            "inputs": dict(sorted(inputs.items())),
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


StageFactory = Callable[[], "tuple[Stage, ...]"]  # fresh instances of every stage, in order


def factory_name(factory: StageFactory) -> str:
    """`module:function` of a stage factory: what a job carries so that a pool process, a
    Ray actor or a Slurm task builds the same stages as the driver."""
    name = f"{factory.__module__}:{factory.__qualname__}"
    if "<" in name:  # a lambda or a local function cannot be imported by a worker
        raise PipelineError(f"stage factory {name} must be a module-level function")
    return name


def load_factory(name: str) -> StageFactory:
    """The stage factory `module:function` names (factory_name's inverse)."""
    import importlib

    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise PipelineError(f"cannot load the stage factory {name!r} ({exc}); run the same "
                            "fsr-pipe version on every node") from None
