"""The DuckDB catalog: what was planned, run and written, in one file per run directory.

DuckDB lets one process hold a database file for writing at a time, so every access here is
a short transaction on a connection that is opened, used and closed at once. A process that
finds the file locked retries with jittered backoff for up to `run.catalog_timeout_s`. Only
the driver (`run`, `status`, `reset`, `sql`, `plan`) opens the catalog: workers write unit
records beside their artifacts and the driver ingests them (`ingest`). See docs/resume.md
and docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb

from pipeline.records import PlanRow, UnitRow, ViewSpec

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CATALOG_FILE = "catalog.duckdb"


class CatalogBusy(RuntimeError):
    """The catalog stayed locked by other processes for longer than the timeout."""


_IDENT = (("stage", "string"), ("unit_key", "string"), ("fingerprint", "string"))
# The columns of the catalog's per-unit child tables (arrow type names; pyarrow loads only
# when records are ingested, so `fsr-pipe status` with nothing new starts without it).
_ARTIFACTS = (*_IDENT, ("kind", "string"), ("path", "string"), ("rows", "int64"),
              ("bytes", "int64"), ("sha256", "string"))
_FAILURES = (*_IDENT, ("item_kind", "string"), ("item_id", "int64"), ("path", "string"),
             ("reason", "string"))
_METRICS = (*_IDENT, ("name", "string"), ("value", "float64"), ("labels_json", "string"))


def _unit_children(records: Sequence[Any], columns: tuple[tuple[str, str], ...],
                   items: Any) -> Any:
    """An Arrow table of `columns`: the (stage, unit_key, fingerprint) of each record, then
    the fields of each of its `items(record)` (artifacts, failures, metrics)."""
    import pyarrow as pa

    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in columns])
    return pa.Table.from_pylist(
        [{"stage": r.stage, "unit_key": r.unit_key, "fingerprint": r.fingerprint, **fields}
         for r in records for fields in items(r)], schema=schema)


def _read_sql(name: str) -> str:
    return resources.files("catalogs").joinpath(name).read_text()


def _is_lock_error(exc: duckdb.Error) -> bool:
    text = str(exc)
    return "lock" in text.lower() and ("Conflicting" in text or "Could not set" in text)


# What the OS says when the file system cannot lock files at all (NFS without lockd, some
# FUSE mounts): waiting does not help, so say so at once.
_NO_LOCKS = ("Operation not supported", "No locks available", "Function not implemented")


def _no_lock_support(exc: duckdb.Error) -> bool:
    return any(text in str(exc) for text in _NO_LOCKS)


class _Held:
    """A `held` block's connection (opened by its first use) and whether a `released` block
    has closed it for the moment."""

    def __init__(self) -> None:
        self.con: duckdb.DuckDBPyConnection | None = None
        self.released = False


# The catalog files held by the running code, by path: every Catalog of a held file shares
# its connection (`fsr-pipe run`'s runner and its result tables are separate calls).
# Per thread and context: another thread opens its own connections.
_HELD: contextvars.ContextVar[dict[Path, _Held] | None] = contextvars.ContextVar(
    "fsr_pipe_catalog_held", default=None)


def _sql_string(text: str) -> str:
    # DDL (CREATE VIEW) cannot take `?` parameters, so file paths are quoted here.
    return "'" + text.replace("'", "''") + "'"


class Catalog:
    """Access to `<work_dir>/catalog.duckdb` through short, retried transactions."""

    def __init__(self, path: str | Path, timeout_s: float = 300.0) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s

    @classmethod
    def in_dir(cls, work_dir: str | Path, timeout_s: float = 300.0) -> Catalog:
        return cls(Path(work_dir) / CATALOG_FILE, timeout_s)

    # -- connections -------------------------------------------------------------------------

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """One read-write connection for the whole block, opened by its first use, which every
        call in it reuses (of any Catalog of this file, in this thread).

        Opening the database costs 10-20 ms, and a no-op `fsr-pipe run all` makes dozens of
        small reads: held, it opens once. Other processes wait while it is open (one writer
        per file), so hold it around short catalog work only; around units that run, the
        runner `released` it."""
        held = _HELD.get() or {}
        if self.path in held:  # nested: the outer block holds it
            yield
            return
        slot = _Held()
        token = _HELD.set({**held, self.path: slot})
        try:
            yield
        finally:
            _HELD.reset(token)
            if slot.con is not None:
                slot.con.close()

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Inside a `held` block: close its connection for this block (units run here, and
        other processes may need the file); the next use after the block opens it again."""
        slot = (_HELD.get() or {}).get(self.path)
        if slot is None or slot.released:
            yield
            return
        if slot.con is not None:
            slot.con.close()
            slot.con = None
        slot.released = True
        try:
            yield
        finally:
            slot.released = False

    def _held_slot(self) -> _Held | None:
        slot = (_HELD.get() or {}).get(self.path)
        return None if slot is None or slot.released else slot

    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection held only for the `with` block (or the one `held` keeps open);
        waits while another process holds the file."""
        if (slot := self._held_slot()) is not None:
            if slot.con is None:
                slot.con = self._open(read_only=False)
            yield slot.con
            return
        con = self._open(read_only)
        try:
            yield con
        finally:
            con.close()

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        if read_only and not self.path.exists():
            raise FileNotFoundError(
                f"no catalog at {self.path}; run `fsr-pipe run all` first (or check run.work_dir)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timeout_s
        delay = 0.01
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.Error as exc:
                if _no_lock_support(exc):
                    raise CatalogBusy(
                        f"catalog {self.path}: its file system does not support file locks "
                        f"({exc}); DuckDB needs them. Put run.work_dir on a local disk or a "
                        "file system with locking; workers on other machines never open the "
                        "catalog (docs/distributed.md)"
                    ) from exc
                if not _is_lock_error(exc):
                    raise
                if time.monotonic() > deadline:
                    raise CatalogBusy(
                        f"catalog {self.path} stayed locked for {self.timeout_s:.0f}s by another "
                        "process; wait for it or raise run.catalog_timeout_s"
                    ) from exc
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = (), read_only: bool = True) -> Any:
        """Run one statement; returns a pyarrow Table of the result."""
        with self.connect(read_only=read_only) as con:
            return _to_arrow(con.sql(sql, params=list(params) or None))

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.connect(read_only=self.path.exists()) as con:
            return con.execute(sql, list(params)).fetchall()

    # -- schema ------------------------------------------------------------------------------

    def init(self) -> None:
        """Create tables and views if missing (idempotent); refuse a newer schema.

        A catalog made by the same schema.sql and views.sql (their hash is the comment on
        `schema_version`) is left as it is: re-creating every view is a write, and a
        database written to checkpoints when it closes (~25 ms of each no-op run)."""
        files = _read_sql("schema.sql"), _read_sql("views.sql")
        made_by = hashlib.sha256("\0".join(files).encode()).hexdigest()
        with self.connect() as con:
            found = con.execute("SELECT comment FROM duckdb_tables() WHERE table_name = "
                                "'schema_version' AND schema_name = 'main'").fetchall()
            if found == [(made_by,)] and con.execute(
                    "SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION:
                return
        with self.transaction() as con:
            con.execute(files[0])
            found = con.execute("SELECT max(version) FROM schema_version").fetchone()[0]
            if found is None:
                con.execute(
                    "INSERT INTO schema_version VALUES (?, current_timestamp)", [SCHEMA_VERSION]
                )
            elif found > SCHEMA_VERSION:
                raise RuntimeError(
                    f"catalog {self.path} has schema v{found}, newer than this fsr-pipe "
                    f"(v{SCHEMA_VERSION}); upgrade fsr-pipe or use another run.work_dir"
                )
            con.execute(files[1])
            con.execute(f"COMMENT ON TABLE schema_version IS {_sql_string(made_by)}")

    # -- plans -------------------------------------------------------------------------------

    def current_fingerprint(self, stage: str) -> str | None:
        rows = self.rows("SELECT fingerprint FROM stages WHERE stage = ?", [stage])
        return rows[0][0] if rows else None

    def plan_marks(self) -> tuple[dict[str, str], set[tuple[str, str]]]:
        """(stage -> its current plan's fingerprint, the (stage, fingerprint) plans with bad
        inputs), from one query."""
        current, with_failures = {}, set()
        for kind, stage, fingerprint in self.rows(
                "SELECT 'failures', stage, fingerprint FROM (SELECT DISTINCT stage, fingerprint "
                "FROM item_failures) UNION ALL SELECT 'current', stage, fingerprint FROM stages"):
            if kind == "failures":
                with_failures.add((stage, fingerprint))
            else:
                current[stage] = fingerprint
        return current, with_failures

    def units(self, stage: str, fingerprint: str) -> list[UnitRow]:
        return self.units_of([(stage, fingerprint)]).get(stage, [])

    def units_of(self, plans: Sequence[tuple[str, str]]) -> dict[str, list[UnitRow]]:
        """units() of several (stage, fingerprint) plans, by stage, from one query."""
        if not plans:
            return {}
        pairs = ", ".join("(?, ?)" for _ in plans)
        found: dict[str, list[UnitRow]] = {}
        for r in self.rows(
                "SELECT stage, unit_key, fingerprint, status, params_json, host, pid, attempts "
                f"FROM units WHERE (stage, fingerprint) IN ({pairs}) ORDER BY stage, unit_key",
                [v for plan in plans for v in plan]):
            found.setdefault(r[0], []).append(
                UnitRow(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7]))
        return found

    def save_plan(
        self,
        stage: str,
        fingerprint: str,
        meta: dict[str, Any],
        units: Sequence[tuple[str, dict[str, Any]]],
    ) -> None:
        """Make (stage, fingerprint) the current plan; its units are inserted only once."""
        with self.transaction() as con:
            con.execute("DELETE FROM stages WHERE stage = ?", [stage])
            con.execute(
                "INSERT INTO stages (stage, fingerprint, code_version, config_json, inputs_json, "
                "notes, planned_at, position) VALUES (?, ?, ?, ?, ?, ?, current_timestamp, ?)",
                [stage, fingerprint, meta["code_version"], json.dumps(meta["config"]),
                 json.dumps(meta["inputs"]), meta.get("notes"), meta.get("position")],
            )
            planned = con.execute(
                "SELECT count(*) FROM units WHERE stage = ? AND fingerprint = ?",
                [stage, fingerprint],
            ).fetchone()[0]
            if planned or not units:  # another process planned first (its plan stands);
                return                    # or nothing to do (train with no trained method)
            con.executemany(
                "INSERT INTO units (stage, unit_key, fingerprint, status, params_json) "
                "VALUES (?, ?, ?, 'pending', ?)",
                [[stage, key, fingerprint, json.dumps(params)] for key, params in units],
            )

    # -- unit lifecycle ----------------------------------------------------------------------

    def ingest(self, records: Sequence[Any], work_dir: Path, batch: int = 5000) -> int:
        """Copy unit records (pipeline.records.UnitRecord, already checked) into the catalog,
        `batch` units per transaction: a done unit's artifacts, bad inputs and metrics replace
        what an earlier attempt recorded, then its row becomes done (failed records update the
        row only). Repeatable: ingesting a record twice leaves the same rows. Returns units."""
        import pyarrow as pa

        for start in range(0, len(records), batch):
            chunk = records[start:start + batch]
            units = pa.table({
                "stage": [r.stage for r in chunk], "unit_key": [r.unit_key for r in chunk],
                "fingerprint": [r.fingerprint for r in chunk],
                "status": [r.status for r in chunk],
                "attempts": pa.array([r.attempt for r in chunk], pa.int32()),
                "host": [r.host for r in chunk], "pid": pa.array([r.pid for r in chunk],
                                                                pa.int32()),
                "started_at": pa.array([r.started_at for r in chunk], pa.float64()),
                "finished_at": pa.array([r.finished_at for r in chunk], pa.float64()),
                "seconds": pa.array([r.seconds for r in chunk], pa.float64()),
                "rows": pa.array([r.rows for r in chunk], pa.int64()),
                "error": pa.array([r.error and r.error[:4000] for r in chunk], pa.string()),
            })
            done = [r for r in chunk if r.status == "done"]
            artifacts = _unit_children(done, _ARTIFACTS, lambda r: (
                {"kind": a.kind, "path": str(work_dir / a.path), "rows": a.rows,
                 "bytes": a.bytes, "sha256": a.sha256} for a in r.artifacts))
            failures = _unit_children(done, _FAILURES, lambda r: map(dataclasses.asdict,
                                                                     r.failures))
            metrics = _unit_children(done, _METRICS, lambda r: (
                {"name": m.name, "value": m.value,
                 "labels_json": json.dumps(m.labels, sort_keys=True)} for m in r.metrics))
            with self.transaction() as con:
                con.register("new_units", units)
                con.register("new_artifacts", artifacts)
                con.register("new_failures", failures)
                con.register("new_metrics", metrics)
                for table in ("artifacts", "item_failures", "metrics"):
                    con.execute(
                        f"DELETE FROM {table} t USING new_units n WHERE n.status = 'done' AND "
                        "t.stage = n.stage AND t.unit_key = n.unit_key AND "
                        "t.fingerprint = n.fingerprint")
                con.execute("INSERT INTO artifacts SELECT *, current_timestamp FROM new_artifacts")
                con.execute("INSERT INTO item_failures SELECT *, current_timestamp "
                            "FROM new_failures")
                con.execute("INSERT INTO metrics SELECT *, current_timestamp FROM new_metrics")
                con.execute(
                    "UPDATE units SET status = n.status, attempts = n.attempts, host = n.host, "
                    "pid = n.pid, started_at = make_timestamp((n.started_at * 1e6)::BIGINT), "
                    "finished_at = make_timestamp((n.finished_at * 1e6)::BIGINT), "
                    "seconds = n.seconds, rows = CASE WHEN n.status = 'done' THEN n.rows "
                    "ELSE units.rows END, error = n.error FROM new_units n "
                    "WHERE units.stage = n.stage AND units.unit_key = n.unit_key AND "
                    "units.fingerprint = n.fingerprint")
                for name in ("new_units", "new_artifacts", "new_failures", "new_metrics"):
                    con.unregister(name)
        return len(records)

    def unit_status(self, stage: str, fingerprint: str) -> dict[str, str]:
        """unit key -> status of a stage's plan."""
        return dict(self.rows("SELECT unit_key, status FROM units WHERE stage = ? AND "
                              "fingerprint = ?", [stage, fingerprint]))

    def reset(self, stages: Sequence[str]) -> None:
        """Forget everything recorded for these stages (all fingerprints)."""
        with self.transaction() as con:
            for table in ("stages", "units", "artifacts", "item_failures", "metrics"):
                con.executemany(f"DELETE FROM {table} WHERE stage = ?", [[s] for s in stages])

    # -- reads used by stages ----------------------------------------------------------------

    def artifact_paths(self, stage: str, fingerprint: str, kind: str,
                       unit_key: str | None = None) -> list[str]:
        """Files of one kind written by a stage's plan (optionally by one of its units)."""
        rows = self.rows(
            "SELECT path FROM artifacts WHERE stage = ? AND fingerprint = ? AND kind = ? "
            "AND (? IS NULL OR unit_key = ?) ORDER BY unit_key, path",
            [stage, fingerprint, kind, unit_key, unit_key],
        )
        return [r[0] for r in rows]

    def artifact_rows(self, stage: str, fingerprint: str, kind: str) -> list[tuple[str, str, int]]:
        """(unit_key, path, rows) of the files of one kind a stage's plan wrote, in unit order."""
        return [tuple(r) for r in self.rows(
            "SELECT unit_key, path, coalesce(rows, 0) FROM artifacts WHERE stage = ? AND "
            "fingerprint = ? AND kind = ? ORDER BY unit_key, path", [stage, fingerprint, kind])]

    def failed_items(self, stage: str, fingerprint: str, item_kind: str) -> set[int]:
        rows = self.rows(
            "SELECT item_id FROM item_failures WHERE stage = ? AND fingerprint = ? "
            "AND item_kind = ? AND item_id IS NOT NULL",
            [stage, fingerprint, item_kind],
        )
        return {r[0] for r in rows}

    def failure_counts(self, stage: str, fingerprint: str,
                       good_metric: str) -> list[tuple[str, int, int]]:
        """(item kind, bad items, good items) per kind with bad items, over the done units of
        a stage's plan. Good items are the `good_metric` metrics labelled with the kind; units
        that recorded none count their `rows`."""
        bad = self.rows(
            "SELECT item_kind, count(*) FROM item_failures WHERE stage = ? AND fingerprint = ? "
            "GROUP BY item_kind ORDER BY item_kind", [stage, fingerprint])
        if not bad:
            return []
        counted = self.rows(
            "SELECT json_extract_string(m.labels_json, '$.item_kind'), sum(m.value) "
            "FROM metrics m JOIN units u USING (stage, unit_key, fingerprint) "
            "WHERE m.name = ? AND u.stage = ? AND u.fingerprint = ? AND u.status = 'done' "
            "GROUP BY 1", [good_metric, stage, fingerprint])
        good = {kind: int(n) for kind, n in counted}
        rows = self.rows(
            "SELECT coalesce(sum(u.rows), 0) FROM units u WHERE u.stage = ? AND "
            "u.fingerprint = ? AND u.status = 'done' AND NOT EXISTS (SELECT 1 FROM metrics m "
            "WHERE (m.stage, m.unit_key, m.fingerprint) = (u.stage, u.unit_key, u.fingerprint) "
            "AND m.name = ?)", [stage, fingerprint, good_metric])[0][0]
        return [(kind, int(n), good.get(kind, 0) + int(rows)) for kind, n in bad]

    # -- views -------------------------------------------------------------------------------

    def refresh_views(self, specs: Sequence[ViewSpec]) -> None:
        """(Re)create each artifact view over the done files of its stage's current plan."""
        with self.transaction() as con:
            for spec, body in zip(specs, _view_bodies(con, specs)):
                con.execute(f"CREATE OR REPLACE VIEW {spec.name} AS {body}")

    def query_plans(self, sql: str | Sequence[str], plans: Sequence[PlanRow],
                    specs: Sequence[ViewSpec], arrow: bool = True) -> Any:
        """Run `sql` read-only as if `plans` were the current plans: an Arrow table, or with
        arrow=False (column names, rows as tuples), which needs no pyarrow. A list of
        queries: a list of results, from one connection.

        Temporary views named `stages` and after every spec shadow the stored ones for this
        connection only, so the views of views.sql and the artifact views all follow `plans`
        (the config a user passes to `fsr-pipe sql`), not the plans of the last run. Only the
        artifact views `sql` names are made: each reads its Parquet files' schemas (the views
        of views.sql read tables, never artifact views).
        """
        # In a `held` block its (read-write) connection, the temporary views dropped after, as
        # they would shadow `stages` for the rest of the block; else a read-only connection.
        queries = [sql] if isinstance(sql, str) else list(sql)
        named = [spec for spec in specs if any(
            re.search(rf"\b{re.escape(spec.name)}\b", q, re.IGNORECASE) for q in queries)]
        with self.connect(read_only=True) as con:
            try:
                results = self._query_plans(con, queries, plans, named, arrow)
            finally:
                if self._held_slot() is not None:
                    for name in ["stages", *(spec.name for spec in named)]:
                        con.execute(f"DROP VIEW IF EXISTS temp.main.{name}")
        return results[0] if isinstance(sql, str) else results

    def _query_plans(self, con: duckdb.DuckDBPyConnection, queries: list[str],
                     plans: Sequence[PlanRow], named: Sequence[ViewSpec],
                     arrow: bool) -> list[Any]:
        rows = ", ".join("(" + ", ".join(
            str(int(v)) if isinstance(v, int) else _sql_string(v) if v is not None
            else "NULL::INTEGER" if f.name == "position" else "NULL::VARCHAR"
            for f, v in zip(dataclasses.fields(p), dataclasses.astuple(p))) + ")"
            for p in plans)
        db = '"' + con.execute("SELECT current_database()").fetchone()[0] + '"'
        con.execute(
            "CREATE TEMP VIEW stages AS SELECT p.stage, p.fingerprint, p.code_version, "
            "p.config_json, p.inputs_json, p.notes, s.planned_at, p.position FROM (VALUES "
            f"{rows}) p(stage, fingerprint, code_version, config_json, inputs_json, notes, "
            "position) "
            f"LEFT JOIN {db}.main.stages s USING (stage, fingerprint) WHERE EXISTS (SELECT 1 "
            f"FROM {db}.main.units u WHERE u.stage = p.stage AND u.fingerprint = p.fingerprint)"
        )
        for spec, body in zip(named, _view_bodies(con, named)):
            con.execute(f"CREATE TEMP VIEW {spec.name} AS {body}")
        results = []
        for query in queries:
            relation = con.sql(query)
            if relation is None:  # a statement that returns nothing
                raise duckdb.InvalidInputException(f"not a query (it returns no rows): {query}")
            results.append(_to_arrow(relation) if arrow
                           else (relation.columns, relation.fetchall()))
        return results


