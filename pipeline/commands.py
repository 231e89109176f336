"""What the CLI commands do, as plain functions (the CLI only parses and prints)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass

import pyarrow as pa

from pipeline.catalog import Catalog
from pipeline.config import Config
from pipeline.progress import ProgressBoard
from pipeline.retrieval import sign_test_p
from pipeline.runner import (
    Runner,
    StageReport,
    downstream,
    failure_summary,
    fingerprints,
    plan_rows,
    too_many_failures,
)
from pipeline.stage import PipelineError
from stages import all_stages

log = logging.getLogger(__name__)

STAGE_NAMES = tuple(s.name for s in all_stages())


def run(config: Config, targets: list[str], shard: int | None = None,
        with_upstream: bool = True, progress: bool | None = None) -> list[StageReport]:
    """Run stages (`all` = every stage); returns what each stage did."""
    stages = all_stages()
    if "all" in targets and not with_upstream:
        raise PipelineError("`fsr-pipe stage` runs one stage (or one shard of it); "
                            "`fsr-pipe run all` runs every stage")
    names = [s.name for s in stages] if targets == ["all"] else targets
    with ProgressBoard(progress) as board:
        return Runner(config, stages, board).run(names, shard=shard, with_upstream=with_upstream)


@dataclass
class StageStatus:
    stage: str
    fingerprint: str
    planned: bool
    done: int = 0
    pending: int = 0
    running: int = 0
    failed: int = 0
    stale: int = 0
    rows: int = 0
    seconds: float = 0.0
    notes: str | None = None


def status(config: Config) -> list[StageStatus]:
    """Per stage, the state of its plan under the current config (stale = older plans)."""
    catalog = Catalog.in_dir(config.work_dir, config.run.catalog_timeout_s)
    stages = all_stages()
    expected = fingerprints(stages, config)
    if not catalog.path.exists():
        return [StageStatus(s.name, expected[s.name], False, notes=s.notes(config))
                for s in stages]
    counts = catalog.rows(
        "SELECT stage, fingerprint, status, count(*), coalesce(sum(rows), 0), "
        "coalesce(sum(seconds), 0) FROM units GROUP BY ALL"
    )
    # `running` marks of processes that died on this host (SIGKILL, OOM): the next run redoes
    # those units, so they count as pending.
    dead: dict[tuple[str, str], int] = {}
    for name, fp, host, pid in catalog.rows(
            "SELECT stage, fingerprint, host, pid FROM units WHERE status = 'running'"):
        if catalog.holder(host, pid) == "dead":
            dead[name, fp] = dead.get((name, fp), 0) + 1
    result = []
    for stage in stages:
        st = StageStatus(stage.name, expected[stage.name], False, notes=stage.notes(config))
        for name, fp, state, n, rows, seconds in counts:
            if name != stage.name:
                continue
            if fp != st.fingerprint:
                st.stale += n
                continue
            st.planned = True
            setattr(st, state, getattr(st, state) + n)
            st.rows += rows
            st.seconds += seconds
        if st.planned and st.done and (excess := too_many_failures(
                catalog, stage.name, st.fingerprint, config.data.max_failure_ratio)):
            note = (f"{failure_summary(*excess, config.data.max_failure_ratio)}: stages "
                    "after it do not run (see failures_by_reason)")
            st.notes = f"{st.notes}; {note}" if st.notes else note
        if died := dead.get((stage.name, st.fingerprint)):
            st.running -= died
            st.pending += died
            note = f"{died} unit(s) interrupted (their process died); the next run redoes them"
            st.notes = f"{st.notes}; {note}" if st.notes else note
        result.append(st)
    return result


def reset(config: Config, stage: str) -> list[str]:
    """Forget a stage and everything after it, and delete their files; returns their names."""
    stages = all_stages()
    if stage not in STAGE_NAMES:
        raise PipelineError(f"unknown stage {stage!r}; stages: {list(STAGE_NAMES)}")
    names = [s.name for s in downstream(stages, stage)]
    catalog = Catalog.in_dir(config.work_dir, config.run.catalog_timeout_s)
    if catalog.path.exists():
        running = catalog.rows(
            "SELECT stage, unit_key, host, pid FROM units WHERE status = 'running' AND "
            f"stage IN ({', '.join('?' for _ in names)}) ORDER BY ALL", names)
        busy = [f"{name} {key} (pid {pid})" for name, key, host, pid in running
                if catalog.holder(host, pid) == "alive"]
        if busy:
            raise PipelineError(
                f"cannot reset {stage}: {len(busy)} unit(s) are being run by live processes "
                f"on this host: {', '.join(busy[:3])}{' ...' if len(busy) > 3 else ''}; stop "
                "them (or let them finish) first"
            )
        for name, key, host, pid in running:
            if catalog.holder(host, pid) == "elsewhere":  # see docs/resume.md
                log.warning("reset: %s %s is marked running by %s (pid %s); make sure that "
                            "process is gone, or it will write into the reset stage", name,
                            key, host, pid)
        catalog.reset(names)
        catalog.init()
        catalog.refresh_views([v for s in stages for v in s.views])
    for name in names:
        shutil.rmtree(config.work_dir / name, ignore_errors=True)
    return names


def sql(config: Config, query: str) -> pa.Table:
    """Run a query against the run's catalog (read-only), its `stages` table and views showing
    the plans of `config` (not those of whichever config ran last)."""
    catalog = Catalog.in_dir(config.work_dir, config.run.catalog_timeout_s)
    stages = all_stages()
    views = [v for s in stages for v in s.views]
    return catalog.query_plans(query, plan_rows(stages, config), views)


# The FreestyleRet-vs-baseline Recall@K table that `fsr-pipe run all` prints (untrained is
# NULL unless embed.untrained is on).
RECALL_SQL = (
    "SELECT protocol, style, fusion, k, "
    "max(value) FILTER (WHERE method = 'freestyle') AS freestyle, "
    "max(value) FILTER (WHERE method = 'untrained') AS untrained, "
    "max(value) FILTER (WHERE method = 'baseline') AS baseline, max(n_queries) AS queries "
    "FROM retrieval_metrics WHERE metric = 'recall' GROUP BY ALL "
    "ORDER BY protocol DESC, style, fusion, k"
)


def recall_table(config: Config) -> pa.Table | None:
    """RECALL_SQL's result, or None when the score stage has not finished for this config."""
    if not any(st.stage == "score" and st.planned and st.done and not st.pending
               and not st.failed and not st.running for st in status(config)):
        return None
    return sql(config, RECALL_SQL)


