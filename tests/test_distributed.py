"""Records, leases and the local executor: the driver as the catalog's only writer."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_tiny_config
from test_resume import results

from pipeline import commands
from pipeline.artifacts import remove_stale_tmp
from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.executors.local import LocalExecutor
from pipeline.jobs import Job
from pipeline.leases import HOST_ENV, Holding, read_leases, release
from pipeline.plans import fingerprints
from pipeline.progress import ProgressBoard
from pipeline.records import read_records
from pipeline.runner import Runner
from pipeline.stage import PipelineError
from pipeline.worker import run_job
from stages import all_stages

TIMINGS = ("queries_per_s",)  # measured speeds, not results


def parquet_files(work_dir: Path) -> dict[str, object]:
    """Every Parquet file under a run directory (relative path -> table, timings dropped)."""
    tables = {}
    for path in sorted(work_dir.rglob("*.parquet")):
        table = pq.read_table(path)
        if "path" in table.column_names:  # image paths: under each run's own work dir
            rel = [p and os.path.relpath(p, work_dir) for p in table["path"].to_pylist()]
            table = table.set_column(table.column_names.index("path"), "path", pa.array(rel))
        tables[str(path.relative_to(work_dir))] = table.drop_columns(
            [c for c in TIMINGS if c in table.column_names])
    return tables


def assert_same_results(work: Path, reference: Path) -> None:
    expected, got = results(reference), results(work)
    for view in expected:
        assert got[view].equals(expected[view]), f"{view} differs from the inline run"
    ours, theirs = parquet_files(work), parquet_files(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].equals(theirs[name]), f"{name} differs from the inline run"


def out_dir(config, stage: str) -> Path:
    return config.work_dir / stage / fingerprints(all_stages(), config)[stage]


def inline_and_pool(tmp_path: Path, inline_targets: list[str]):  # noqa: ANN201
    """(inline config run up to `inline_targets`, the same config on a 2-worker pool)."""
    for name in ("ref", "pool"):
        (tmp_path / name).mkdir()
    inline = load_config(write_tiny_config(tmp_path / "ref", tmp_path / "ref" / "run"))
    commands.run(all_stages, inline, inline_targets, progress=False)
    pool = load_config(write_tiny_config(tmp_path / "pool", tmp_path / "pool" / "run"),
                       ['run.executor="local"', "run.workers=2"])
    return inline, pool


def test_local_executor_gives_the_inline_results(tmp_path):
    inline, pool = inline_and_pool(tmp_path, ["all"])
    reports = commands.run(all_stages, pool, ["all"], progress=False)
    assert sum(r.ran for r in reports) == sum(r.units for r in reports)
    assert_same_results(pool.work_dir, inline.work_dir)
    assert not list(pool.work_dir.rglob("_leases/*.json")), "leases left behind"
    assert not list(pool.work_dir.rglob("*.tmp.*")), "temporary files left behind"


def _kill_first_worker(lease_dir_of, done: threading.Event) -> None:  # noqa: ANN001
    """SIGKILL the process holding the first lease that appears (a worker dying mid-unit)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not done.is_set():
        folder = lease_dir_of()
        leases = read_leases(folder) if folder else {}
        for lease in leases.values():
            if lease.pid != os.getpid():
                os.kill(lease.pid, signal.SIGKILL)
                return
        time.sleep(0.01)


def test_a_killed_local_worker_is_retried(tmp_path):
    inline, config = inline_and_pool(tmp_path, ["extract"])
    commands.run(all_stages, config, ["prepare"], progress=False)
    extract_dir = out_dir(config, "extract")
    done = threading.Event()
    killer = threading.Thread(target=_kill_first_worker, args=(lambda: extract_dir, done))
    killer.start()
    try:
        with ProgressBoard(False) as board:
            runner = Runner(config, all_stages, board,
                            executor=LocalExecutor(2, config.run.device))
            reports = runner.run(["extract"])
    finally:
        done.set()
        killer.join()
    extract = {r.stage: r for r in reports}["extract"]
    assert extract.retried >= 1 and extract.ran == 4, extract
    catalog = Catalog.in_dir(config.work_dir)
    assert catalog.rows("SELECT count(*) FROM units WHERE stage = 'extract' AND "
                        "status = 'done'") == [(4,)]
    ours = {k: v for k, v in parquet_files(config.work_dir).items() if k.startswith("extract")}
    theirs = {k: v for k, v in parquet_files(inline.work_dir).items() if k.startswith("extract")}
    assert ours.keys() == theirs.keys() and all(ours[k].equals(theirs[k]) for k in ours)