def _view_bodies(con: duckdb.DuckDBPyConnection, specs: Sequence[ViewSpec]) -> list[str]:
    """Per spec, a SELECT over the done files of its kind in the plan that `stages` names (an
    empty but typed result while there are none, so the view always binds). One query for
    all of them: each costs milliseconds, and `fsr-pipe sql` makes a view per spec."""
    wanted = sorted({(spec.stage, spec.kind) for spec in specs})
    paths: dict[tuple[str, str], list[str]] = {key: [] for key in wanted}
    if wanted:
        pairs = ", ".join("(?, ?)" for _ in wanted)
        for stage, kind, path in con.execute(
                "SELECT a.stage, a.kind, a.path FROM artifacts a JOIN stages s "
                "ON a.stage = s.stage AND a.fingerprint = s.fingerprint "
                f"WHERE (a.stage, a.kind) IN ({pairs}) ORDER BY a.unit_key, a.path",
                [v for key in wanted for v in key]).fetchall():
            paths[(stage, kind)].append(path)
    return [_view_body(spec, paths[(spec.stage, spec.kind)]) for spec in specs]


def _view_body(spec: ViewSpec, paths: list[str]) -> str:
    if paths:
        files = "[" + ", ".join(_sql_string(p) for p in paths) + "]"
        return f"SELECT * FROM read_parquet({files})"
    nulls = ", ".join(
        f"CAST(NULL AS {col.split(maxsplit=1)[1]}) AS {col.split()[0]}"
        for col in spec.empty_columns.split(",")
    )
    return f"SELECT {nulls} WHERE false"


def _to_arrow(relation: duckdb.DuckDBPyRelation) -> Any:
    # duckdb 2 renamed Relation.arrow() to to_arrow_table().
    to_table = getattr(relation, "to_arrow_table", None) or relation.arrow
    return to_table()
