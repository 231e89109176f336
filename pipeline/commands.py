"""What the CLI commands do, as plain functions (the CLI only parses and prints).

Each takes the pipeline's stages as a factory (`stages.all_stages` for fsr-pipe): this module
knows what a stage is, not which stages there are, and the jobs it makes name the factory so
that every worker builds the same ones (pipeline.stage.factory_name)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.catalog import Catalog
from pipeline.config import Config
from pipeline.leases import read_lease, read_leases
from pipeline.plans import (
    downstream,
    failure_summary,
    fingerprints,
    ingest_records,
    plan_rows,
    too_many_failures,
)
from pipeline.records import UnitRecord, read_record
from pipeline.stage import PipelineError, StageFactory, factory_name, shard_key

# The runner, jobs and workers load with `run`, `plan` and `stage`: status, sql and reset
# need none of them (docs/benchmarks.md, CLI start-up).

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.runner import StageReport

log = logging.getLogger(__name__)


def held(config: Config) -> contextlib.AbstractContextManager[None]:
    """One catalog connection for the several calls of a command (Catalog.held): opened by
    the first that needs it, closed at the end and while units run."""
    return Catalog.in_dir(config.work_dir, config.run.catalog_timeout_s).held()


def run(factory: StageFactory, config: Config, targets: list[str],
        progress: bool | None = None, plan_only: bool = False) -> list[StageReport]:
    """Run stages (`all` = every stage) on run.executor; returns what each stage did.
    plan_only: plan the targets and write their plan files for workers, run nothing."""
    names = [s.name for s in factory()] if targets == ["all"] else targets
    if plan_only and "all" in targets:
        raise PipelineError("`fsr-pipe plan` plans one stage whose inputs are complete; "
                            "`fsr-pipe run all` runs every stage")
    from pipeline.progress import ProgressBoard
    from pipeline.runner import Runner

    with ProgressBoard(progress) as board:
        return Runner(config, factory, board).run(names, plan_only=plan_only)


def work(factory: StageFactory, config: Config, stage: str, shard: int | None = None,
         progress: bool | None = None) -> list[UnitRecord]:
    """`fsr-pipe stage X [--shard N]`: run the stage's units (or one) as a worker: from its
    plan file, writing records, never opening the catalog. Units with a done record or a
    live lease are skipped. Returns the records written."""
    from pipeline.jobs import Job, PlanMissing, plan_path, read_plan
    from pipeline.progress import ProgressBoard
    from pipeline.worker import run_job

    stages = {s.name: s for s in factory()}
    if stage == "all":
        raise PipelineError("`fsr-pipe stage` runs one stage (or one shard of it); "
                            "`fsr-pipe run all` runs every stage")
    if stage not in stages:
        raise PipelineError(f"unknown stage(s) {[stage]}; stages: {list(stages)}")
    fp = fingerprints(list(stages.values()), config)[stage]
    path = plan_path(config.work_dir, stage, fp)
    try:
        plan = read_plan(str(path))
    except PlanMissing:
        raise PipelineError(
            f"stage {stage} has no plan for this config yet ({path} is missing). Workers run "
            f"from the plan the driver writes: run `fsr-pipe plan {stage}` once (its inputs "
            f"must be complete), or `fsr-pipe run {stage}`") from None
    keys = [key for key, _ in plan.units]
    wanted = plan.units
    if shard is not None:
        wanted = [(k, p) for k, p in plan.units if k == shard_key(shard)]
        if not wanted:
            if not any(k.startswith("shard-") for k in keys):
                raise PipelineError(f"stage {stage} is not sharded (its unit: "
                                    f"{', '.join(keys)}); run it without --shard")
            raise PipelineError(
                f"stage {stage} has no unit {shard_key(shard)}; its units: "
                f"{keys[:3]}{' ...' if len(keys) > 3 else ''} ({len(keys)} in all)")
    stages[stage].check(config)
    out_dir = config.work_dir / stage / fp
    written = []
    with ProgressBoard(progress) as board:
        for key, params in wanted:  # one unit's files each: an array task reads no others
            record = read_record(out_dir, key)
            if record is not None and record.status == "done":
                continue
            lease = read_lease(out_dir, key)
            if lease and lease.state(config.run.lease_s) == "alive":
                log.warning("%s %s: skipped, %s (pid %d) runs it", stage, key, lease.host,
                            lease.pid)
                continue
            job = Job.of(config, path, key, params, stage, fp, factory_name(factory))
            written.append(run_job(job, board.task))
    return written


@dataclass
class StageStatus:
    stage: str
    fingerprint: str
    planned: bool
    done: int = 0
    pending: int = 0
    running: int = 0
    lost: int = 0
    failed: int = 0
    stale: int = 0
    ingested: int = 0  # done records this call found and ingested (workers' finished units)
    rows: int = 0
    seconds: float = 0.0
    notes: str | None = None
    running_on: list[str] = field(default_factory=list)  # "shard-00003 on host (since ...)"

    def note(self, text: str) -> None:
        self.notes = f"{self.notes}; {text}" if self.notes else text


def status(factory: StageFactory, config: Config) -> list[StageStatus]:
    """Per stage, the state of its plan under the current config (stale = older plans).
    Ingests the records workers wrote since the driver last did (the driver's job)."""
    catalog = Catalog.in_dir(config.work_dir, config.run.catalog_timeout_s)
    stages = factory()
    expected = fingerprints(stages, config)
    if not catalog.path.exists():
        return [StageStatus(s.name, expected[s.name], False, notes=s.notes(config))
                for s in stages]
    with catalog.held():  # one connection for its ~20 small reads
        return _status(catalog, stages, expected, config)


def _units_by_plan(catalog: Catalog) -> dict[tuple[str, str], list[tuple]]:
    """(stage, fingerprint) -> (unit key, status, rows, seconds) of every unit in the catalog."""
    units: dict[tuple[str, str], list[tuple]] = {}
    for name, fp, key, state, rows, seconds in catalog.rows(
            "SELECT stage, fingerprint, unit_key, status, rows, seconds FROM units"):
        units.setdefault((name, fp), []).append((key, state, rows, seconds))
    return units


def _current_units(units: dict[tuple[str, str], list[tuple]],
                   expected: dict[str, str]) -> dict[str, dict[str, str]]:
    """stage -> unit key -> status of the plans `expected` names (stages with units only)."""
    return {name: {key: state for key, state, *_ in units[(name, fp)]}
            for name, fp in expected.items() if (name, fp) in units}


def _status(catalog: Catalog, stages: list, expected: dict[str, str],
            config: Config) -> list[StageStatus]:
    # Two queries for all stages (units, plan_marks), not a few per stage: each costs
    # milliseconds, and the first aggregate a process runs ~5 ms more than a plain scan
    # (counted here instead).
    units = _units_by_plan(catalog)
    known = _current_units(units, expected)  # stage -> unit key -> status
    new = {s.name: ingest_records(catalog, s.name, expected[s.name], config.work_dir,
                                  status=known[s.name])
           for s in stages if s.name in known}
    if fresh := [v for s in stages if new.get(s.name) for v in s.views]:
        catalog.refresh_views(fresh)  # a plain duckdb client sees the workers' files too
    if any(new.values()):  # records just ingested changed some states
        units = _units_by_plan(catalog)
        known = _current_units(units, expected)
    # A plan with no units (train when no configured method trains) is only in `stages`.
    current, with_failures = catalog.plan_marks()
    result = []
    for stage in stages:
        st = StageStatus(stage.name, expected[stage.name],
                         current.get(stage.name) == expected[stage.name],
                         notes=stage.notes(config), ingested=new.get(stage.name, 0))
        for (name, fp), rows in units.items():
            if name != stage.name:
                continue
            if fp != st.fingerprint:
                st.stale += len(rows)
                continue
            for _, state, n, seconds in rows:
                st.planned = True
                setattr(st, state, getattr(st, state) + 1)
                st.rows += n or 0
                st.seconds += seconds or 0.0
        if st.planned and st.done and (stage.name, st.fingerprint) in with_failures and (
                excess := too_many_failures(catalog, stage.name, st.fingerprint,
                                            config.data.max_failure_ratio)):
            st.note(f"{failure_summary(*excess, config.data.max_failure_ratio)}: stages "
                    "after it do not run (see failures_by_reason)")
        states = {key: state for key, state in known.get(stage.name, {}).items()
                  if state != "done"}
        leases = read_leases(config.work_dir / stage.name / st.fingerprint) if states else {}
        for key in sorted(set(states) & set(leases)):
            lease = leases[key]
            setattr(st, states[key], getattr(st, states[key]) - 1)  # pending or failed
            if lease.state(config.run.lease_s) == "alive":
                st.running += 1
                st.running_on.append(f"{key} on {lease.host} pid {lease.pid} since "
                                     f"{time.strftime('%H:%M:%S', time.localtime(lease.since))}")
            else:
                st.lost += 1
        if st.lost:
            st.note(f"{st.lost} unit(s) lost (their worker died or stopped heartbeating); "
                    "the next run redoes them")
        result.append(st)
    return result


def query(factory: StageFactory, config: Config, text: str | None = None,
          image: str | None = None, method: str | None = None, k: int = 10,
          fusion: str = "softmax-max") -> tuple[str, list[dict]]:
    """`fsr-pipe query --text/--image`: (the method queried, its top-k rows: rank, image_id,
    path, class, score) from the finished run of `config` (pipeline/query.py)."""
    from pipeline.query import (
        Query,
        check_fusion,
        check_method,
        check_query,
        open_searcher,
        search_one,
    )

    method, fusion = check_method(config, method), check_fusion(fusion)
    q = Query(text, image)
    check_query(q)  # before loading anything
    searcher = open_searcher(factory, config, method, k)
    return method, search_one(searcher, q, fusion)


def query_file(factory: StageFactory, config: Config, path: str | Path,
               out: str | Path | None = None, method: str | None = None, k: int = 10,
               fusion: str = "softmax-max", progress: bool | None = None):  # noqa: ANN201
    """`fsr-pipe query --queries FILE`: every row's top k into a Parquet file (BatchReport)."""
    from pipeline.progress import ProgressBoard
    from pipeline.query import check_fusion, check_method, open_searcher, query_columns, search_file

    method, fusion = check_method(config, method), check_fusion(fusion)
    query_columns(path)  # the file's errors before the model loads
    searcher = open_searcher(factory, config, method, k)
    with ProgressBoard(progress) as board:
        return search_file(searcher, path, out, fusion, board.task)


def reset(factory: StageFactory, config: Config, stage: str) -> list[str]:
    """Forget a stage and everything after it, and delete their files; returns their names."""
    stages = factory()
    if stage not in (names := [s.name for s in stages]):
        raise PipelineError(f"unknown stage {stage!r}; stages: {names}")
    names = [s.name for s in downstream(stages, stage)]
    busy = []
    for name in names:
        folder = config.work_dir / name
        for plan_dir in sorted(folder.iterdir()) if folder.is_dir() else []:
            for key, lease in sorted(read_leases(plan_dir).items()):
                if lease.state(config.run.lease_s) == "alive":
                    busy.append(f"{name} {key} ({lease.host} pid {lease.pid})")
    if busy:
        raise PipelineError(
            f"cannot reset {stage}: {len(busy)} unit(s) are being run by live workers: "
            f"{', '.join(busy[:3])}{' ...' if len(busy) > 3 else ''}; stop them (or let them "
            f"finish) first; a worker that stopped heartbeating counts as lost after "
            f"run.lease_s = {config.run.lease_s:g} s")
    catalog = Catalog.in_dir(config.work_dir, config.run.catalog_timeout_s)
    if catalog.path.exists():
        catalog.reset(names)
        catalog.init()
        catalog.refresh_views([v for s in stages for v in s.views])
    for name in names:
        shutil.rmtree(config.work_dir / name, ignore_errors=True)
    return names


def sql(factory: StageFactory, config: Config, query: str | list[str],
        arrow: bool = True, fingerprints: dict[str, str] | None = None,
        ) -> pa.Table | tuple[list[str], list[tuple]] | list:
    """Run a query against the run's catalog (read-only), its `stages` table and views showing
    the plans of `config` (not those of whichever config ran last). arrow=False: (column
    names, rows), without loading pyarrow (`fsr-pipe sql` printing a table). A list of
    queries: a list of results (one connection). `fingerprints`: every stage's, when known."""
    catalog = Catalog.in_dir(config.work_dir, config.run.catalog_timeout_s)
    stages = factory()
    views = [v for s in stages for v in s.views]
    return catalog.query_plans(query, plan_rows(stages, config, fingerprints), views,
                               arrow=arrow)


def recall_sql(config: Config) -> str:
    """The Recall@K table `fsr-pipe run all` prints: a column per configured method."""
    columns = "".join(f"max(value) FILTER (WHERE method = '{name}') AS {name}, "
                      for name in config.score.methods)
    return ("SELECT protocol, style, fusion, k, " + columns + "max(n_queries) AS queries "
            "FROM retrieval_metrics WHERE metric = 'recall' GROUP BY ALL "
            "ORDER BY protocol DESC, style, fusion, k")


def score_finished(factory: StageFactory, config: Config) -> bool:
    """Every unit of the score stage's current plan is done (its results can be read)."""
    return any(st.stage == "score" and st.planned and st.done and not st.pending
               and not st.failed and not st.running for st in status(factory, config))


def recall_table(factory: StageFactory, config: Config) -> list[dict] | None:
    """recall_sql's rows, or None when the score stage has not finished for this config."""
    if not score_finished(factory, config):
        return None
    return _dicts(sql(factory, config, recall_sql(config), arrow=False))


def result_tables(factory: StageFactory, config: Config, finished: bool = False,
                  fingerprints: dict[str, str] | None = None,
                  ) -> tuple[list[dict], list[dict]] | None:
    """(recall_table, paired_table) from one connection, what `run` prints at its end; None
    when the score stage has not finished for this config. finished: the caller knows it has
    (a run that just completed it), so the status check is skipped. `fingerprints`: every
    stage's, when the caller has them (the run's reports)."""
    if not (finished or score_finished(factory, config)):
        return None
    recall, paired = sql(factory, config, [recall_sql(config), paired_sql(config)],
                         arrow=False, fingerprints=fingerprints)
    return _dicts(recall), with_pooled_and_p(_dicts(paired))


def _dicts(result: tuple[list[str], list[tuple]]) -> list[dict]:
    """(column names, rows) as one dict per row (the tables printed without pyarrow)."""
    names, rows = result
    return [dict(zip(names, row)) for row in rows]


def report(factory: StageFactory, config: Config, out: Path | None = None,
           if_stale: bool = False, fingerprints: dict[str, str] | None = None,
           ) -> tuple[Path, bool]:
    """`fsr-pipe report`: write the HTML report (pipeline.report; default
    <work_dir>/report.html). if_stale: keep a report already stamped with this config's
    score results (what `run all` does; `fingerprints`: every stage's, when known). Returns
    (path, whether it was written)."""
    from pipeline import report as html_report

    path = out if out is not None else html_report.default_path(config)
    if if_stale and html_report.is_current(factory, config, path, fingerprints):
        return path, False
    return html_report.write(factory, config, path), True


def paired_sql(config: Config) -> str:
    """Per query set, the first configured method (FreestyleRet) against each other one on
    the same queries: how many queries only the first finds in its top K (wins) and how many
    only the other finds (losses). `fsr-pipe run all` adds the exact sign-test p-value of each
    line (paired_table)."""
    first = config.score.methods[0]
    return (
        "SELECT f.protocol, f.style, f.fusion, o.method AS versus, ks.k, count(*) AS queries, "
        "count(*) FILTER (WHERE f.rank <= ks.k AND NOT coalesce(o.rank <= ks.k, false)) AS wins, "
        "count(*) FILTER (WHERE o.rank <= ks.k AND NOT coalesce(f.rank <= ks.k, false)) AS "
        f"losses FROM query_ranks f JOIN query_ranks o ON o.method <> '{first}' "
        "AND o.protocol = f.protocol AND o.style = f.style AND o.fusion = f.fusion "
        "AND o.query_id = f.query_id AND o.partner_id IS NOT DISTINCT FROM f.partner_id "
        "CROSS JOIN (SELECT DISTINCT k FROM retrieval_metrics WHERE metric = 'recall') ks "
        f"WHERE f.method = '{first}' GROUP BY ALL "
        "ORDER BY f.protocol DESC, f.style, f.fusion, versus, ks.k"
    )


SINGLE_STYLES = "single styles"  # paired_table's pooled row over the unfused query sets


def paired_table(factory: StageFactory, config: Config) -> list[dict]:
    """paired_sql's rows, plus per (protocol, versus, k) one row pooling the single-style
    sets (style SINGLE_STYLES), each with `p`: the exact two-sided sign test of wins vs
    losses. Read it once score has finished (`recall_table` is not None); empty when score
    scored one method."""
    return with_pooled_and_p(_dicts(sql(factory, config, paired_sql(config), arrow=False)))


def with_pooled_and_p(rows: list[dict]) -> list[dict]:
    """paired_sql rows + the pooled single-style rows, each with its sign-test `p`."""
    from pipeline.stats import sign_test_p

    pooled: dict[tuple, dict] = {}
    for r in rows:
        if r["fusion"] == "none":
            key = (r["protocol"], r["versus"], r["k"])
            total = pooled.setdefault(key, {
                "protocol": r["protocol"], "style": SINGLE_STYLES, "fusion": "none",
                "versus": r["versus"], "k": r["k"], "queries": 0, "wins": 0, "losses": 0})
            for name in ("queries", "wins", "losses"):
                total[name] += r[name]
    out = rows + list(pooled.values())
    for r in out:
        r["p"] = sign_test_p(r["wins"], r["losses"])
    return out
