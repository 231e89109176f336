from __future__ import annotations

import multiprocessing as mp
import os

import duckdb
import pytest

from pipeline.catalog import SCHEMA_VERSION, ArtifactRecord, Catalog, ViewSpec


def test_schema_is_idempotent_and_versioned(tmp_path):
    catalog = Catalog(tmp_path / "c.duckdb")
    catalog.init()
    catalog.init()
    rows = catalog.rows("SELECT version FROM schema_version")
    assert rows == [(SCHEMA_VERSION,)]
    tables = {r[0] for r in catalog.rows("SELECT table_name FROM information_schema.tables")}
    assert {"stages", "units", "artifacts", "item_failures", "metrics",
            "stage_summary", "failures_by_reason"} <= tables


def test_newer_schema_is_refused(tmp_path):
    catalog = Catalog(tmp_path / "c.duckdb")
    catalog.init()
    with catalog.transaction() as con:
        con.execute("INSERT INTO schema_version VALUES (?, current_timestamp)",
                    [SCHEMA_VERSION + 1])
    with pytest.raises(RuntimeError, match="newer than this fsr-pipe"):
        catalog.init()


META = {"code_version": "1", "config": {}, "inputs": {}}


def test_stage_summary_is_in_pipeline_order(tmp_path):
    from pipeline.commands import STAGE_NAMES

    catalog = Catalog(tmp_path / "c.duckdb")
    catalog.init()
    for name in ["zz-plugin", *reversed(STAGE_NAMES)]:  # planned last first, an unknown one
        catalog.save_plan(name, "fp", META, [("all", {})])
    order = [r[0] for r in catalog.rows("SELECT stage FROM stage_summary")]
    assert order == [*STAGE_NAMES, "zz-plugin"]


def test_plan_is_frozen_once(tmp_path):
    catalog = Catalog(tmp_path / "c.duckdb")
    catalog.init()
    catalog.save_plan("s", "fp1", META, [("shard-00000", {"shard": 0})])
    # A second planner (another process, another shard size) does not re-shard.
    catalog.save_plan("s", "fp1", META, [("shard-00000", {"shard": 0}), ("shard-00001", {})])
    assert [u.key for u in catalog.units("s", "fp1")] == ["shard-00000"]
    assert catalog.current_fingerprint("s") == "fp1"


def test_claim_finish_and_dead_owner_takeover(tmp_path):
    catalog = Catalog(tmp_path / "c.duckdb")
    catalog.init()
    catalog.save_plan("s", "fp", META, [("a", {})])
    assert catalog.claim("s", "a", "fp") == "claimed"
    # A running mark of a live process on this host is respected...
    with catalog.transaction() as con:
        con.execute("UPDATE units SET pid = ? WHERE unit_key = 'a'", [os.getppid()])
    assert catalog.claim("s", "a", "fp").startswith("busy")
    # ...one of a dead process is taken over.
    dead = mp.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join()
    with catalog.transaction() as con:
        con.execute("UPDATE units SET pid = ? WHERE unit_key = 'a'", [dead.pid])
    assert catalog.claim("s", "a", "fp") == "claimed"
    path = tmp_path / "x.parquet"
    path.write_bytes(b"x")
    catalog.finish("s", "a", "fp", rows=3, seconds=0.1,
                   artifacts=[ArtifactRecord("k", str(path), 3, 1, "00")])
    assert catalog.claim("s", "a", "fp") == "done"
    assert catalog.artifact_paths("s", "fp", "k") == [str(path)]


def _hammer(path: str, worker: int, n: int) -> None:
    catalog = Catalog(path, timeout_s=60)
    for i in range(n):
        with catalog.transaction() as con:
            con.execute("INSERT INTO metrics VALUES "
                        "('w', ?, 'fp', 'n', ?, '{}', current_timestamp)",
                        [str(worker), float(i)])


def test_concurrent_writers_all_land(tmp_path):
    path = str(tmp_path / "c.duckdb")
    Catalog(path).init()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(path, w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    assert Catalog(path).rows("SELECT count(*) FROM metrics")[0][0] == 60


def test_views_bind_before_and_after_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    catalog = Catalog(tmp_path / "c.duckdb")
    catalog.init()
    spec = ViewSpec("things", "s", "k", "thing_id BIGINT, name VARCHAR")
    catalog.refresh_views([spec])
    assert catalog.rows("SELECT count(*) FROM things") == [(0,)]
    catalog.save_plan("s", "fp", META, [("a", {})])
    path = tmp_path / "it's.parquet"  # a quote in the path must not break the view
    pq.write_table(pa.table({"thing_id": [1, 2], "name": ["x", "y"]}), path)
    catalog.finish("s", "a", "fp", 2, 0.0, [ArtifactRecord("k", str(path), 2, 1, "00")])
    catalog.refresh_views([spec])
    assert catalog.rows("SELECT sum(thing_id) FROM things") == [(3,)]
    # The file opens in plain duckdb too (no fsr-pipe needed to read results).
    con = duckdb.connect(str(tmp_path / "c.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM things").fetchone() == (2,)
    con.close()
