"""Stages index and score on the tiny demo: `run all` end to end, the metrics against an
independent brute-force computation, views, the printed table, fusion, IVF, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT, write_tiny_config

from pipeline import commands
from pipeline.catalog import Catalog
from pipeline.config import load_config
from stages import all_stages

ITEMS = 24
STYLES = {"text", "sketch", "art", "lowres"}
FUSED = {"sketch+text", "art+text", "lowres+text"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("score")
    path = write_tiny_config(directory, directory / "run", items=ITEMS,
                             extra="\n[index]\ncheck_queries = 20\n")
    reports = commands.run(all_stages, load_config(path), ["all"], progress=False)
    assert {r.stage: r.ran for r in reports}["score"] == 2
    return path


def rows(config, sql: str) -> list[tuple]:
    return Catalog.in_dir(config.work_dir).rows(sql)


def vectors(config, view: str, id_column: str, where: str = "") -> dict[int, np.ndarray]:
    return {i: np.asarray(v, dtype=np.float32)
            for i, v in rows(config, f"SELECT {id_column}, embedding FROM {view} {where}")}


def test_run_all_scores_every_style_fusion_and_protocol(finished) -> None:
    config = load_config(finished)
    got = rows(config, "SELECT method, style, protocol, fusion, k FROM retrieval_metrics "
                       "WHERE metric = 'recall'")
    expected = {(m, s, p, "none", k) for m in ("freestyle", "baseline") for s in STYLES
                for p in ("gallery", "batch") for k in (1, 5, 10)}
    expected |= {(m, s, p, f, k) for m in ("freestyle", "baseline") for s in FUSED
                 for p in ("gallery", "batch") for f in ("softmax-max", "cosine-max", "mean")
                 for k in (1, 5, 10)}
    assert set(got) == expected and len(got) == len(expected)
    values = rows(config, "SELECT metric, value FROM retrieval_metrics")
    assert all(0.0 <= v <= 1.0 for _, v in values)
    # The demo knows every photo's class: mAP@200 and P@200 on the gallery protocol.
    class_rows = rows(config, "SELECT DISTINCT metric, k, protocol FROM retrieval_metrics "
                              "WHERE metric <> 'recall'")
    assert set(class_rows) == {("map", 200, "gallery"), ("precision", 200, "gallery")}
    # Recall@K grows with K.
    for method, style, protocol, fusion in rows(
            config, "SELECT DISTINCT method, style, protocol, fusion FROM retrieval_metrics"):
        recall = [v for (v,) in rows(config, (
            "SELECT value FROM retrieval_metrics WHERE metric = 'recall' AND "
            f"method = '{method}' AND style = '{style}' AND protocol = '{protocol}' AND "
            f"fusion = '{fusion}' ORDER BY k"))]
        assert recall == sorted(recall)


def test_gallery_recall_matches_brute_force(finished) -> None:
    """Recompute Recall@K from the stored embeddings, without any project search code."""
    config = load_config(finished)
    for method, gallery_view in (("freestyle", "gallery_embeddings"),
                                 ("baseline", "baseline_embeddings")):
        gallery = vectors(config, gallery_view, "image_id")
        ids = np.array(list(gallery))
        xb = np.stack(list(gallery.values()))
        queries = vectors(config, "query_embeddings", "query_id", f"WHERE method = '{method}'")
        test = rows(config, "SELECT query_id, image_id, style FROM queries WHERE split = 'test'")
        by_style: dict[str, list[int]] = {}
        for query_id, target, style in test:
            sim = xb @ queries[query_id]  # one product, so the target's score rounds alike
            rank = 1 + int(np.sum(sim > sim[ids == target][0]))
            by_style.setdefault(style, []).append(rank)
        for style, ranks in by_style.items():
            stored = dict(rows(config, (
                "SELECT k, value FROM retrieval_metrics WHERE metric = 'recall' AND "
                f"protocol = 'gallery' AND fusion = 'none' AND method = '{method}' AND "
                f"style = '{style}'")))
            for k in (1, 5, 10):
                assert stored[k] == pytest.approx(np.mean(np.array(ranks) <= k)), (method, style)
        assert ids.size == ITEMS


def test_fused_queries_follow_their_rules(finished) -> None:
    config = load_config(finished)
    queries = vectors(config, "query_embeddings", "query_id", "WHERE method = 'freestyle'")
    gallery = vectors(config, "gallery_embeddings", "image_id")
    ids = np.array(list(gallery))
    xb = np.stack(list(gallery.values()))
    results = rows(config, "SELECT query_id, partner_id, fusion, list(image_id ORDER BY rank) "
                           "FROM search_results WHERE method = 'freestyle' AND style = "
                           "'sketch+text' GROUP BY ALL")
    assert {f for _, _, f, _ in results} == {"softmax-max", "cosine-max", "mean"}
    for query_id, partner_id, fusion, top in results:
        a, b = queries[query_id], queries[partner_id]
        if fusion == "cosine-max":
            sim = np.maximum(xb @ a, xb @ b)
        elif fusion == "softmax-max":  # the authors': softmax(100 cos) over the whole gallery
            pa_, pb_ = (np.exp(100 * (xb @ v).astype(np.float64)) for v in (a, b))
            sim = np.maximum(pa_ / pa_.sum(), pb_ / pb_.sum())
        else:
            mean = (a + b) / np.linalg.norm(a + b)
            sim = xb @ mean
        assert top == ids[np.argsort(-sim, kind="stable")[:len(top)]].tolist(), fusion
    # Partners are the text query of the same photo.
    pairs = rows(config, "SELECT DISTINCT r.query_id, r.partner_id, a.image_id, b.image_id, "
                         "b.style FROM search_results r JOIN queries a ON a.query_id = r.query_id "
                         "JOIN queries b ON b.query_id = r.partner_id "
                         "WHERE r.style = 'sketch+text'")
    assert pairs and all(t1 == t2 and style == "text" for _, _, t1, t2, style in pairs)


def test_query_ranks_agree_with_metrics_and_batch_ranks_stay_in_batches(finished) -> None:
    config = load_config(finished)
    mismatched = rows(config, """
        SELECT m.method, m.style, m.protocol, m.fusion, m.k, m.value, r.recall
        FROM retrieval_metrics m JOIN (
            SELECT method, style, protocol, fusion, k,
                   avg(CASE WHEN rank IS NOT NULL AND rank <= k THEN 1 ELSE 0 END) AS recall
            FROM query_ranks, (SELECT unnest([1, 5, 10]) AS k) GROUP BY ALL
        ) r USING (method, style, protocol, fusion, k)
        WHERE m.metric = 'recall' AND abs(m.value - r.recall) > 1e-9""")
    assert mismatched == []
    assert rows(config, "SELECT max(rank) <= 24 FROM query_ranks WHERE protocol = 'batch'") == [
        (True,)]


def test_index_stage_records_plan_and_recall(finished) -> None:
    config = load_config(finished)
    recall = rows(config, "SELECT method, factory, nprobe, rerank_k, recall_1_at_1, "
                          "recall_10_at_10, n_queries, family, chosen FROM index_recall "
                          "ORDER BY ALL")
    # 24 photos: "auto" plans exact search, so the index finds exactly what brute force does;
    # its scores are exact, so the tuner tries no re-ranking.
    assert [r[:4] for r in recall] == [("baseline", "Flat", 0, 0), ("freestyle", "Flat", 0, 0)]
    assert all(r[4] == 1.0 and r[5] == 1.0 and r[6] == 20 and r[7:] == ("flat", True)
               for r in recall)
    names = {n for (n,) in rows(config, "SELECT DISTINCT name FROM current_metrics "
                                        "WHERE stage = 'index'")}
    assert {"1-recall@1", "10-recall@10", "train_seconds", "add_seconds", "index_bytes",
            "search_nprobe", "search_rerank_k", "search_reached_target"} <= names
    plan_file = Catalog.in_dir(config.work_dir).artifact_paths(
        "index", commands.status(all_stages, config)[-2].fingerprint, "plan", "freestyle")[0]
    plan = json.loads(Path(plan_file).read_text())
    assert plan["factory"] == "Flat" and plan["n"] == ITEMS and "exact search" in plan["reason"]


def test_ivf_index_through_the_stages(finished) -> None:
    """A given IVF factory: nprobe sweep in the recall rows; score searches with the tuned
    nprobe (target 1.0: all 4 lists), so the scores equal the exact (Flat) run's."""
    flat = load_config(finished)
    config = load_config(finished, ["index.factory='IVF4,Flat'", "index.check_nprobe=[1, 4]",
                                    "index.target_recall=1.0"])
    reports = commands.run(all_stages, config, ["score"], progress=False)
    assert {r.stage: r.ran for r in reports} == {
        "ingest": 0, "prepare": 0, "extract": 0, "cluster": 0, "train": 0, "embed": 0,
        "index": 2, "score": 2}
    got = rows(config, "SELECT DISTINCT factory, nprobe FROM index_recall ORDER BY ALL")
    assert got == [("IVF4,Flat", 1), ("IVF4,Flat", 4)]
    chosen = rows(config, "SELECT DISTINCT nprobe, recall_10_at_10 FROM index_recall "
                          "WHERE chosen")
    assert chosen == [(4, 1.0)] or all(r[1] == 1.0 for r in chosen)
    metric_sql = ("SELECT method, style, protocol, fusion, metric, k, value FROM "
                  "retrieval_metrics ORDER BY ALL")
    ivf = rows(config, metric_sql)
    commands.run(all_stages, flat, ["score"], progress=False)  # the Flat plan is current again
    assert rows(flat, metric_sql) == ivf