# Per query set, FreestyleRet against each other scored method on the same queries: how many
# queries only FreestyleRet finds in its top K (wins) and how many only the other finds
# (losses). `fsr-pipe run all` adds the exact sign-test p-value of each line (paired_table).
PAIRED_SQL = (
    "SELECT f.protocol, f.style, f.fusion, o.method AS versus, ks.k, count(*) AS queries, "
    "count(*) FILTER (WHERE f.rank <= ks.k AND NOT coalesce(o.rank <= ks.k, false)) AS wins, "
    "count(*) FILTER (WHERE o.rank <= ks.k AND NOT coalesce(f.rank <= ks.k, false)) AS losses "
    "FROM query_ranks f JOIN query_ranks o ON o.method <> 'freestyle' "
    "AND o.protocol = f.protocol AND o.style = f.style AND o.fusion = f.fusion "
    "AND o.query_id = f.query_id AND o.partner_id IS NOT DISTINCT FROM f.partner_id "
    "CROSS JOIN (SELECT DISTINCT k FROM retrieval_metrics WHERE metric = 'recall') ks "
    "WHERE f.method = 'freestyle' GROUP BY ALL "
    "ORDER BY f.protocol DESC, f.style, f.fusion, versus, ks.k"
)
SINGLE_STYLES = "single styles"  # paired_table's pooled row over the unfused query sets


def paired_table(config: Config) -> list[dict]:
    """PAIRED_SQL's rows, plus per (protocol, versus, k) one row pooling the single-style
    sets (style SINGLE_STYLES), each with `p`: the exact two-sided sign test of wins vs
    losses. Read it once score has finished (`recall_table` is not None); empty when score
    scored FreestyleRet alone."""
    return with_pooled_and_p(sql(config, PAIRED_SQL).to_pylist())


def with_pooled_and_p(rows: list[dict]) -> list[dict]:
    """PAIRED_SQL rows + the pooled single-style rows, each with its sign-test `p`."""
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
