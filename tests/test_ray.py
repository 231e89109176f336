"""The ray executor on a local 2-CPU Ray cluster: same results as inline, a killed actor's unit
retried, a clear error without Ray. Each actor process imports torch (seconds on 2 cores):
2 actors and a tiny config. A hang fails the test (the driver runs in a thread joined with a
timeout) instead of hanging CI.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_tiny_config
from test_resume import results

from pipeline import commands
from pipeline.config import load_config
from pipeline.executors import make_executor
from pipeline.executors.ray import RayExecutor, Shape, actor_count, fit_shape
from pipeline.progress import ProgressBoard
from pipeline.runner import Runner
from pipeline.stage import PipelineError
from stages import all_stages

RAY = ['run.executor="ray"', "run.workers=2"]
TIMINGS = ("queries_per_s",)  # Parquet columns that differ between any two runs
TIMEOUT_S = 600.0  # a whole tiny run on Ray; far more than it takes (~1 min on 2 cores)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module (the executor uses it and leaves it running)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    before = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             configure_logging=False)
    yield ray
    ray.shutdown()
    if before is None:
        os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
    else:
        os.environ["RAY_USAGE_STATS_ENABLED"] = before


def in_thread(fn: Callable[[], Any], timeout: float = TIMEOUT_S) -> Any:
    """fn() in a daemon thread; fail (not hang) when it has not returned after `timeout`."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="ray-driver")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"the Ray run did not end in {timeout:.0f}s (a hang)")
    if "error" in out:
        raise out["error"]
    return out["value"]


def same_results(expected_dir: Path, got_dir: Path, views: bool = True) -> None:
    """Every Parquet file (by path under the work dir) and, with `views` (a run of every
    stage), the catalog views are equal."""
    if views:
        expected, got = results(expected_dir), results(got_dir)
        for view in expected:
            assert got[view].equals(expected[view]), f"{view} differs from the inline run"
    files = {p.relative_to(expected_dir) for p in expected_dir.rglob("*.parquet")}
    assert files and files == {p.relative_to(got_dir) for p in got_dir.rglob("*.parquet")}
    for rel in sorted(files):
        assert parquet(got_dir, rel).equals(parquet(expected_dir, rel)), \
            f"{rel} differs from the inline run"


def parquet(work_dir: Path, rel: Path) -> pa.Table:
    """A Parquet file's content, its timings left out (index recall.parquet's queries_per_s)
    and the work dir in its strings (e.g. prepare's image paths) made `<work_dir>`."""
    table = pq.read_table(work_dir / rel)
    table = table.drop_columns([c for c in TIMINGS if c in table.column_names])
    for i, column in enumerate(table.columns):
        if pa.types.is_string(column.type):
            values = [v and v.replace(str(work_dir), "<work_dir>") for v in column.to_pylist()]
            table = table.set_column(i, table.column_names[i], pa.array(values, pa.string()))
    return table


def test_without_ray_the_error_names_the_extra(tmp_path, monkeypatch):
    config = load_config(write_tiny_config(tmp_path, tmp_path / "run"), RAY)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(PipelineError, match=r"needs Ray: pip install -e '\.\[cpu,ray\]'"):
        make_executor(config)


def test_actors_fit_the_cluster():
    # workers = 0: one per GPU with CUDA, else one per 2 CPUs
    assert actor_count(0, True, {"CPU": 16, "GPU": 2}) == 2
    assert actor_count(0, False, {"CPU": 16, "GPU": 2}) == 8
    assert actor_count(0, False, {"CPU": 1}) == 1
    assert actor_count(3, True, {"CPU": 16, "GPU": 2}) == 3
    # every actor placed at once, each with as many CPUs as that allows
    assert fit_shape([{"CPU": 2}], 2, 0) == (2, Shape(1, 0))
    assert fit_shape([{"CPU": 4}, {"CPU": 2}], 2, 0) == (2, Shape(2, 0))
    assert fit_shape([{"CPU": 8}], 1, 0) == (1, Shape(8, 0))
    # more workers than GPUs: as many as there are GPUs
    assert fit_shape([{"CPU": 8, "GPU": 1}, {"CPU": 4, "GPU": 1}], 3, 1) == (2, Shape(4, 1))
    with pytest.raises(PipelineError, match="no node"):
        fit_shape([{"CPU": 8}], 1, 1)


@pytest.mark.slow
def test_ray_run_all_equals_inline(tmp_path, ray_cluster):
    (tmp_path / "inline").mkdir()
    (tmp_path / "ray").mkdir()
    inline = write_tiny_config(tmp_path / "inline", tmp_path / "inline" / "run")
    commands.run(all_stages, load_config(inline), ["all"], progress=False)
    on_ray = write_tiny_config(tmp_path / "ray", tmp_path / "ray" / "run")
    reports = in_thread(lambda: commands.run(all_stages,
                                             load_config(on_ray, RAY), ["all"], progress=False))
    assert all(r.ran == r.units and not r.retried for r in reports), reports
    same_results(tmp_path / "inline" / "run", tmp_path / "ray" / "run")
    assert ray_cluster.is_initialized()  # the executor did not start it: it leaves it running
    all_cpus_free(ray_cluster)


def all_cpus_free(ray, timeout: float = 60.0) -> None:
    """The executor's close() killed its actors: their CPUs come back (Ray frees them a
    moment after the kill)."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, f"actors left: {ray.available_resources()}"
        time.sleep(0.1)


def kill_first_actor_with_a_lease(executor, leases: Path, stop: threading.Event,
                                  killed: list[str]) -> None:
    """Once a unit's lease file appears (it has started), ray.kill the actor running it."""
    while not stop.is_set():
        started = {p.stem for p in leases.glob("*.json")} if leases.is_dir() else set()
        for actor, job in list(executor.in_flight.values()):
            if job.unit_key in started:
                executor.ray.kill(actor)
                killed.append(job.unit_key)
                return
        time.sleep(0.02)


@pytest.mark.slow
def test_a_killed_actor_unit_is_retried(tmp_path, ray_cluster):
    (tmp_path / "inline").mkdir()
    (tmp_path / "ray").mkdir()
    inline = write_tiny_config(tmp_path / "inline", tmp_path / "inline" / "run")
    commands.run(all_stages, load_config(inline), ["extract"], progress=False)
    work = tmp_path / "ray" / "run"
    path = write_tiny_config(tmp_path / "ray", work)
    commands.run(all_stages,
                 load_config(path), ["prepare"], progress=False)  # inline: no kill point there

    config = load_config(path, RAY)
    executor = RayExecutor(config)
    runner = Runner(config, all_stages, ProgressBoard(False), executor=executor)
    leases = work / "extract" / runner.fingerprints["extract"] / "_leases"
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=kill_first_actor_with_a_lease,
                              args=(executor, leases, stop, killed), daemon=True)
    killer.start()
    try:
        reports = in_thread(lambda: runner.run(["extract"]))
    finally:
        stop.set()
        killer.join(10)
    assert killed, "no actor was killed: no extract unit was seen running"
    report = {r.stage: r for r in reports}["extract"]
    assert report.retried >= 1, report
    assert report.ran == report.units, report
    units = runner.catalog.units("extract", runner.fingerprints["extract"])
    assert units and all(u.status == "done" for u in units)
    attempts = {u.key: u.attempts for u in units}
    assert attempts[killed[0]] >= 2, attempts
    same_results(tmp_path / "inline" / "run", work, views=False)  # up to extract only
    all_cpus_free(ray_cluster)