def test_score_is_deterministic_after_reset(finished) -> None:
    config = load_config(finished)
    commands.run(all_stages, config, ["score"], progress=False)
    fingerprint = commands.status(all_stages, config)[-1].fingerprint
    paths = Catalog.in_dir(config.work_dir).artifact_paths("score", fingerprint, "metrics")
    before = [pq.read_table(p) for p in paths]
    commands.reset(all_stages, config, "score")
    reports = commands.run(all_stages, config, ["score"], progress=False)
    assert reports[-1].ran == 2
    after = [pq.read_table(p) for p in
             Catalog.in_dir(config.work_dir).artifact_paths("score", fingerprint, "metrics")]
    assert all(a.equals(b) for a, b in zip(before, after)) and len(after) == 2


def test_cli_prints_the_recall_table_and_its_sql(finished) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "all", "--config",
                           str(finished)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout  # the table and its SQL; the run's report goes to stderr
    assert "Nothing to do" in done.stderr
    assert "Recall@K on the test split" in out and "R@1 FSR" in out and "R@10 base" in out
    assert all(style in out for style in STYLES | FUSED)
    config = load_config(finished)
    assert commands.recall_sql(config) in out.replace("\n", "")
    # The printed SQL runs and gives one row per protocol x query set x fusion x K.
    table = commands.sql(all_stages, config, commands.recall_sql(config))
    assert len(table) == 2 * (len(STYLES) + 3 * len(FUSED)) * 3
    assert table["freestyle"].null_count == 0 and table["baseline"].null_count == 0
    # Then the query-by-query comparison at R@1 and the SQL of its counts.
    assert "Query by query at R@1" in out and "FSR vs base" in out
    assert commands.SINGLE_STYLES in out
    assert commands.paired_sql(config) in out.replace("\n", "")


