"""Stage `index`: a FAISS index over the gallery embeddings, one per method (docs/method.md 5).

    fsr-pipe run index

One unit per method of `score.methods` (pipeline/methods), over that method's gallery
embeddings. Each plans the index from the gallery size (`index.factory = "auto"`: the most
accurate of Flat, HNSW, IVF-Flat, IVF-SQ8, IVF-PQ whose build fits `index.max_memory_mb`, the
reason logged and stored), trains it
once on a seeded sample of the gallery, adds the embed shards in order with their int64
image ids, and checkpoints so a killed build resumes without adding a shard twice or losing
one (pipeline/index_build.py). It also writes the float vectors for exact re-ranking and
tunes nprobe / efSearch / rerank_k on held-out gallery vectors to `index.target_recall`
(pipeline/index_tune.py): the sweep goes to the `index_recall` view, the chosen setting to
`search_params.json` beside the index, which score and query search with.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pipeline import methods
from pipeline.config import Config, ConfigError, fingerprint_fields
from pipeline.records import MetricRecord, UnitRow, ViewSpec
from pipeline.stage import PipelineError, PlannedUnit, Stage, StageContext, UnitResult

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.index_build import Shard


def embed_shards(ctx: StageContext, method: str) -> list[Shard]:
    """The embed stage's shards of one method, in shard order."""
    from pipeline.index_build import Shard

    kind = methods.get(method).kind
    rows = ctx.input_rows("embed", kind)
    if not rows:
        raise PipelineError(f"index: the embed stage wrote no {kind!r} files; run `fsr-pipe "
                            f"run embed` (with {method!r} in score.methods)")
    return [Shard(key, path, count) for key, path, count in rows if count > 0]