def test_an_application_error_stops_the_run_without_retries(tmp_path):
    config = load_config(write_tiny_config(tmp_path, tmp_path / "run"),
                         ['run.executor="local"', "run.workers=1", "cluster.k=500"])
    with pytest.raises(PipelineError, match=r"stage cluster: unit all failed on .*cluster\.k"):
        commands.run(all_stages, config, ["cluster"], progress=False)
    rows = Catalog.in_dir(config.work_dir).rows(
        "SELECT status, attempts, error FROM units WHERE stage = 'cluster'")
    assert len(rows) == 1 and rows[0][:2] == ("failed", 1) and "cluster.k" in rows[0][2]


def test_two_hosts_keep_their_hands_off_each_others_temp_files(tmp_path, monkeypatch):
    plan_dir = tmp_path / "extract" / "fp"
    unit = plan_dir / "shard-00001"
    unit.mkdir(parents=True)
    old = time.time() - 3600
    # Host B's unit is alive (fresh lease): its temp file stays, even though its pid means
    # nothing here and the file is old.
    monkeypatch.setenv(HOST_ENV, "node-b")
    with Holding(plan_dir, "shard-00001", 1, heartbeat_s=60):
        live = unit / ".gram_queries.parquet.tmp.node-b.4242"
        live.write_bytes(b"x")
        os.utime(live, (old, old))
        monkeypatch.setenv(HOST_ENV, "node-a")
        mine_dead = unit / ".gram_gallery.parquet.tmp.node-a.999999999"
        mine_dead.write_bytes(b"x")
        assert remove_stale_tmp(plan_dir, read_leases(plan_dir), lease_s=120) == 1
        assert live.exists() and not mine_dead.exists()
        monkeypatch.setenv(HOST_ENV, "node-b")
    # Its unit ended (no lease): a leftover of host B older than the lease goes; a fresh one
    # (a unit that may be starting right now) stays.
    monkeypatch.setenv(HOST_ENV, "node-a")
    fresh = unit / ".other.parquet.tmp.node-b.4243"
    fresh.write_bytes(b"x")
    assert remove_stale_tmp(plan_dir, read_leases(plan_dir), lease_s=120) == 1
    assert not live.exists() and fresh.exists()


def _remote_lease(path: Path, heartbeat: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"unit_key": path.stem, "host": "node-b", "pid": 1,
                                "attempt": 1, "since": heartbeat}))
    os.utime(path, (heartbeat, heartbeat))


def test_a_dead_remote_unit_is_lost_after_its_lease_and_redone(tmp_path):
    config = load_config(write_tiny_config(tmp_path, tmp_path / "run"), ["run.lease_s=60"])
    commands.run(all_stages, config, ["prepare"], progress=False)
    commands.run(all_stages, config, ["extract"], plan_only=True, progress=False)
    lease = out_dir(config, "extract") / "_leases" / "shard-00002.json"
    _remote_lease(lease, time.time())  # node-b runs shard 2 and heartbeats
    extract = {s.stage: s for s in commands.status(all_stages, config)}["extract"]
    assert (extract.running, extract.lost, extract.pending) == (1, 0, 3)
    assert extract.running_on[0].startswith("shard-00002 on node-b pid 1 since")
    with pytest.raises(PipelineError, match=r"1 unit\(s\) are being run by other processes: "
                                            r"shard-00002 \(node-b:1\)"):
        commands.run(all_stages, config, ["extract"], progress=False)
    assert not (out_dir(config, "extract") / "shard-00002").exists()  # left alone
    _remote_lease(lease, time.time() - 61)  # node-b went silent a lease ago
    extract = {s.stage: s for s in commands.status(all_stages, config)}["extract"]
    assert (extract.running, extract.lost, extract.done) == (0, 1, 3)
    assert "1 unit(s) lost" in extract.notes
    reports = commands.run(all_stages, config, ["extract"], progress=False)
    assert {r.stage: r.ran for r in reports}["extract"] == 1
    assert not lease.exists()


def test_records_that_do_not_match_their_files_do_not_count(tmp_path, caplog):
    config = load_config(write_tiny_config(tmp_path, tmp_path / "run"))
    commands.run(all_stages, config, ["prepare"], progress=False)
    commands.run(all_stages, config, ["extract"], plan_only=True, progress=False)
    records = commands.work(all_stages, config, "extract", progress=False)
    assert len(records) == 4
    folder = out_dir(config, "extract")
    (folder / "shard-00000" / "gram_queries.parquet").unlink()  # a file gone
    with open(folder / "shard-00001" / "gram_gallery.parquet", "ab") as handle:
        handle.write(b"junk")  # a file changed
    record = folder / "_records" / "shard-00002.json"  # another plan's record
    record.write_text(record.read_text().replace(folder.name, "0" * 16))
    extract = {s.stage: s for s in commands.status(all_stages, config)}["extract"]
    assert (extract.ingested, extract.done, extract.pending) == (1, 1, 3)
    assert "is missing" in caplog.text and "the record says" in caplog.text
    reports = commands.run(all_stages, config, ["extract"], progress=False)
    assert {r.stage: r.ran for r in reports}["extract"] == 3
    assert {r.unit_key for r in read_records(folder)} == {f"shard-0000{i}" for i in range(4)}