def test_paired_counts_match_the_query_ranks(finished) -> None:
    """Wins and losses against the baseline, counted here query by query from the stored
    ranks; the pooled single-style row sums its sets; p is the sign test of its counts."""
    from pipeline.retrieval import sign_test_p

    config = load_config(finished)
    ranks: dict[tuple, dict[str, int | None]] = {}
    for method, protocol, style, fusion, query, partner, rank in rows(config, (
            "SELECT method, protocol, style, fusion, query_id, partner_id, rank "
            "FROM query_ranks")):
        ranks.setdefault((protocol, style, fusion, query, partner), {})[method] = rank
    expected: dict[tuple, list[int]] = {}
    for (protocol, style, fusion, *_), by_method in ranks.items():
        for k in (1, 5, 10):
            hit = {m: r is not None and r <= k for m, r in by_method.items()}
            for key in [(protocol, style, fusion, k)] + (
                    [(protocol, commands.SINGLE_STYLES, "none", k)] if fusion == "none" else []):
                counts = expected.setdefault(key, [0, 0, 0])
                counts[0] += 1
                counts[1] += hit["freestyle"] and not hit["baseline"]
                counts[2] += hit["baseline"] and not hit["freestyle"]
    got = commands.paired_table(all_stages, config)
    assert {r["versus"] for r in got} == {"baseline"}
    assert {(r["protocol"], r["style"], r["fusion"], r["k"]): [r["queries"], r["wins"],
            r["losses"]] for r in got} == expected
    assert all(r["p"] == sign_test_p(r["wins"], r["losses"]) for r in got)