class IndexStage(Stage):
    name = "index"
    section = "index"
    needs = ("embed",)
    views = (ViewSpec("index_recall", "index", "recall",
                      "method VARCHAR, factory VARCHAR, nprobe INTEGER, rerank_k INTEGER, "
                      "recall_1_at_1 DOUBLE, recall_10_at_10 DOUBLE, queries_per_s DOUBLE, "
                      "n_queries BIGINT, family VARCHAR, ef_search INTEGER, chosen BOOLEAN"),)

    def config_values(self, config: Config) -> dict[str, Any]:
        # The stored vectors' precision is the embed stage's (already in its fingerprint).
        return fingerprint_fields(config.index, config.resolve)

    def check(self, config: Config) -> None:
        """A factory string FAISS cannot parse for the model's embedding size fails now, not
        after embedding; one with more lists than the gallery has vectors fails at index."""
        from pipeline.index import parse_factory
        from pipeline.models.clip import embed_dim

        d = embed_dim(config.model.arch)
        if config.index.factory != "auto" and d is not None:
            try:
                parse_factory(d, config.index.factory)
            except ValueError as error:
                raise ConfigError(f"index.factory: {error}; use 'auto' or a FAISS factory "
                                  "string such as 'IVF1024,PQ64' (docs/config.md)") from error

    def plan(self, ctx: StageContext) -> list[PlannedUnit]:
        return [PlannedUnit(m.name, {"kind": m.kind}) for m in methods.configured(ctx.config)]

    def run(self, ctx: StageContext, unit: UnitRow) -> UnitResult:
        from pipeline.artifacts import atomic_path, describe, write_parquet
        from pipeline.device import resolve_device
        from pipeline.index import plan_index
        from pipeline.index_build import VectorStore, build_index, shard_dim
        from pipeline.index_tune import save_search_params, tune_search

        cfg, seed = ctx.config.index, ctx.config.run.seed
        shards = embed_shards(ctx, unit.key)
        n, d = sum(s.rows for s in shards), shard_dim(shards[0])
        try:
            plan = plan_index(n, d, cfg.factory, cfg.max_memory_mb << 20,
                              add_rows=max(s.rows for s in shards))
        except ValueError as error:
            raise PipelineError(f"index {unit.key}: {error} (index.factory = {cfg.factory!r}, "
                                f"index.max_memory_mb = {cfg.max_memory_mb})") from error
        ctx.log.info("index %s: %s -- %s", unit.key, plan.factory, plan.reason)
        use_gpu = cfg.use_gpu and resolve_device(ctx.config.run.device).type == "cuda"
        out = ctx.out_dir / unit.key

        with ctx.progress(f"index {unit.key}: sample", len(shards)) as sampled, \
                ctx.progress(f"index {unit.key}: add", n) as added:
            ticks = {"sample": sampled, "add": added}
            build = build_index(shards, plan, out, seed, ctx.config.embed.dtype, use_gpu,
                                cfg.checkpoint_s, lambda phase, k: ticks[phase](k))
        if build.resumed_shards:
            ctx.log.info("index %s: resumed with %d shard(s) already in the checkpoint",
                         unit.key, build.resumed_shards)
        store = VectorStore.open(build.vectors_path)
        recall, params = tune_search(build.index, store, cfg.check_queries, seed,
                                     cfg.check_nprobe, cfg.ef_search, cfg.check_rerank_k,
                                     cfg.target_recall, plan.nlist, plan.family)
        for row in recall:
            ctx.log.info("index %s: nprobe %d, efSearch %d, rerank %d: 1-recall@1 %.3f, "
                         "10-recall@10 %.3f, %.0f queries/s%s", unit.key, row.nprobe,
                         row.ef_search, row.rerank_k, row.recall_1_at_1, row.recall_10_at_10,
                         row.queries_per_s, " (chosen)" if row.chosen else "")
        ctx.log.info("index %s: search with nprobe %d, efSearch %d, rerank_k %d: %s", unit.key,
                     params.nprobe, params.ef_search, params.rerank_k, params.note)
        params_path = save_search_params(out, params)

        plan_path = out / "plan.json"
        with atomic_path(plan_path) as tmp:
            tmp.write_text(json.dumps({**plan.__dict__, "method": unit.key}, indent=2))
        recall_table = _recall_table(unit.key, plan.factory, plan.family, recall)
        artifacts = [
            describe("trained_index", build.trained_path, 0),
            describe("index", build.index_path, n),
            describe("vectors", build.vectors_path, n),
            describe("vector_ids", build.vectors_path.with_name("ids.npy"), n),
            describe("plan", plan_path, None),
            describe("search_params", params_path, None),
            describe("recall", write_parquet(recall_table, out / "recall.parquet"),
                     len(recall_table)),
        ]
        metrics = [MetricRecord("train_seconds", build.train_seconds),
                   MetricRecord("add_seconds", build.add_seconds),
                   MetricRecord("index_bytes", float(build.index_path.stat().st_size)),
                   MetricRecord("estimated_bytes", float(plan.estimated_bytes)),
                   MetricRecord("estimated_build_bytes", float(plan.build_bytes)),
                   MetricRecord("search_nprobe", float(params.nprobe)),
                   MetricRecord("search_ef_search", float(params.ef_search)),
                   MetricRecord("search_rerank_k", float(params.rerank_k)),
                   MetricRecord("search_reached_target", float(params.reached),
                                {"target_recall": params.target_recall})]
        for row in recall:
            labels = {"nprobe": row.nprobe, "ef_search": row.ef_search, "rerank_k": row.rerank_k,
                      "chosen": row.chosen}
            metrics += [MetricRecord("1-recall@1", row.recall_1_at_1, labels),
                        MetricRecord("10-recall@10", row.recall_10_at_10, labels),
                        MetricRecord("queries_per_s", row.queries_per_s, labels)]
        return UnitResult(rows=n, artifacts=artifacts, metrics=metrics)


def _recall_table(method: str, factory: str, family: str, recall: list) -> pa.Table:
    import pyarrow as pa

    n = len(recall)
    return pa.table({
        "method": pa.array([method] * n, pa.string()),
        "factory": pa.array([factory] * n, pa.string()),
        "nprobe": pa.array([r.nprobe for r in recall], pa.int32()),
        "rerank_k": pa.array([r.rerank_k for r in recall], pa.int32()),
        "recall_1_at_1": pa.array([r.recall_1_at_1 for r in recall], pa.float64()),
        "recall_10_at_10": pa.array([r.recall_10_at_10 for r in recall], pa.float64()),
        "queries_per_s": pa.array([r.queries_per_s for r in recall], pa.float64()),
        "n_queries": pa.array([r.n_queries for r in recall], pa.int64()),
        "family": pa.array([family] * n, pa.string()),
        "ef_search": pa.array([r.ef_search for r in recall], pa.int32()),
        "chosen": pa.array([r.chosen for r in recall], pa.bool_()),
    })
