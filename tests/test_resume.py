"""Crash and concurrency: SIGKILL mid-run then resume; shard processes started at once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import start_cli, wait_for, write_tiny_config

from pipeline import commands
from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.leases import read_leases
from stages import all_stages


def results(work_dir: Path) -> dict[str, pa.Table]:
    """Every current artifact's content, sorted, with work-dir paths made relative."""
    catalog = Catalog.in_dir(work_dir)
    out = {}
    for view, order in (("gallery", "image_id"), ("queries", "query_id"),
                        ("gram_features", "query_id"), ("gallery_gram", "image_id"),
                        ("style_centres", "cluster"), ("style_assignments", "item_id")):
        table = catalog.query(f"SELECT * FROM {view} ORDER BY {order}")
        if "path" in table.column_names:
            rel = [p and os.path.relpath(p, work_dir) for p in table["path"].to_pylist()]
            table = table.set_column(table.column_names.index("path"), "path", pa.array(rel))
        out[view] = table
    # Later stages: retrieval results and metrics (timings left out).
    for view, columns in (
            ("retrieval_metrics", "*"), ("search_results", "*"), ("query_ranks", "*"),
            ("index_recall", "* EXCLUDE (queries_per_s)"), ("train_history", "*")):
        out[view] = catalog.query(f"SELECT {columns} FROM {view} ORDER BY ALL")
    return out


def _has_ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["inline", "local", pytest.param("ray", marks=(
    pytest.mark.skipif(not _has_ray(), reason="ray is not installed (the [ray] extra)")))])