def test_paired_sql_by_hand() -> None:
    """paired_sql on hand-made ranks (None: not in the searched depth): a query only one
    method finds is a win or a loss, found by both or neither is neither; fused queries pair
    on their partner too; the pooled row sums the single-style sets only."""
    import duckdb

    ranks = [  # method, style, protocol, fusion, query_id, partner_id, rank
        ("freestyle", "sketch", "gallery", "none", 1, None, 1),
        ("baseline", "sketch", "gallery", "none", 1, None, 3),     # win at 1, tie at 5
        ("freestyle", "sketch", "gallery", "none", 2, None, None),
        ("baseline", "sketch", "gallery", "none", 2, None, 1),     # loss at 1 and 5
        ("freestyle", "art", "gallery", "none", 3, None, 2),
        ("baseline", "art", "gallery", "none", 3, None, None),     # win at 5
        ("freestyle", "art", "gallery", "none", 4, None, None),
        ("baseline", "art", "gallery", "none", 4, None, None),     # neither
        ("freestyle", "art+text", "gallery", "mean", 3, 7, 1),
        ("baseline", "art+text", "gallery", "mean", 3, 7, 9),      # win at 1 and 5
        ("freestyle", "art+text", "gallery", "mean", 3, 8, 1),
        ("baseline", "art+text", "gallery", "mean", 3, 8, 1),      # tie
        ("baseline", "art", "gallery", "none", 5, None, 1),        # unpaired: left out
    ]
    con = duckdb.connect()
    con.execute("CREATE TABLE query_ranks (method VARCHAR, style VARCHAR, protocol VARCHAR, "
                "fusion VARCHAR, query_id BIGINT, partner_id BIGINT, rank INTEGER)")
    con.executemany("INSERT INTO query_ranks VALUES (?, ?, ?, ?, ?, ?, ?)", ranks)
    con.execute("CREATE TABLE retrieval_metrics AS "
                "SELECT 'recall' AS metric, unnest([1, 5]) AS k")
    cursor = con.execute(commands.paired_sql(load_config(None)))  # freestyle first
    names = [d[0] for d in cursor.description]
    got = commands.with_pooled_and_p([dict(zip(names, r)) for r in cursor.fetchall()])
    assert {(r["style"], r["k"]): (r["queries"], r["wins"], r["losses"]) for r in got} == {
        ("art", 1): (2, 0, 0), ("art", 5): (2, 1, 0),
        ("sketch", 1): (2, 1, 1), ("sketch", 5): (2, 0, 1),
        ("art+text", 1): (2, 1, 0), ("art+text", 5): (2, 1, 0),
        (commands.SINGLE_STYLES, 1): (4, 1, 1), (commands.SINGLE_STYLES, 5): (4, 1, 1)}
    assert all(r["versus"] == "baseline" and r["protocol"] == "gallery" for r in got)
    assert {r["p"] for r in got if r["k"] == 1 and r["style"] == "sketch"} == {1.0}


def test_score_without_baseline(finished) -> None:
    config = load_config(finished, ['score.methods=["freestyle"]'])
    commands.run(all_stages, config, ["score"], progress=False)
    methods = rows(config, "SELECT DISTINCT method FROM retrieval_metrics")
    assert methods == [("freestyle",)]
    table = commands.sql(all_stages, config, commands.recall_sql(config))
    assert "baseline" not in table.column_names and table["freestyle"].null_count == 0
    assert commands.paired_table(all_stages, config) == []
    commands.run(all_stages,
                 load_config(finished), ["score"], progress=False)  # restore the current plan