def test_a_worker_never_runs_a_unit_another_live_worker_holds(tmp_path):
    config = load_config(write_tiny_config(tmp_path, tmp_path / "run"))
    commands.run(all_stages, config, ["prepare"], progress=False)
    commands.run(all_stages, config, ["extract"], plan_only=True, progress=False)
    folder = out_dir(config, "extract")
    lease = folder / "_leases" / "shard-00001.json"
    _remote_lease(lease, time.time())
    plan = folder / "_plan.json"
    job = Job.of(config, plan, "shard-00001", {}, "extract", folder.name,
                 "stages:all_stages")
    with pytest.raises(PipelineError, match="being run by node-b .*not running it twice"):
        run_job(job)
    assert lease.exists() and not (folder / "_records" / "shard-00001.json").exists()
    # A worker whose unit was taken over (its lease lost, then renewed by another) leaves the
    # new holder's lease in place when it ends.
    with Holding(folder, "shard-00002", 1, heartbeat_s=60):
        _remote_lease(folder / "_leases" / "shard-00002.json", time.time())
    assert (folder / "_leases" / "shard-00002.json").exists()


@pytest.mark.parametrize("where", ["lease", "record"])
def test_a_signal_between_the_units_work_and_its_record_leaves_a_failed_record(
        tmp_path, monkeypatch, where):
    """Ctrl-C or SIGTERM landing while the lease is taken, or after the stage's work but before
    the done record's rename: the unit gets a failed record and no lease is left behind."""
    import pipeline.leases
    import pipeline.worker

    config = load_config(write_tiny_config(tmp_path, tmp_path / "run"))
    commands.run(all_stages, config, ["prepare"], progress=False)
    commands.run(all_stages, config, ["extract"], plan_only=True, progress=False)
    folder = out_dir(config, "extract")

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    if where == "lease":
        monkeypatch.setattr(pipeline.leases.threading.Thread, "start", interrupted)
    else:
        monkeypatch.setattr(pipeline.worker, "relative_artifacts", interrupted)
    job = Job.of(config, folder / "_plan.json", "shard-00001", {}, "extract", folder.name,
                 "stages:all_stages")
    with pytest.raises(KeyboardInterrupt):
        run_job(job)
    [record] = read_records(folder)
    assert (record.unit_key, record.status, record.error) == (
        "shard-00001", "failed", "KeyboardInterrupt")
    assert not read_leases(folder)
    monkeypatch.undo()
    assert run_job(job).status == "done"


def test_the_lease_of_an_attempt_seen_ending_is_released(tmp_path):
    """A worker on another host that the executor saw die (actor, Slurm task) leaves a lease
    that looks alive for run.lease_s; the driver drops it before the retry, not another's."""
    lease = tmp_path / "_leases" / "shard-00001.json"
    _remote_lease(lease, time.time())
    release(tmp_path, "shard-00001", attempt=2)  # a later attempt holds it now: kept
    assert lease.exists()
    release(tmp_path, "shard-00001", attempt=1)
    assert not lease.exists()


def test_an_unknown_executor_is_one_line(tiny_config):
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["run", "all", "--executor", "bogus", "-c", str(tiny_config)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert text.startswith("error: run.executor") and "'inline', 'local', 'slurm', 'ray'" in text
    assert "Traceback" not in result.output
    assert not (tiny_config.parent / "run").exists()  # stopped before any work


def test_local_workers_default_to_one_per_gpu(monkeypatch):
    import pipeline.executors.local as local

    monkeypatch.setattr(local, "cuda_devices", lambda: 4)
    assert local.worker_count(0, "auto") == 4  # one worker per GPU
    assert local.LocalExecutor(0, "auto").gpus == 4
    assert local.worker_count(3, "auto") == 3  # run.workers wins
    monkeypatch.setattr(local.os, "cpu_count", lambda: 16)
    assert local.worker_count(0, "cpu") == 8  # no GPU wanted: one per 2 cores
    monkeypatch.setattr(local, "cuda_devices", lambda: 0)
    assert local.worker_count(0, "auto") == 8
    assert local.LocalExecutor(0, "auto").gpus == 0


def test_cluster_executors_give_index_a_gpu_only_with_index_use_gpu(tiny_config):
    from pipeline.executors.base import gpu_stages

    assert gpu_stages(load_config(tiny_config)) == {"extract", "train", "embed", "score",
                                                    "index"}
    assert "index" not in gpu_stages(load_config(tiny_config, ["index.use_gpu=false"]))
