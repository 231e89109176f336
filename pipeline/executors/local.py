"""`local`: a pool of worker processes on this machine; one per GPU when CUDA is visible.

Workers are spawned (not forked: torch and OpenMP threads do not survive a fork) and live for
the whole run, so each loads its models once. Each gets `CUDA_VISIBLE_DEVICES` of its own GPU
(when there are GPUs) and an equal share of the CPU cores for torch (all of them when a stage
has a single unit). A worker that dies (kill,
out of memory) breaks the pool: the jobs it and its siblings had not finished come back as
lost, and the driver retries them on a fresh pool.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from pipeline.executors.base import Executor, Finished, Outcome, read_own_record, run_job_json
from pipeline.jobs import Job

log = logging.getLogger(__name__)


def cuda_devices() -> int:
    """GPUs torch can see, without initialising CUDA in this process."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA is zero GPUs here
        return 0


def worker_count(setting: int, device: str) -> int:
    """run.workers, or 0 = one per GPU (device not cpu) else one per 2 CPU cores."""
    if setting > 0:
        return setting
    gpus = cuda_devices() if device != "cpu" else 0
    return gpus or max(1, (os.cpu_count() or 2) // 2)


class _Terminated(BaseException):
    """SIGTERM in a pool worker: unwinds the unit so it writes its failed record."""


def _on_term(signum, frame):  # noqa: ANN001, ANN202, ARG001
    raise _Terminated()


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the driver dies (even by SIGKILL), so no
    orphan goes on holding a lease the next run would have to wait for."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: orphans finish their unit, then exit
        pass


def _init_worker(gpu_slots, threads: int) -> None:  # noqa: ANN001
    _die_with_parent()
    # Ctrl-C reaches the whole process group: the driver decides, then terminates workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_term)
    if gpu_slots is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_slots.get())
    # Before torch loads: OpenMP and MKL size their pools from these (as Ray does for its
    # actors); without them each worker's runtime starts a thread per core and they contend.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(threads))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, force=True,
                        format="%(asctime)s %(levelname)s [worker %(process)d] %(message)s")
    for name in ("pipeline", "stages"):
        logging.getLogger(name).setLevel(logging.INFO)


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, workers: int, device: str) -> None:
        self.workers = worker_count(workers, device)
        self.gpus = min(cuda_devices(), self.workers) if device != "cpu" else 0
        self._pool: ProcessPoolExecutor | None = None

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            slots = None
            if self.gpus:
                slots = ctx.Queue()
                for i in range(self.workers):
                    slots.put(i % self.gpus)
            threads = max(1, (os.cpu_count() or 1) // self.workers)
            log.info("local executor: %d worker process(es), %d torch thread(s) each%s",
                     self.workers, threads, f", {self.gpus} GPU(s)" if self.gpus else "")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx,
                                             initializer=_init_worker,
                                             initargs=(slots, threads))
        return self._pool

    def run(self, jobs: Sequence[Job], finished: Finished) -> None:
        from pipeline.records import UnitRecord

        pool = self._start()
        # Fewer jobs than workers (train, index, score: one unit each) get the idle workers'
        # cores: a one-unit stage runs on every core, as inline, with the same numerics.
        threads = max(1, (os.cpu_count() or 1) // min(self.workers, len(jobs)))
        futures: dict[Future, Job] = {pool.submit(run_job_json, job.to_json(), threads): job
                                      for job in jobs}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    job = futures[future]
                    try:
                        record = UnitRecord.from_json(future.result())
                    except BrokenProcessPool as exc:
                        self._broken(job, exc, finished)
                        continue
                    except Exception as exc:  # noqa: BLE001 - the worker died mid-way
                        finished(Outcome(job, None, f"{type(exc).__name__}: {exc}"))
                        continue
                    finished(Outcome(job, record))  # raises on a failed unit: we stop
        except BaseException:
            self.close(terminate=True)
            raise
        if any(isinstance(f.exception(), BrokenProcessPool) for f in futures if f.done()):
            self.close(terminate=True)  # a fresh pool for the retries

    def _broken(self, job: Job, exc: BaseException, finished: Finished) -> None:
        # It may have finished just before. A failed record here is a sibling the broken pool
        # terminated mid-unit (SIGTERM), not an error of the unit: redo it.
        record = read_own_record(job)
        if record is not None and record.status == "done":
            finished(Outcome(job, record))
        else:
            finished(Outcome(job, None, f"worker process died (killed or out of memory): "
                             f"{exc}"))

    def close(self, terminate: bool = False) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if terminate:
            for process in list(getattr(pool, "_processes", {}).values()):
                if process.is_alive():
                    process.terminate()  # SIGTERM: the unit writes a failed record
        pool.shutdown(wait=True, cancel_futures=True)