def test_score_with_untrained_prompts(finished) -> None:
    """Method `untrained`: the untrained prompts (train's fresh init) are embedded, indexed
    and scored as a third method, and the table gets their columns."""
    import torch

    from pipeline.arrays import arrow_to_vectors
    from pipeline.cli import _recall_view
    from pipeline.data.images import load_rgb, to_tensor
    from pipeline.models.factory import build_model

    config = load_config(finished, ['score.methods=["freestyle", "untrained", "baseline"]'])
    reports = {r.stage: r.ran for r in commands.run(all_stages, config, ["score"], progress=False)}
    assert reports["train"] == 0 and reports["embed"] > 0
    assert reports["index"] == 3 and reports["score"] == 3
    assert rows(config, "SELECT DISTINCT method FROM retrieval_metrics ORDER BY 1") == [
        ("baseline",), ("freestyle",), ("untrained",)]
    table = commands.sql(all_stages, config, commands.recall_sql(config))
    assert table["untrained"].null_count == 0
    headers = _recall_view(table.to_pylist(), config)[0]
    assert headers[4:7] == ["R@1 FSR", "R@1 untr", "R@1 base"]

    # The stored untrained embeddings are what a freshly built model gives.
    centres = arrow_to_vectors(commands.sql(all_stages, config, "SELECT centre FROM style_centres "
                                                    "ORDER BY cluster")["centre"])
    model, _ = build_model(config, centres, torch.device("cpu"))
    photos = rows(config, "SELECT image_id, path FROM gallery ORDER BY image_id LIMIT 6")
    pixels = torch.stack([to_tensor(load_rgb(p, 10**8), config.extract.image_size)
                          for _, p in photos])
    with torch.inference_mode():
        expected = model.eval().encode_image(pixels).numpy()
    stored = vectors(config, "untrained_embeddings", "image_id")
    np.testing.assert_allclose(np.stack([stored[i] for i, _ in photos]), expected, atol=1e-5)
    # Trained and untrained differ exactly when training kept an epoch after epoch 0.
    trained = vectors(config, "gallery_embeddings", "image_id")
    best = rows(config, "SELECT value FROM current_metrics WHERE stage = 'train' AND "
                        "name = 'best_epoch'")[0][0]
    same = all(np.array_equal(trained[i], stored[i]) for i in stored)
    assert same == (best == 0), best
    commands.run(all_stages,
                 load_config(finished), ["score"], progress=False)  # restore the current plan


def test_batch_protocol_keepsone_query_per_photo() -> None:
    from pipeline.evaluation import QuerySet, one_query_per_photo

    emb = np.eye(5, dtype=np.float32)
    qs = QuerySet("sketch", "none", np.array([10, 11, 12, 13, 14]), None,
                  np.array([7, 8, 7, 9, 8]), np.array(list("abacb")), emb)
    pairs = one_query_per_photo(qs)
    assert pairs.query_ids.tolist() == [10, 11, 13]
    assert pairs.targets.tolist() == [7, 8, 9] and pairs.labels.tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(pairs.emb, emb[[0, 1, 3]])
    unique = QuerySet("text", "none", np.array([1, 2]), None, np.array([5, 6]), None, emb[:2])
    assert one_query_per_photo(unique) is unique


def test_bad_images_are_recorded_once(tmp_path) -> None:
    """Images extract recorded as bad are skipped by embed and score, not recorded again (per
    score method); a query image that breaks after extract is recorded by each score method."""
    path = write_tiny_config(tmp_path, tmp_path / "run", items=ITEMS,
                             extra="\n[index]\ncheck_queries = 20\n")
    config = load_config(path, ["data.max_failure_ratio=1.0"])
    commands.run(all_stages, config, ["prepare"], progress=False)
    test_images = rows(config, "SELECT query_id, path FROM queries WHERE split = 'test' AND "
                               "path IS NOT NULL ORDER BY query_id")
    (early_id, early), (late_id, late) = test_images[0], test_images[-1]
    photo_id, photo = rows(config, "SELECT image_id, path FROM gallery WHERE split = 'train' "
                                   "ORDER BY image_id LIMIT 1")[0]
    Path(early).write_bytes(b"not an image")
    Path(photo).write_bytes(b"not a photo")
    commands.run(all_stages, config, ["index"], progress=False)
    Path(late).write_bytes(b"not an image either")
    commands.run(all_stages, config, ["score"], progress=False)

    recorded = rows(config, "SELECT stage, unit_key, item_id FROM item_failures JOIN stages "
                            "USING (stage, fingerprint) ORDER BY stage, unit_key")
    assert sorted((s, i) for s, _, i in recorded) == sorted([
        ("extract", early_id), ("extract", photo_id), ("score", late_id), ("score", late_id)])
    assert [u for s, u, _ in recorded if s == "score"] == ["baseline", "freestyle"]
    scored = {i for (i,) in rows(config, "SELECT DISTINCT query_id FROM query_embeddings")}
    assert early_id not in scored and late_id not in scored
    embedded = {i for (i,) in rows(config, "SELECT image_id FROM gallery_embeddings")}
    assert photo_id not in embedded and len(embedded) == ITEMS - 1
    assert len(scored) == rows(config, "SELECT count(*) FROM queries WHERE split = 'test'"
                                       )[0][0] - 2


