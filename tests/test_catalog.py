from __future__ import annotations

import multiprocessing as mp

import duckdb
import pytest

from pipeline.catalog import SCHEMA_VERSION, Catalog, CatalogBusy
from pipeline.records import (
    ArtifactRecord,
    FailureRecord,
    MetricRecord,
    PlanRow,
    UnitRecord,
    ViewSpec,
)


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
    from stages import all_stages

    STAGE_NAMES = [s.name for s in all_stages()]  # noqa: N806
    catalog = Catalog(tmp_path / "c.duckdb")
    catalog.init()
    # Planned last first, and one planned without a position (an older fsr-pipe's plan).
    catalog.save_plan("zz-plugin", "fp", META, [("all", {})])
    for position, name in reversed(list(enumerate(STAGE_NAMES))):
        catalog.save_plan(name, "fp", {**META, "position": position}, [("all", {})])
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


def record(key: str, status: str = "done", artifacts=(), fp: str = "fp", **extra) -> UnitRecord:
    return UnitRecord("s", fp, key, status, "host", 1, 1, 0.0, 2.0, rows=3,
                      artifacts=list(artifacts), **extra)


def test_ingest_records_replaces_earlier_attempts_and_is_repeatable(tmp_path):
    catalog = Catalog(tmp_path / "c.duckdb")
    catalog.init()
    catalog.save_plan("s", "fp", META, [("a", {}), ("b", {})])
    catalog.ingest([record("a", "failed", error="ValueError: boom")], tmp_path)
    assert catalog.rows("SELECT unit_key, status, error, attempts FROM units ORDER BY 1") == [
        ("a", "failed", "ValueError: boom", 1), ("b", "pending", None, 0)]
    done = record("a", artifacts=[ArtifactRecord("k", "s/fp/a/x.parquet", 3, 1, "00")],
                  failures=[FailureRecord("gallery", 7, "p.jpg", "unreadable: x")],
                  metrics=[MetricRecord("m", 1.5, {"style": "sketch"})])
    for _ in range(2):  # ingesting the same record again leaves the same rows
        catalog.ingest([done], tmp_path)
        assert catalog.rows("SELECT status, rows, seconds, error FROM units WHERE "
                            "unit_key = 'a'") == [("done", 3, 2.0, None)]
        assert catalog.artifact_paths("s", "fp", "k") == [str(tmp_path / "s/fp/a/x.parquet")]
        assert catalog.failed_items("s", "fp", "gallery") == {7}
        assert catalog.rows("SELECT name, value, labels_json FROM metrics") == [
            ("m", 1.5, '{"style": "sketch"}')]
    # A record of another fingerprint touches nothing of this plan.
    catalog.ingest([record("b", fp="other")], tmp_path)
    assert catalog.unit_status("s", "fp") == {"a": "done", "b": "pending"}


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
    catalog.ingest([record("a", artifacts=[ArtifactRecord("k", str(path), 2, 1, "00")])],
                   tmp_path)
    catalog.refresh_views([spec])
    assert catalog.rows("SELECT sum(thing_id) FROM things") == [(3,)]
    # The file opens in plain duckdb too (no fsr-pipe needed to read results).
    con = duckdb.connect(str(tmp_path / "c.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM things").fetchone() == (2,)
    con.close()


def test_a_file_system_without_locks_is_said_at_once(tmp_path, monkeypatch):
    def no_locks(*args, **kwargs):
        raise duckdb.IOException(f'Could not set lock on file "{tmp_path}/c.duckdb": '
                                 "Operation not supported")

    monkeypatch.setattr(duckdb, "connect", no_locks)
    catalog = Catalog(tmp_path / "c.duckdb", timeout_s=300)
    with pytest.raises(CatalogBusy, match="does not support file locks.*local disk"):
        catalog.init()  # at once, not after run.catalog_timeout_s


def _count_opens(monkeypatch) -> list[bool]:
    """The read_only flag of every duckdb.connect the catalog makes from now on."""
    import pipeline.catalog as catalog_module

    opened: list[bool] = []
    real = duckdb.connect

    def counting(path, read_only=False, **kwargs):  # noqa: ANN001, ANN202
        opened.append(read_only)
        return real(path, read_only=read_only, **kwargs)

    monkeypatch.setattr(catalog_module.duckdb, "connect", counting)
    return opened


def _other_process_reads(path) -> int:
    """Open the file from another process (fails while this one holds it for writing)."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM units").fetchone()[0]
    finally:
        con.close()


def test_held_shares_one_connection_and_released_lets_others_in(tmp_path, monkeypatch):
    path = tmp_path / "c.duckdb"
    Catalog(path).init()
    opened = _count_opens(monkeypatch)
    with Catalog(path, timeout_s=1).held():
        assert opened == []  # opened by the first use, not by `held`
        Catalog(path).rows("SELECT 1")  # another Catalog of the same file: the same connection
        plan = PlanRow("extract", "fp", "1", "{}", "{}", None, 0)
        Catalog(path).query_plans("SELECT count(*) FROM stages", [plan], [], arrow=False)
        with Catalog(path).held():  # nested: still the same
            Catalog(path).units("extract", "fp")
        assert opened == [False]
        with Catalog(path).released():  # closed: another process can open the file
            with mp.get_context("spawn").Pool(1) as pool:
                assert pool.apply(_other_process_reads, (str(path),)) == 0
            Catalog(path).rows("SELECT 1")  # a short (read-only) connection of its own
        assert opened == [False, True]
        # query_plans' temporary `stages` view is gone: the stored table is seen again
        Catalog(path).save_plan("extract", "fp", META, [("shard-00000", {})])
        assert Catalog(path).rows("SELECT stage FROM stages") == [("extract",)]
    assert opened == [False, True, False]  # reopened once after `released`
    with mp.get_context("spawn").Pool(1) as pool:  # closed at the end of the block
        assert pool.apply(_other_process_reads, (str(path),)) == 1


def test_init_leaves_a_current_catalog_unwritten(tmp_path):
    path = tmp_path / "c.duckdb"
    catalog = Catalog(path)
    catalog.init()
    with catalog.transaction() as con:  # a view changed by hand is redone only if views.sql is
        con.execute("CREATE OR REPLACE VIEW stage_summary AS SELECT 1 AS x")
    before = path.stat().st_mtime_ns, path.stat().st_size
    catalog.init()
    assert (path.stat().st_mtime_ns, path.stat().st_size) == before
    assert catalog.rows("SELECT * FROM stage_summary") == [(1,)]
    with catalog.transaction() as con:  # a catalog from another views.sql: init redoes them
        con.execute("COMMENT ON TABLE schema_version IS 'older'")
    catalog.init()
    assert catalog.rows("SELECT count(*) FROM stage_summary WHERE false") == [(0,)]
    assert "x" not in [c[0] for c in catalog.rows("DESCRIBE stage_summary")]
