"""Executors: where a stage's units run (docs/distributed.md). Chosen by `run.executor`."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.executors.base import Executor, HandedOff, Outcome
from pipeline.worker import Progress, no_progress

__all__ = ["Executor", "HandedOff", "Outcome", "make_executor"]

NAMES = ("inline", "local", "slurm", "ray")


def make_executor(config: Config, progress: Progress = no_progress) -> Executor:
    """The executor `run.executor` names; its optional dependencies are checked here."""
    name = config.run.executor
    if name == "inline":
        from pipeline.executors.inline import InlineExecutor

        return InlineExecutor(progress)
    if name == "local":
        from pipeline.executors.local import LocalExecutor

        return LocalExecutor(config.run.workers, config.run.device)
    if name == "slurm":
        from pipeline.executors.slurm import SlurmExecutor

        return SlurmExecutor(config)
    if name == "ray":
        from pipeline.executors.ray import RayExecutor

        return RayExecutor(config)
    raise ValueError(f"unknown executor {name!r}; one of {NAMES}")  # config validation stops it