def test_the_example_queries_in_docs_catalog_run(finished) -> None:
    """Every query of docs/catalog.md's "Example queries" runs on a finished run and returns
    rows (the docs name views and columns that exist); this run has no bad inputs."""
    text = (REPO_ROOT / "docs" / "catalog.md").read_text()
    block = text.split("## Example queries", 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    statements = [s for s in ("\n".join(line for line in block.splitlines()
                                          if not line.lstrip().startswith("--"))).split(";")
                  if s.strip()]
    assert len(statements) >= 15
    config = load_config(finished)
    for statement in statements:
        empty_here = "failures_by_reason" in statement or "item_failures" in statement
        assert (len(commands.sql(all_stages, config, statement)) > 0) != empty_here, statement


def test_vpt_runs_through_every_stage_and_every_table(finished) -> None:
    """Method `vpt` (random-init deep prompts, trained like FreestyleRet): its own train unit,
    gallery embeddings, index and scores, and its rows and columns in every table."""
    import torch

    from pipeline import methods
    from pipeline.cli import _paired_view, _recall_view
    from pipeline.data.images import load_rgb, to_tensor

    config = load_config(finished, ['score.methods=["freestyle", "baseline", "vpt"]'])
    reports = {r.stage: r.ran for r in commands.run(all_stages, config, ["score"], progress=False)}
    # train's plan has a unit per trained method (a new plan, so freestyle trains again).
    assert reports["train"] == 2 and reports["index"] == 3 and reports["score"] == 3
    assert rows(config, "SELECT DISTINCT method FROM train_history ORDER BY 1") == [
        ("freestyle",), ("vpt",)]
    for view in ("index_recall", "retrieval_metrics", "query_ranks", "search_results",
                 "query_embeddings"):
        assert ("vpt",) in rows(config, f"SELECT DISTINCT method FROM {view}"), view
    assert rows(config, "SELECT count(*) FROM vpt_embeddings") == [(ITEMS,)]
    table = commands.sql(all_stages, config, commands.recall_sql(config))
    assert table["vpt"].null_count == 0
    assert _recall_view(table.to_pylist(), config)[0][4:7] == [
        "R@1 FSR", "R@1 base", "R@1 vpt"]
    paired = commands.paired_table(all_stages, config)
    assert {r["versus"] for r in paired} == {"baseline", "vpt"}
    assert _paired_view(paired, config)[0][4:] == [
        "FSR vs base", "FSR vs vpt"]

    # The stored embeddings are the trained VPT model's: free tokens in every layer, no
    # Gram or style input, trained weights loaded from its own train unit.
    from pipeline.plans import fingerprints
    from pipeline.runner import upstream_inputs

    stages = all_stages()
    inputs = upstream_inputs(Catalog.in_dir(config.work_dir),
                             next(s for s in stages if s.name == "embed"),
                             fingerprints(stages, config), config.work_dir)

    class Artifacts:  # what embed reads, as its StageContext gives it
        def input_path(self, stage, kind, unit_key=None):  # noqa: ANN001, ANN202
            [path] = inputs.paths(config.work_dir, stage, kind, unit_key)
            return path

    encoders = methods.get("vpt").load(config, Artifacts(), torch.device("cpu"))
    assert encoders.gram_encoder is None
    photos = rows(config, "SELECT image_id, path FROM gallery ORDER BY image_id LIMIT 6")
    pixels = torch.stack([to_tensor(load_rgb(p, 10**8), config.extract.image_size)
                          for _, p in photos])
    with torch.inference_mode():
        expected = encoders.image(pixels, None).numpy()
    stored = vectors(config, "vpt_embeddings", "image_id")
    np.testing.assert_allclose(np.stack([stored[i] for i, _ in photos]), expected, atol=1e-5)
    commands.run(all_stages,
                 load_config(finished), ["score"], progress=False)  # restore the current plan


def test_batch_drop_last_scores_full_batches_only(finished) -> None:
    """score.batch_drop_last: the authors' DataLoader drops the last, shorter batch."""
    base = ["score.batch_pairs=3", 'score.methods=["freestyle"]']
    counts = {}
    for drop in (False, True):
        config = load_config(finished, [*base, f"score.batch_drop_last={str(drop).lower()}"])
        commands.run(all_stages, config, ["score"], progress=False)
        counts[drop] = dict(rows(config, "SELECT style || ' ' || fusion, max(n_queries) FROM "
                                         "retrieval_metrics WHERE protocol = 'batch' "
                                         "GROUP BY ALL"))
        gallery = rows(config, "SELECT DISTINCT n_queries FROM retrieval_metrics WHERE "
                               "protocol = 'gallery' AND fusion = 'none'")
        assert gallery == [(counts[False].get("sketch none"),)] or drop  # gallery: all queries
    assert counts[False].keys() == counts[True].keys()
    assert all(counts[True][s] == n // 3 * 3 for s, n in counts[False].items())
    assert any(n % 3 for n in counts[False].values()), counts  # some set lost its last batch
    commands.run(all_stages,
                 load_config(finished), ["score"], progress=False)  # restore the current plan


LOADED = ("import atexit, json, sys\n"
          "HEAVY = ('torch', 'open_clip', 'faiss', 'numpy', 'pyarrow', 'rich')\n"
          "atexit.register(lambda: print('LOADED ' + json.dumps(sorted(\n"
          "    m for m in HEAVY if m in sys.modules))))\n"
          "from pipeline.cli import app\n"
          "app(sys.argv[1:])\n")


@pytest.mark.parametrize(("args", "allowed"), [
    (["--help"], []),
    (["status"], []),
    (["sql", "SELECT stage, count(*) FROM units GROUP BY ALL"], []),
    (["run", "all"], []),  # tables from DuckDB rows; its report is current (not redrawn)
])
def test_light_commands_do_not_import_the_model_code(finished, args, allowed) -> None:
    """A finished run: `--help`, `status`, `sql` and a `run all` with nothing to do load no
    torch, open_clip or faiss, and no rich when stderr is not a terminal (issue 19: an
    instant CLI; docs/benchmarks.md)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    config = [] if args == ["--help"] else ["--config", str(finished)]
    if args[0] == "run":  # a no-op run all finds its report current (else it writes it)
        commands.report(all_stages, load_config(finished), if_stale=True)
    done = subprocess.run([sys.executable, "-c", LOADED, *args, *config], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    if args == ["run", "all"]:
        assert "Nothing to do" in done.stdout + done.stderr and "R@1" in done.stdout
    line = next(x for x in done.stdout.splitlines() if x.startswith("LOADED "))
    assert json.loads(line.removeprefix("LOADED ")) == allowed


def test_a_run_with_nothing_to_do_opens_the_catalog_once_and_writes_nothing(
        finished, monkeypatch) -> None:
    """`fsr-pipe run all` on a finished run: its plans, checks and both result tables from one
    connection, and the database file untouched (a write would checkpoint at close)."""
    import duckdb
    from typer.testing import CliRunner

    import pipeline.catalog as catalog_module
    from pipeline.cli import app

    commands.report(all_stages, load_config(finished), if_stale=True)  # current: not redrawn
    commands.run(all_stages, load_config(finished), ["all"], progress=False)  # views current
    opened, real = [], duckdb.connect
    monkeypatch.setattr(catalog_module.duckdb, "connect",
                        lambda *a, **k: opened.append(a) or real(*a, **k))
    path = load_config(finished).work_dir / "catalog.duckdb"
    before = path.stat().st_mtime_ns, path.stat().st_size
    result = CliRunner().invoke(app, ["run", "all", "--config", str(finished)])
    assert result.exit_code == 0, result.output
    assert "Nothing to do" in result.output and "R@1 FSR" in result.output
    assert len(opened) == 1
    assert (path.stat().st_mtime_ns, path.stat().st_size) == before
