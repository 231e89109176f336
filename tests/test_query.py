"""`fsr-pipe query` on a tiny finished demo run: single, image and fused queries give what the
score stage stored for the same queries (same model, index, re-ranking, fusion rules); every
option of the command; batch mode from CSV and Parquet; the errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_tiny_config
from typer.testing import CliRunner

from pipeline import commands
from pipeline.catalog import Catalog
from pipeline.cli import app
from pipeline.config import FUSIONS, load_config
from pipeline.query import Query, open_searcher
from stages import all_stages

METHODS = ("freestyle", "untrained", "baseline")
IMAGE_STYLES = ("sketch", "art", "lowres")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("query")
    path = write_tiny_config(directory, directory / "run", items=24, extra=(
        "\n[index]\ncheck_queries = 20\n"
        f"\n[score]\nmethods = {json.dumps(list(METHODS))}\n"))
    commands.run(all_stages, load_config(path), ["all"], progress=False)
    return path


def rows(config, sql: str) -> list[tuple]:
    return Catalog.in_dir(config.work_dir).rows(sql)


def stored(config, method: str, style: str, fusion: str) -> dict[tuple, tuple[list, list]]:
    """(query_id, partner_id) -> (image ids, scores) the score stage kept, best first."""
    return {(q, p): (ids, scores) for q, p, ids, scores in rows(config, (
        "SELECT query_id, partner_id, list(image_id ORDER BY rank), list(score ORDER BY rank) "
        f"FROM search_results WHERE method = '{method}' AND style = '{style}' AND "
        f"fusion = '{fusion}' GROUP BY ALL"))}


def split_queries(config) -> dict[str, list[tuple[int, int, str | None, str | None]]]:
    """style -> [(query_id, photo id, path, text)] of the test split, by query id."""
    out: dict[str, list] = {}
    for qid, image_id, style, path, text in rows(config, (
            "SELECT query_id, image_id, style, path, text FROM queries WHERE split = 'test' "
            "ORDER BY query_id")):
        out.setdefault(style, []).append((qid, image_id, path, text))
    return out


def same_ranking(got_ids, got_scores, want_ids, want_scores) -> None:
    """Same scores; same ids, up to the order of items whose scores tie (to float32)."""
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-4, atol=1e-5)
    if list(got_ids) != list(want_ids):
        key = [(round(float(s), 4), i) for i, s in zip(got_ids, got_scores)]
        want = [(round(float(s), 4), i) for i, s in zip(want_ids, want_scores)]
        assert sorted(key) == sorted(want), (list(got_ids), list(want_ids))


def cli(*args: str, config: Path | None = None):
    extra = [] if config is None else ["--config", str(config)]
    return CliRunner().invoke(app, ["query", *args, *extra])


# ---------------------------------------------------------------- same as the score stage


@pytest.mark.parametrize("method", METHODS)
def test_every_query_kind_matches_what_score_stored(finished, method) -> None:
    """Every test query the score stage searched (text, each image style, each fused pair
    under each fusion), asked again through query: the same embeddings and the same top 10."""
    config = load_config(finished)
    searcher = open_searcher(all_stages, config, method, k=config.score.keep_k)
    by_style = split_queries(config)
    emb = {q: np.asarray(e, np.float32) for q, e in rows(config, (
        "SELECT query_id, embedding FROM query_embeddings WHERE method = "
        f"'{method}'"))}
    # Single styles: one batch with all of them (mixed kinds in one batch).
    singles = [(style, q) for style in ("text", *IMAGE_STYLES) for q in by_style[style]]
    queries = [Query(text=text) if style == "text" else Query(image=path)
               for style, (_, _, path, text) in singles]
    text_emb, image_emb, errors = searcher.encode(queries)
    assert not errors
    for row, (style, (qid, *_)) in enumerate(singles):
        got = text_emb[row] if style == "text" else image_emb[row]
        np.testing.assert_allclose(got, emb[qid], atol=1e-5)
    answers = searcher.search(queries, "softmax-max")
    kept = {style: stored(config, method, style, "none") for style in ("text", *IMAGE_STYLES)}
    for (style, (qid, *_)), answer in zip(singles, answers):
        want_ids, want_scores = kept[style][(qid, None)]
        same_ranking(answer.ids, answer.scores, want_ids, want_scores)
    # Fused pairs: the image query (first of its style per photo) and its photo's text.
    text_of = {}
    for qid, photo, _, text in by_style["text"]:
        text_of.setdefault(photo, (qid, text))
    checked = 0
    for style in IMAGE_STYLES:
        firsts = {}
        for qid, photo, path, _ in by_style[style]:
            firsts.setdefault(photo, (qid, path))
        pairs = [(qid, path, *text_of[photo]) for photo, (qid, path) in firsts.items()
                 if photo in text_of]
        queries = [Query(text=text, image=path) for _, path, _, text in pairs]
        for fusion in FUSIONS:
            kept = stored(config, method, f"{style}+text", fusion)
            for (qid, _, tid, _), answer in zip(pairs, searcher.search(queries, fusion)):
                same_ranking(answer.ids, answer.scores, *kept[(qid, tid)])
                checked += 1
    assert checked >= len(IMAGE_STYLES) * len(FUSIONS)


def test_fusions_differ_and_k_limits(finished) -> None:
    config = load_config(finished)
    searcher = open_searcher(all_stages, config, "freestyle", k=3)
    by_style = split_queries(config)
    _, _, path, _ = by_style["sketch"][0]
    query = Query(text="a red circle", image=path)
    got = {f: searcher.search([query], f)[0] for f in FUSIONS}
    assert all(len(a.ids) == 3 for a in got.values())
    assert (got["softmax-max"].scores <= 0).all()  # log-probabilities
    assert (np.abs(got["cosine-max"].scores) <= 1 + 1e-5).all()  # cosines
    # mean searches one embedding, the max rules two: the scores are on different scales.
    assert not np.allclose(got["mean"].scores, got["cosine-max"].scores)


# ---------------------------------------------------------------- the command, single query


def test_text_query_prints_a_table(finished) -> None:
    result = cli("--text", "a large orange diamond", "--k", "4", config=finished)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for header in ("rank", "image_id", "path", "class", "score"):
        assert header in out
    assert "freestyle: text 'a large orange diamond', top 4" in out
    lines = [x for x in out.splitlines() if x.startswith("│")]
    assert [x.split("│")[1].strip() for x in lines] == ["1", "2", "3", "4"]


@pytest.mark.parametrize("method", METHODS)
def test_json_image_query_per_method_equals_the_stored_results(finished, method) -> None:
    config = load_config(finished)
    qid, _, path, _ = split_queries(config)["art"][1]
    result = cli("--image", path, "--method", method, "--json", config=finished)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == method and data["image"] == path and data["fusion"] is None
    want_ids, want_scores = stored(config, method, "art", "none")[(qid, None)]
    got = data["results"]
    assert [r["rank"] for r in got] == list(range(1, 11))
    same_ranking([r["image_id"] for r in got], [r["score"] for r in got], want_ids, want_scores)
    # path and class: the gallery's
    meta = dict((i, (p, c)) for i, p, c in rows(
        config, "SELECT image_id, path, class_label FROM gallery"))
    assert all(meta[r["image_id"]] == (r["path"], r["class"]) for r in got)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_csv_fused_query_per_fusion(finished, fusion) -> None:
    config = load_config(finished)
    by_style = split_queries(config)
    qid, photo, path, _ = by_style["sketch"][0]
    tid, text = next((q, t) for q, p, _, t in by_style["text"] if p == photo)
    result = cli("--image", path, "--text", text, "--fusion", fusion, "--k", "5", "--csv",
                 config=finished)
    assert result.exit_code == 0, result.output
    got = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(got[0]) == ["rank", "image_id", "path", "class", "score"]
    assert [int(r["rank"]) for r in got] == [1, 2, 3, 4, 5]
    want_ids, want_scores = stored(config, "freestyle", "sketch+text", fusion)[(qid, tid)]
    same_ranking([int(r["image_id"]) for r in got], [float(r["score"]) for r in got],
                 want_ids[:5], want_scores[:5])


def test_default_fusion_is_softmax_max(finished) -> None:
    config = load_config(finished)
    _, _, path, _ = split_queries(config)["lowres"][0]
    default = json.loads(cli("--image", path, "--text", "a dot", "--json",
                             config=finished).stdout)
    explicit = json.loads(cli("--image", path, "--text", "a dot", "--json", "--fusion",
                              "softmax-max", config=finished).stdout)
    assert default["fusion"] == "softmax-max" and default["results"] == explicit["results"]


# ---------------------------------------------------------------- batch mode


def batch_rows(config) -> tuple[list[dict], list[Query]]:
    """A query file's rows (good ones of each kind and two bad ones) and their queries."""
    by_style = split_queries(config)
    sketch = by_style["sketch"][0][2]
    art = by_style["art"][0][2]
    text = by_style["text"][0][3]
    file_rows = [
        {"id": "t", "text": text, "image": None},
        {"id": "s", "text": None, "image": sketch},
        {"id": "f", "text": text, "image": art},
        {"id": "empty", "text": "  ", "image": None},
        {"id": "broken", "text": None, "image": str(Path(art).with_name("missing.png"))},
    ]
    return file_rows, [Query(text=text), Query(image=sketch), Query(text=text, image=art)]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_batch_writes_parquet_of_every_row(finished, tmp_path, suffix) -> None:
    config = load_config(finished)
    file_rows, good = batch_rows(config)
    path = tmp_path / f"queries{suffix}"
    if suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["id", "text", "image"])
            writer.writeheader()
            writer.writerows({k: v or "" for k, v in r.items()} for r in file_rows)
    else:
        pq.write_table(pa.Table.from_pylist(file_rows), path)
    out = tmp_path / "out" / "results.parquet"
    args = ["--queries", str(path), "--k", "4", "--fusion", "cosine-max"]
    result = cli(*args, "--out", str(out), config=finished)
    assert result.exit_code == 0, result.output
    assert "5 queries" in result.stderr and "row 3: empty query" in result.stderr
    assert "row 4: cannot read image" in result.stderr
    table = pq.read_table(out)
    assert table.column_names == ["query_row", "rank", "image_id", "score", "error", "id"]
    got = table.to_pylist()
    assert [r["query_row"] for r in got] == [0] * 4 + [1] * 4 + [2] * 4 + [3, 4]
    assert [r["rank"] for r in got[:12]] == [1, 2, 3, 4] * 3
    assert [r["id"] for r in got[:12:4]] == ["t", "s", "f"] and got[-1]["id"] == "broken"
    assert all(r["error"] is None for r in got[:12])
    assert got[12]["error"].startswith("empty query") and got[12]["image_id"] is None
    assert "cannot read image" in got[13]["error"] and got[13]["rank"] is None
    # Each good row: what a single query of the same kind finds.
    searcher = open_searcher(all_stages, config, "freestyle", k=4)
    for row, answer in enumerate(searcher.search(good, "cosine-max")):
        mine = [r for r in got if r["query_row"] == row]
        assert [r["image_id"] for r in mine] == answer.ids.tolist()
        np.testing.assert_allclose([r["score"] for r in mine], answer.scores, rtol=1e-6)
    assert not list(tmp_path.glob("out/.*"))  # no temporary file left