def test_sigkill_then_resume_gives_identical_results(tmp_path, executor):
    (tmp_path / "ref").mkdir()
    reference = write_tiny_config(tmp_path / "ref", tmp_path / "ref" / "run", items=40)
    commands.run(all_stages, load_config(reference), ["all"], progress=False)

    (tmp_path / "killed").mkdir()
    config = write_tiny_config(tmp_path / "killed", tmp_path / "killed" / "run", items=40)
    config.write_text(config.read_text().replace(
        "[run]\n", f'[run]\nexecutor = "{executor}"\nworkers = 2\n', 1))
    work = tmp_path / "killed" / "run"
    kill_points = [
        lambda: len(list((work / "prepare").rglob("queries.parquet"))) >= 2,
        lambda: len(list((work / "extract").rglob("gram_queries.parquet"))) >= 1,
        lambda: len(list((work / "extract").rglob("gram_queries.parquet"))) >= 6,
        lambda: len(list((work / "train").rglob("epoch-001.pt"))) >= 1,
        lambda: len(list((work / "index").rglob("index.faiss"))) >= 1,
    ]
    for point in kill_points:
        proc = start_cli(config, "run", "all")
        wait_for(point, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Ray's workers outlive a killed driver for a moment (Ray then ends them), holding
        # their units' leases: the next driver would rightly refuse those units as being run
        # by others. A user reruns when they end; the test waits for that.
        _wait_until(lambda: not _live_leases(work), timeout=120)
    catalog = Catalog.in_dir(work)
    assert catalog.rows("SELECT count(*) FROM units WHERE status = 'done' "
                        "AND stage = 'score'") == [(0,)]
    proc = start_cli(config, "run", "all")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert not list(work.rglob("*.tmp.*")), "temporary files were left behind"
    expected, got = results(tmp_path / "ref" / "run"), results(work)
    for view in expected:
        assert got[view].equals(expected[view]), f"{view} differs after kill + resume"
    # Every file the catalog lists exists; every Parquet file on disk is listed (no orphans
    # counted as done).
    listed = {r[0] for r in catalog.rows("SELECT path FROM artifacts WHERE path LIKE '%.parquet'")}
    on_disk = {str(p) for p in work.rglob("*.parquet")}
    assert listed == on_disk


def _live_leases(work: Path) -> list[str]:
    return [f"{plan.parent.name} {key}" for plan in work.glob("*/*/_leases")
            for key, lease in read_leases(plan.parent).items() if lease.state(120.0) == "alive"]


def _wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "still not true after the timeout"
        time.sleep(0.1)


def _unit_under_way(stage_dir: Path) -> bool:
    """A unit holds its lease and has written none of its files yet: it is some way from
    done (a lease alone may be the last instant of a unit that just wrote everything)."""
    return any(not (lease.parent.parent / lease.stem / "gram_queries.parquet").exists()
               for lease in stage_dir.glob("*/_leases/*.json"))


@pytest.mark.parametrize(("signum", "said"), [(signal.SIGTERM, "terminated (SIGTERM)"),
                                              (signal.SIGINT, "interrupted"),
                                              (signal.SIGKILL, None)])
def test_a_stopped_run_says_so_and_status_shows_what_resumes(tmp_path, signum, said):
    config_path = write_tiny_config(tmp_path, tmp_path / "run", items=40)
    # Units of ~0.4 s (not 0.1): the signal lands in the unit seen under way, even on a busy
    # machine, not after its done record.
    config_path.write_text(config_path.read_text().replace("image_size = 64", "image_size = 128"))
    work = tmp_path / "run"
    proc = start_cli(config_path, "run", "all")
    # In the middle of a unit: one done, the next one holding its lease.
    wait_for(lambda: len(list((work / "extract").rglob("gram_queries.parquet"))) >= 1
             and _unit_under_way(work / "extract"), proc)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode in (128 + signum, -signum), out
    statuses = dict(Catalog.in_dir(work).rows(
        "SELECT status, count(*) FROM units WHERE stage = 'extract' GROUP BY ALL"))
    extract = {s.stage: s for s in commands.status(all_stages, load_config(config_path))}["extract"]
    assert extract.running == 0
    assert extract.done + extract.pending + extract.lost + extract.failed == 10
    if said is None:  # SIGKILL: no last word; its lease names a dead process: lost
        assert statuses.get("running") is None and extract.lost == 1, (statuses, extract)
        assert "1 unit(s) lost" in extract.notes
    else:  # the unit is marked failed (not left `running`) and the user told how to go on
        assert "running" not in statuses and statuses.get("failed") == 1, statuses
        assert f"error: {said}; finished units are kept" in out and "Traceback" not in out, out
        assert not list(work.rglob("*.tmp.*")), "temporary files were left behind"
    proc = start_cli(config_path, "run", "extract")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert commands.status(all_stages, load_config(config_path))[2].done == 10


def _hold_catalog(path: str, started, stop) -> None:  # noqa: ANN001 - mp events
    import duckdb

    con = duckdb.connect(path)  # a writer: no other process can open the file now
    started.set()
    stop.wait(300)
    con.close()


def test_shard_workers_never_open_the_catalog(tmp_path):
    """Workers run while another process holds catalog.duckdb for writing; the next `status`
    ingests their records."""
    import multiprocessing as mp

    config_path = write_tiny_config(tmp_path, tmp_path / "run", items=16)
    config = load_config(config_path)
    commands.run(all_stages, config, ["prepare"], progress=False)
    commands.run(all_stages, config, ["extract"], plan_only=True, progress=False)
    ctx = mp.get_context("spawn")
    started, stop = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_catalog,
                         args=(str(config.work_dir / "catalog.duckdb"), started, stop))
    holder.start()
    try:
        assert started.wait(60)
        procs = [start_cli(config_path, "stage", "extract", "--shard", str(i))
                 for i in range(4)]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    finally:
        stop.set()
        holder.join(60)
    extract = {s.stage: s for s in commands.status(all_stages, config)}["extract"]
    assert (extract.ingested, extract.done, extract.pending) == (4, 4, 0)
    catalog = Catalog.in_dir(config.work_dir)
    reports = commands.run(all_stages, config, ["cluster"], progress=False)
    assert {r.stage: r.ran for r in reports}["extract"] == 0
    assert catalog.rows("SELECT count(*) FROM gram_features") == [(48,)]
