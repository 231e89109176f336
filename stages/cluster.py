"""Stage `cluster`: the K-Means style space over training Gram vectors (docs/method.md 2).

    fsr-pipe run cluster

K-Means (FAISS, spherical) with `cluster.k` centres on a seeded sample of the training split's
Gram vectors (image queries and the photos themselves: the photo style is one of the K).
Writes the centres, and for every extracted query and photo its hard cluster and soft style
weights `w = softmax(cos(g, mu) / T)`. Records purity and adjusted Rand index against the
known styles as metrics.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from pipeline.records import MetricRecord, UnitRow, ViewSpec
from pipeline.stage import PipelineError, PlannedUnit, Stage, StageContext, UnitResult

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa


def _shard_vectors(ctx: StageContext, key: str) -> tuple[pa.Table, np.ndarray]:
    """(ids with item_kind, split, style; gram vectors) of one extract shard."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.arrays import arrow_to_vectors

    tables, grams = [], []
    for kind, id_name, gram_kind, meta_kind in (
        ("query", "query_id", "gram_queries", "queries"),
        ("gallery", "image_id", "gram_gallery", "gallery"),
    ):
        gram = pq.read_table(ctx.input_path("extract", gram_kind, key))
        meta = pq.read_table(ctx.input_path("prepare", meta_kind, key))
        if kind == "gallery":
            meta = meta.append_column("style", pa.array(["photo"] * len(meta), pa.string()))
        meta = meta.select([id_name, "split", "style"])
        meta = meta.rename_columns(["item_id", "split", "style"])
        # Every extracted item is in its shard's dataset table (extract reads from it).
        rows = pc.index_in(gram[id_name], value_set=meta["item_id"])
        assert rows.null_count == 0, f"extract {key}: items missing from prepare's tables"
        gram = meta.take(rows).append_column("gram", gram["gram"])
        gram = gram.append_column("item_kind", pa.array([kind] * len(gram), pa.string()))
        grams.append(arrow_to_vectors(gram["gram"]))
        tables.append(gram.drop_columns(["gram"]))
    return pa.concat_tables(tables), np.concatenate(grams)


class ClusterStage(Stage):
    name = "cluster"
    section = "cluster"
    needs = ("extract", "prepare")
    views = (
        ViewSpec("style_centres", "cluster", "centres",
                 "cluster INTEGER, size BIGINT, majority_style VARCHAR, centre FLOAT[]"),
        ViewSpec("style_assignments", "cluster", "assignments",
                 "item_kind VARCHAR, item_id BIGINT, style VARCHAR, split VARCHAR, "
                 "cluster INTEGER, weights FLOAT[]"),
    )

    def plan(self, ctx: StageContext) -> list[PlannedUnit]:
        return [PlannedUnit("all", {})]

    def run(self, ctx: StageContext, unit: UnitRow) -> UnitResult:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.arrays import stable_uniform, vectors_to_arrow
        from pipeline.artifacts import describe, write_parquet
        from pipeline.style_space import assign, fit_kmeans, style_weights

        cfg, seed = ctx.config.cluster, ctx.config.run.seed
        shards = [u.key for u in ctx.input_units("extract")]
        # Pass 1 keeps a seeded sample of training vectors; pass 2 streams the assignments
        # out shard by shard, so memory is bounded by the sample plus one shard.
        splits = [pq.read_table(ctx.input_path("prepare", kind, key), columns=["split"])
                  for key in shards for kind in ("queries", "gallery")]
        n_train = sum(int(np.sum(np.asarray(t["split"]) == "train")) for t in splits)
        if n_train < cfg.k:
            raise PipelineError(
                f"cluster: {n_train} training vectors for cluster.k = {cfg.k}; add data "
                "(data.demo_items) or lower cluster.k"
            )
        keep = min(1.0, cfg.max_train_points / n_train)
        train_x, train_styles = [], []
        for key in shards:
            meta, x = _shard_vectors(ctx, key)
            ids, splits, styles = (meta[c].to_pylist() for c in ("item_id", "split", "style"))
            mask = np.array([s == "train" and stable_uniform(seed, f"kmeans:{i}") < keep
                             for i, s in zip(ids, splits)], dtype=bool)
            train_x.append(x[mask])
            train_styles += [s for s, m in zip(styles, mask) if m]
        train = np.concatenate(train_x)
        centres = fit_kmeans(train, cfg.k, cfg.niter, seed)
        train_clusters = assign(train, centres)

        out = ctx.out_dir / unit.key
        tables = []
        for key in shards:
            meta, x = _shard_vectors(ctx, key)
            tables.append(meta.select(["item_kind", "item_id", "style", "split"]).append_column(
                "cluster", pa.array(assign(x, centres).astype(np.int32))).append_column(
                "weights", vectors_to_arrow(style_weights(x, centres, cfg.temperature))))
        assignments = pa.concat_tables(tables)

        sizes = Counter(train_clusters.tolist())
        majority = {c: Counter(s for s, t in zip(train_styles, train_clusters) if t == c)
                    .most_common(1)[0][0] for c in sizes}
        centre_table = pa.table({
            "cluster": pa.array(range(cfg.k), pa.int32()),
            "size": pa.array([sizes.get(c, 0) for c in range(cfg.k)], pa.int64()),
            "majority_style": pa.array([majority.get(c) for c in range(cfg.k)], pa.string()),
            "centre": vectors_to_arrow(centres),
        })
        metrics = self._metrics(train_styles, train_clusters, assignments)
        for m in metrics:
            ctx.log.info("cluster %s %s = %.3f", m.name, m.labels or "", m.value)
        return UnitResult(
            rows=len(assignments),
            artifacts=[
                describe("centres", write_parquet(centre_table, out / "centres.parquet"), cfg.k),
                describe("assignments", write_parquet(assignments, out / "assignments.parquet"),
                         len(assignments)),
            ],
            metrics=metrics,
        )

    @staticmethod
    def _metrics(train_styles: list[str], train_clusters: np.ndarray,
                 assignments: pa.Table) -> list[MetricRecord]:
        import numpy as np
        import pyarrow.compute as pc

        from pipeline.style_space import adjusted_rand_index, cluster_purity

        metrics = [
            MetricRecord("purity", cluster_purity(train_styles, train_clusters),
                         {"split": "train"}),
            MetricRecord("adjusted_rand_index",
                         adjusted_rand_index(train_styles, train_clusters), {"split": "train"}),
            MetricRecord("train_points", float(len(train_styles)), {}),
        ]
        test = assignments.filter(pc.equal(assignments["split"], "test"))
        if len(test):
            styles, clusters = test["style"].to_pylist(), np.asarray(test["cluster"])
            metrics += [
                MetricRecord("purity", cluster_purity(styles, clusters), {"split": "test"}),
                MetricRecord("adjusted_rand_index", adjusted_rand_index(styles, clusters),
                             {"split": "test"}),
            ]
        return metrics