def test_batch_default_out_streams_batches_and_relative_images(finished, tmp_path) -> None:
    """Rows in several batches (score.batch_size = 2), image paths relative to the file,
    written beside it as FILE.results.parquet; no `id` column, none in the output."""
    config = load_config(finished)
    by_style = split_queries(config)
    sketches = [p for style in IMAGE_STYLES for _, _, p, _ in by_style[style]][:5]
    assert len(sketches) == 5
    folder = tmp_path / "q"
    folder.mkdir()
    for i, p in enumerate(sketches):
        (folder / f"{i}.png").write_bytes(Path(p).read_bytes())
    pq.write_table(pa.table({"image": [f"{i}.png" for i in range(5)]}), folder / "mine.parquet")
    result = cli("--queries", str(folder / "mine.parquet"), "--k", "2", "--set",
                 "score.batch_size=2", config=finished)
    assert result.exit_code == 0, result.output
    table = pq.read_table(folder / "mine.results.parquet")
    assert table.column_names == ["query_row", "rank", "image_id", "score", "error"]
    assert table["query_row"].to_pylist() == [i // 2 for i in range(10)]
    assert pq.ParquetFile(folder / "mine.results.parquet").num_row_groups == 3  # 2 + 2 + 1
    searcher = open_searcher(all_stages, config, "freestyle", k=2)
    want = searcher.search([Query(image=p) for p in sketches])
    assert table["image_id"].to_pylist() == [i for a in want for i in a.ids.tolist()]


# ---------------------------------------------------------------- errors


def one_red_line(result, code: int, *words: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    error = [x for x in lines if x.startswith("error:")]
    assert len(error) == 1, result.stderr
    assert all(w in error[0] for w in words), error[0]


def test_no_finished_run_names_the_stage_to_run(finished, tmp_path) -> None:
    fresh = cli("--text", "x", "--set", f'run.work_dir="{tmp_path / "none"}"', config=finished)
    one_red_line(fresh, 1, "no finished run", "stage ingest has not run",
                 "fsr-pipe run index")
    # The same run under a config whose index is not built yet (a new index plan).
    stale = cli("--text", "x", "--set", "index.check_queries=10", config=finished)
    one_red_line(stale, 1, "no finished run", "stage index has not run", "fsr-pipe run index")


def test_unreadable_image(finished, tmp_path) -> None:
    missing = cli("--image", str(tmp_path / "nope.png"), config=finished)
    one_red_line(missing, 1, "cannot read image", "nope.png", "no such file")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    one_red_line(cli("--image", str(broken), "--text", "a dot", config=finished), 1,
                 "cannot read image", "broken.png")


def test_empty_text_and_empty_query(finished) -> None:
    one_red_line(cli("--text", "   ", config=finished), 1, "empty text")
    one_red_line(cli(config=finished), 2, "--text, --image or both")


def test_unknown_and_unindexed_methods(finished) -> None:
    one_red_line(cli("--text", "x", "--method", "nope", config=finished), 2,
                 "unknown method 'nope'", "freestyle, untrained, baseline")
    one_red_line(cli("--text", "x", "--method", "vpt", config=finished), 2,
                 "'vpt' was not indexed", "score.methods", "fsr-pipe run index")


def test_option_errors(finished, tmp_path) -> None:
    one_red_line(cli("--text", "x", "--fusion", "max", config=finished), 2,
                 "unknown fusion 'max'", "softmax-max, cosine-max, mean")
    one_red_line(cli("--text", "x", "--json", "--csv", config=finished), 2, "not both")
    path = tmp_path / "q.csv"
    path.write_text("text\nx\n")
    one_red_line(cli("--queries", str(path), "--text", "x", config=finished), 2,
                 "leave out --text")
    one_red_line(cli("--text", "x", "--out", str(tmp_path / "o.parquet"), config=finished), 2,
                 "--out is for batch mode")
    wrong = tmp_path / "q.tsv"
    wrong.write_text("text\nx\n")
    one_red_line(cli("--queries", str(wrong), config=finished), 2, ".csv or .parquet")
    columns = tmp_path / "cols.csv"
    columns.write_text("caption\nx\n")
    one_red_line(cli("--queries", str(columns), config=finished), 2,
                 "no `text` or `image` column", "caption")
    one_red_line(cli("--queries", str(tmp_path / "absent.csv"), config=finished), 1,
                 "no query file")
    assert cli("--k", "0", "--text", "x", config=finished).exit_code == 2  # typer: min=1


def test_query_help_loads_no_model_code() -> None:
    """`fsr-pipe query --help` stays instant: torch, open_clip and faiss load in the command."""
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT

    code = ("import sys\nfrom pipeline.cli import app\n"
            "try:\n    app(['query', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in ('torch', 'open_clip', 'faiss') "
            "if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert "--queries" in done.stdout and "LOADED []" in done.stdout, done.stdout + done.stderr


def test_a_config_that_trains_nothing_can_be_queried(finished) -> None:
    """score.methods = ["baseline"]: train plans no unit, and query still finds the run done."""
    only = 'score.methods=["baseline"]'
    commands.run(all_stages, load_config(finished, [only]), ["index"], progress=False)
    result = cli("--text", "a red circle", "--json", "--set", only, config=finished)
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["results"]) == 10
    commands.run(all_stages, load_config(finished), ["score"],
                 progress=False)  # the other tests' plans again
