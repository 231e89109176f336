"""`ray`: units run in Ray actors, on a local Ray cluster or the one at `run.ray_address`.

Each actor (`UnitWorker`) is a worker process that runs one unit at a time through
`pipeline.worker.run_job`, so its stage instances, and the models they load, live as long as
the actor. Actors hold their resources for their whole life: `run.workers` of them (0 = one
per GPU when CUDA is configured and the cluster has GPUs, else one per 2 cluster CPUs), each
with an equal share of the CPUs (its torch threads) and, for the stages that use CUDA
(`executors.base.gpu_stages`: index too with `index.use_gpu`), one GPU. Stages of the same
resource shape share the actors; a stage of another shape replaces them.

Only the job and the unit's record (JSON strings) go through Ray; artifacts are written to
`run.work_dir`, which every node must see at the same path (a shared file system), and every
node runs the same fsr-pipe version and config. Retries are the driver's (`run.max_retries`):
Ray retries nothing. An actor that dies (killed, out of memory, node lost) is replaced, and
its unit comes back without a record unless it wrote one. Ray Data is not used: it was seen
to hang silently with 2 actors on 2 CPUs. See docs/distributed.md.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config
from pipeline.executors.base import (
    Executor,
    Finished,
    Outcome,
    gpu_stages,
    read_own_record,
    run_job_json,
)
from pipeline.jobs import Job
from pipeline.stage import PipelineError

INSTALL_HINT = "run.executor = ray needs Ray: pip install -e '.[cpu,ray]'"
POLL_S = 1.0  # ray.wait timeout: Ctrl-C is seen at least this often
REASON_CHARS = 400  # of a lost actor's error, in the retry log line

log = logging.getLogger(__name__)


def import_ray() -> Any:
    """The `ray` module, or a PipelineError saying which extra installs it."""
    try:
        import ray
    except ImportError:
        raise PipelineError(INSTALL_HINT) from None
    return ray


@dataclass(frozen=True)
class Shape:
    """What one actor holds: CPUs (its torch threads) and GPUs."""

    cpus: int
    gpus: int


def actor_count(setting: int, use_gpus: bool, resources: dict[str, float]) -> int:
    """run.workers, or 0 = one per cluster GPU (CUDA configured) else one per 2 CPUs."""
    if setting > 0:
        return setting
    gpus = int(resources.get("GPU", 0)) if use_gpus else 0
    return gpus or max(1, int(resources.get("CPU", 0)) // 2)


def placeable(nodes: Sequence[dict[str, float]], cpus: int, gpus: int) -> int:
    """How many actors of `cpus` CPUs and `gpus` GPUs the nodes hold at once."""
    total = 0
    for node in nodes:
        fit = int(node.get("CPU", 0)) // cpus
        if gpus:
            fit = min(fit, int(node.get("GPU", 0)) // gpus)
        total += fit
    return total


def fit_shape(nodes: Sequence[dict[str, float]], actors: int, gpus: int) -> tuple[int, Shape]:
    """(actors, shape): at most `actors`, all placed at once (an actor that waits for a
    place would hold its unit forever), each with as many CPUs as that allows."""
    most = placeable(nodes, 1, gpus)
    if most == 0:
        what = f"{gpus} GPU and 1 CPU" if gpus else "1 CPU"
        raise PipelineError(f"run.executor = ray: no node of the Ray cluster has {what} free "
                            "for a worker")
    if actors > most:
        log.warning("ray: run.workers = %d, but the cluster holds %d worker(s) of %d GPU(s); "
                    "using %d", actors, most, gpus, most)
        actors = most
    total_cpus = sum(int(n.get("CPU", 0)) for n in nodes)
    cpus = max(1, total_cpus // actors)
    while cpus > 1 and placeable(nodes, cpus, gpus) < actors:
        cpus -= 1
    return actors, Shape(cpus, gpus)


def short(exc: BaseException) -> str:
    """One line of an exception: Ray's are many lines of traceback."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= REASON_CHARS else text[:REASON_CHARS] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def unit_threads(shape: Shape, actors: int, jobs: int) -> int:
    """Torch threads for each of a stage's `jobs`: the actor's CPUs, or with fewer jobs than
    actors the idle actors' CPUs too, as the local executor does: a one-unit stage (train)
    then runs on every core, as inline, and computes the same bits (torch's own kernels are
    not thread-count proof). The actor caps it at its node's cores."""
    return max(1, shape.cpus * actors // max(1, min(actors, jobs)))


class UnitWorker:
    """The actor's class (made remote in `RayExecutor._actor_class`): a worker process that
    runs units one at a time; its stage instances and their models live as long as it does."""

    def __init__(self, threads: int, log_level: int) -> None:
        init_actor(threads, log_level)

    def run(self, job_json: str, threads: int) -> str:
        """Run the job on `threads` torch threads; its record's JSON goes back (failed ones
        too). An error before the unit wrote a record goes back as the error."""
        return run_job_json(job_json, threads)


def init_actor(threads: int, log_level: int) -> None:
    """In an actor: `pipeline` first (MKL_CBWR, before torch loads MKL), torch threads, logs
    (Ray shows them on the driver's stderr) at the driver's level."""
    import pipeline  # noqa: F401, I001 - loading this module did it already; must stay first
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, force=True,
                        format="%(asctime)s %(levelname)s %(message)s")
    for name in ("pipeline", "stages"):
        logging.getLogger(name).setLevel(log_level)


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, config: Config) -> None:
        self.ray = import_ray()
        self.config = config
        self.started = False  # this executor started Ray (close() shuts it down)
        self.actors: list[Any] = []  # the current shape's actor handles
        self.shape: Shape | None = None
        self.size = 0  # actors of the current shape at most
        self.in_flight: dict[Any, tuple[Any, Job]] = {}  # result ref -> (actor, job) running
        self._cls: Any = None

    # Ray and its actors

    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = self.config.run.ray_address or None
        if address:
            ray.init(address=address, configure_logging=False, log_to_driver=True)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                     _node_ip_address="127.0.0.1", configure_logging=False,
                     log_to_driver=True)
        self.started = True
        resources = self.ray.cluster_resources()
        log.info("ray: %s cluster of %d CPU(s), %d GPU(s)", address or "a local",
                 resources.get("CPU", 0), resources.get("GPU", 0))

    def _nodes(self) -> list[dict[str, float]]:
        return [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]

    def uses_gpus(self) -> bool:
        return (self.config.run.device != "cpu"
                and self.ray.cluster_resources().get("GPU", 0) >= 1)

    def _wanted(self, stage: str) -> tuple[int, Shape]:
        """(actors at most, shape) for a stage's units on the cluster as it is now."""
        cuda = self.uses_gpus()
        count = actor_count(self.config.run.workers, cuda, self.ray.cluster_resources())
        gpus = 1 if cuda and stage in gpu_stages(self.config) else 0
        return fit_shape(self._nodes(), count, gpus)

    def _actor_class(self) -> Any:
        if self._cls is None:
            self._cls = self.ray.remote(max_restarts=0, max_task_retries=0)(UnitWorker)
        return self._cls

    def _new_actor(self) -> Any:
        assert self.shape is not None
        level = logging.getLogger("pipeline").getEffectiveLevel()  # -q: warnings only
        actor = self._actor_class().options(num_cpus=self.shape.cpus, num_gpus=self.shape.gpus
                                            ).remote(self.shape.cpus, level)
        self.actors.append(actor)
        return actor

    def _use_shape(self, stage: str) -> None:
        size, shape = self._wanted(stage)
        if shape != self.shape:
            self.kill_actors()
            log.info("ray: up to %d worker(s) of %d CPU(s)%s", size, shape.cpus,
                     f" and {shape.gpus} GPU" if shape.gpus else "")
        self.shape, self.size = shape, size
        for actor in self.actors[size:]:  # fewer wanted now (a node left)
            self._drop(actor)

    def _drop(self, actor: Any) -> None:
        if actor in self.actors:
            self.actors.remove(actor)
        self._kill(actor)

    def _kill(self, actor: Any) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - gone already, or Ray shut down
            log.debug("ray: kill %s: %s", actor, exc)

    def kill_actors(self) -> None:
        actors, self.actors, self.in_flight = self.actors, [], {}
        for actor in actors:
            self._kill(actor)

    # The executor

    def run(self, jobs: Sequence[Job], finished: Finished) -> None:
        try:
            self._connect()
            for stage in dict.fromkeys(job.stage for job in jobs):
                self._use_shape(stage)
                self._dispatch([job for job in jobs if job.stage == stage], finished)
        except BaseException:
            self.kill_actors()  # cancels the units still running
            raise

    def _dispatch(self, jobs: Sequence[Job], finished: Finished) -> None:
        """At most one job per actor in flight; `finished` as each ends."""
        assert self.shape is not None
        threads = unit_threads(self.shape, self.size, len(jobs))
        todo = deque(jobs)
        idle = list(self.actors)
        running = self.in_flight = {}
        while todo or running:
            while todo and (idle or len(self.actors) < self.size):
                actor = idle.pop() if idle else self._new_actor()
                job = todo.popleft()
                running[actor.run.remote(job.to_json(), threads)] = (actor, job)
            ready, _ = self.ray.wait(list(running), num_returns=1, timeout=POLL_S)
            for ref in ready:
                actor, job = running.pop(ref)
                if self._collect(ref, actor, job, finished):
                    idle.append(actor)

    def _collect(self, ref: Any, actor: Any, job: Job, finished: Finished) -> bool:
        """Report a job that ended; False when its actor is gone (and dropped)."""
        from pipeline.records import UnitRecord

        errors = self.ray.exceptions
        try:
            text = self.ray.get(ref)
        except errors.RayTaskError as exc:  # raised before it had a record (e.g. no plan)
            finished(Outcome(job, None, short(getattr(exc, "cause", None) or exc)))
            return True
        except errors.RayError as exc:  # the actor died: killed, out of memory, node lost
            self._drop(actor)
            # It may have finished just before. A failed record here is a unit stopped by
            # its process's end (SIGTERM unwinds it), not an error of the unit: redo it.
            record = read_own_record(job)
            if record is not None and record.status == "done":
                finished(Outcome(job, record))
            else:
                finished(Outcome(job, None, "Ray worker died (killed, out of memory or node "
                                 f"lost): {short(exc)}"))
            return False
        finished(Outcome(job, UnitRecord.from_json(text)))
        return True

    def close(self) -> None:
        self.kill_actors()
        self.shape, self.size = None, 0
        if self.started:
            self.started = False
            self.ray.shutdown()
