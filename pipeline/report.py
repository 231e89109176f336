"""`fsr-pipe report`: one self-contained HTML page about a finished run (docs/report.md).

    from pipeline import report
    path = report.write(all_stages, config)        # <work_dir>/report.html (or out=PATH)
    report.is_current(all_stages, config, path)    # its stamp matches the score plan

`gather` reads the catalog views of the config's current plans (docs/catalog.md) into a
`ReportData`; `render` draws its charts (pipeline.report_charts, matplotlib) and fills the
Jinja2 template pipeline/templates/report.html.j2; thumbnails are downscaled with PIL and
embedded as base64, so the file opens offline. The page carries a stamp (score's
fingerprint, which chains every upstream stage's, and the report's version) in a <meta> tag:
`is_current` reads it without loading matplotlib, jinja2 or PIL, so a `run all` with nothing
to do stays light. A config whose score stage has not finished gets an error naming the
command to run, not a partial page.
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.artifacts import atomic_path
from pipeline.config import Config
from pipeline.stage import PipelineError, StageFactory

if TYPE_CHECKING:
    import numpy as np

REPORT_FILE = "report.html"
VERSION = "2"  # bump when the page changes, so `run all` rewrites older reports
STAMP = re.compile(rb'<meta name="fsr-pipe-report" content="([^"]*)"')
THUMB_PX = 96
EXAMPLES = 3      # best and worst queries shown per style
TOP = 5           # retrieved photos shown per example
STYLE_POINTS = 2000  # Gram vectors projected at most (a deterministic sample)


@dataclass(frozen=True)
class Example:
    """A query (thumbnail, or text for text queries), its target, and its top results."""

    query_id: int
    rank: int | None          # target's rank, None = not within the searched depth
    text: str | None
    thumb: str | None         # data URI
    target_thumb: str | None
    results: list[tuple[str | None, bool, float]]  # (thumbnail, is the target, score)


@dataclass(frozen=True)
class ReportData:
    stamp: str
    work_dir: str
    methods: list[tuple[str, str]]  # (name, title) of score.methods, in order
    recall: list[dict]               # retrieval_metrics, metric = 'recall'
    paired: list[dict]               # commands.paired_table
    history: list[dict]              # train_history
    cluster_quality: list[dict]      # split, purity, ari
    style_xy: list[tuple[float, float]] = field(default_factory=list)
    style_labels: list[str] = field(default_factory=list)
    style_clusters: list[int] = field(default_factory=list)
    index_recall: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    example_method: str = ""
    examples: dict[str, dict[str, list[Example]]] = field(default_factory=dict)


def default_path(config: Config) -> Path:
    return config.work_dir / REPORT_FILE


def stamp(factory: StageFactory, config: Config,
          fingerprints: dict[str, str] | None = None) -> str:
    """What a report of this config's results is stamped with (`fingerprints`: every
    stage's, when the caller has them)."""
    from pipeline import plans

    fps = fingerprints or plans.fingerprints(factory(), config)
    return f"score-{fps['score']}-v{VERSION}"


def read_stamp(path: Path) -> str | None:
    """The stamp of a report file, None when there is no file or no stamp."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except FileNotFoundError:
        return None
    found = STAMP.search(head)
    return found.group(1).decode() if found else None


def is_current(factory: StageFactory, config: Config, path: Path | None = None,
               fingerprints: dict[str, str] | None = None) -> bool:
    """The report at `path` was written for this config's current score results."""
    return read_stamp(path or default_path(config)) == stamp(factory, config, fingerprints)


def write(factory: StageFactory, config: Config, out: Path | None = None) -> Path:
    """Gather, render and write the report atomically; returns its path. Raises
    PipelineError when score has not finished for this config."""
    from pipeline import commands

    if not commands.score_finished(factory, config):
        raise PipelineError(
            f"no report: the score stage has not finished for this config in "
            f"{config.work_dir} (`fsr-pipe status` shows what is left); run `fsr-pipe run all` "
            "with the same --config/--set first")
    path = Path(out) if out is not None else default_path(config)
    if path.is_dir():
        raise PipelineError(f"--out {path} is a folder; give a file path such as "
                            f"{path / REPORT_FILE}")
    html = render(gather(factory, config))
    with atomic_path(path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return path


def gather(factory: StageFactory, config: Config) -> ReportData:
    """Everything the page shows, read from the catalog views of this config's plans."""
    from pipeline import commands, methods

    def rows(sql: str | list[str]) -> list[dict] | list[list[dict]]:
        result = commands.sql(factory, config, sql)
        return [t.to_pylist() for t in result] if isinstance(sql, list) else result.to_pylist()

    configured = [(m.name, m.title) for m in methods.configured(config)]
    first = configured[0][0]
    queries = {  # one connection for all (each `commands.sql` call opens one and plans all)
        "style": "SELECT q.style, a.cluster, g.gram FROM gram_features g "
                 "JOIN queries q USING (query_id) JOIN style_assignments a "
                 "ON a.item_kind = 'query' AND a.item_id = g.query_id "
                 f"ORDER BY hash(g.query_id), g.query_id LIMIT {STYLE_POINTS}",
        "recall": "SELECT protocol, style, fusion, k, method, value, n_queries "
                  "FROM retrieval_metrics WHERE metric = 'recall' ORDER BY ALL",
        "history": "SELECT method, epoch, loss, val_recall_at_1 FROM train_history "
                   "ORDER BY method, epoch",
        "cluster": "SELECT name, labels_json, value FROM current_metrics WHERE stage = 'cluster'",
        "index": "SELECT * FROM index_recall ORDER BY method, rerank_k, nprobe",
        "failures": "SELECT * FROM failures_by_reason ORDER BY items DESC, stage, reason",
    }
    if len(configured) > 1:
        queries["paired"] = commands.paired_sql(config)
    got = dict(zip(queries, rows(list(queries.values()))))
    xy, labels, clusters = style_points(got["style"])
    return ReportData(
        stamp=stamp(factory, config), work_dir=str(config.work_dir), methods=configured,
        recall=got["recall"],
        paired=commands.with_pooled_and_p(got["paired"]) if "paired" in got else [],
        history=got["history"], cluster_quality=cluster_quality(got["cluster"]),
        style_xy=xy, style_labels=labels, style_clusters=clusters,
        index_recall=got["index"], failures=got["failures"],
        example_method=first,
        examples=examples(rows, first, config.data.max_image_pixels))


def cluster_quality(rows: list[dict]) -> list[dict]:
    """current_metrics rows of cluster -> [{split, purity, ari}] per split."""
    by_split: dict[str, dict] = {}
    for r in rows:
        split = json.loads(r["labels_json"] or "{}").get("split")
        if split is not None and r["name"] in ("purity", "adjusted_rand_index"):
            key = "ari" if r["name"] == "adjusted_rand_index" else "purity"
            by_split.setdefault(split, {"split": split})[key] = r["value"]
    return [by_split[s] for s in sorted(by_split)]


def style_points(rows: list[dict]) -> tuple[list[tuple[float, float]], list[str], list[int]]:
    """PCA of the Gram vectors to 2-D: (points, their true styles, their clusters)."""
    import numpy as np

    if not rows:
        return [], [], []
    grams = np.asarray([r["gram"] for r in rows], dtype=np.float64)
    xy = pca_2d(grams)
    return ([(float(x), float(y)) for x, y in xy], [r["style"] for r in rows],
            [int(r["cluster"]) for r in rows])


def pca_2d(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, 2): the rows projected on their two principal axes (zeros where the
    data has fewer dimensions), each axis's sign fixed so the result is deterministic."""
    import numpy as np

    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = np.zeros((2, x.shape[1]))
    axes[: min(2, len(vt))] = vt[:2]
    for axis in axes:  # sign: the largest component positive
        if axis[np.argmax(np.abs(axis))] < 0:
            axis *= -1
    return centred @ axes.T


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def examples(rows: Any, method: str,
             max_pixels: int) -> dict[str, dict[str, list[Example]]]:
    """Per single query style: the EXAMPLES best and worst queries of `method` on the
    gallery protocol (by the target's rank, misses last; ties by id), none in both lists."""
    ranked = rows(
        "SELECT r.style, r.query_id, r.target_id, r.rank, q.path, q.text, g.path AS target, "
        "row_number() OVER (PARTITION BY r.style ORDER BY r.rank NULLS LAST, r.query_id) AS n, "
        "count(*) OVER (PARTITION BY r.style) AS total "
        "FROM query_ranks r JOIN queries q USING (query_id) "
        "LEFT JOIN gallery g ON g.image_id = r.target_id "
        f"WHERE r.method = {_literal(method)} AND r.protocol = 'gallery' "
        f"AND r.fusion = 'none' QUALIFY n <= least({EXAMPLES}, (total + 1) // 2) "
        f"OR n > total - least({EXAMPLES}, total // 2) ORDER BY r.style, n")
    if not ranked:
        return {}
    ids = ", ".join(str(int(r["query_id"])) for r in ranked)
    results = rows(
        "SELECT s.query_id, s.rank, s.image_id, s.score, g.path FROM search_results s "
        "LEFT JOIN gallery g USING (image_id) "
        f"WHERE s.method = {_literal(method)} AND s.fusion = 'none' AND s.rank <= {TOP} "
        f"AND s.query_id IN ({ids}) ORDER BY s.query_id, s.rank")
    thumbs: dict[str, str | None] = {}
    out: dict[str, dict[str, list[Example]]] = {}
    for r in ranked:
        mine = [x for x in results if x["query_id"] == r["query_id"]]
        example = Example(
            query_id=r["query_id"], rank=r["rank"], text=r["text"],
            thumb=_thumb(r["path"], thumbs, max_pixels),
            target_thumb=_thumb(r["target"], thumbs, max_pixels),
            results=[(_thumb(x["path"], thumbs, max_pixels), x["image_id"] == r["target_id"],
                      x["score"]) for x in mine])
        best = r["n"] <= min(EXAMPLES, (r["total"] + 1) // 2)
        out.setdefault(r["style"], {"best": [], "worst": []})[
            "best" if best else "worst"].append(example)
    for lists in out.values():
        lists["worst"].reverse()  # worst first
    return out


def _thumb(path: str | None, cache: dict[str, str | None], max_pixels: int) -> str | None:
    if path is None:
        return None
    if path not in cache:
        cache[path] = thumbnail(path, max_pixels=max_pixels)
    return cache[path]


def thumbnail(path: str, size: int = THUMB_PX, max_pixels: int = 40_000_000) -> str | None:
    """A JPEG data URI of the image at `path` (read as the stages read images: EXIF-upright
    RGB, at most `max_pixels`) downscaled to fit size x size px; None when it cannot be read
    (a bad input the page shows as such)."""
    from pipeline.data.images import BadInput, load_rgb

    try:
        image = load_rgb(path, max_pixels)
    except BadInput:
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render(data: ReportData) -> str:
    """The page: charts drawn from `data`, the template filled (autoescaped)."""
    import jinja2

    from pipeline import report_charts as charts

    titles = dict(data.methods)
    shorts = _shorts(data.methods)
    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline", "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    return env.get_template("report.html.j2").render(
        data=data, titles=titles, charts=_charts(data, shorts, charts),
        paired_k=min((r["k"] for r in data.paired), default=None),
        recall_tables=_recall_tables(data), flat_index=_flat_index(data.index_recall))


def _shorts(configured: list[tuple[str, str]]) -> dict[str, str]:
    from pipeline import methods

    known = methods.registered()
    return {name: known[name].short if name in known else name for name, _ in configured}


def _charts(data: ReportData, shorts: dict[str, str], charts: Any) -> dict[str, str]:
    """chart id -> data URI, only for the sections that have data."""
    out: dict[str, str] = {}
    labels = [(name, shorts[name]) for name, _ in data.methods]
    for protocol in ("gallery", "batch"):
        mine = [r for r in data.recall if r["protocol"] == protocol]
        if mine:
            out[f"recall-{protocol}"] = charts.recall_bars(
                mine, labels, f"Recall@K, {protocol} protocol")
    if data.paired:
        k = min(r["k"] for r in data.paired)
        first = shorts[data.methods[0][0]]
        for protocol in ("gallery", "batch"):
            mine = [r for r in data.paired if r["protocol"] == protocol and r["k"] == k]
            if mine:
                out[f"paired-{protocol}"] = charts.paired_bars(
                    mine, shorts, f"{first} query by query at R@{k}, {protocol} protocol")
    if data.history:
        out["training"] = charts.training_curves(data.history, shorts)
    if data.style_xy:
        out["style-space"] = charts.style_space(data.style_xy, data.style_labels,
                                                data.style_clusters)
    for chart, knob in (("index-recall", "nprobe"), ("index-recall-hnsw", "ef_search")):
        tuned = [r for r in data.index_recall if (r.get(knob) or 0) > 0]
        if tuned:
            out[chart] = charts.index_recall(tuned, shorts, knob)
    return out


def _recall_tables(data: ReportData) -> dict[str, dict]:
    """protocol -> {ks, rows: [(style, fusion, n, {(k, method): value})]} for the tables."""
    out: dict[str, dict] = {}
    for r in data.recall:
        table = out.setdefault(r["protocol"], {"ks": set(), "rows": {}})
        table["ks"].add(r["k"])
        row = table["rows"].setdefault((r["style"], r["fusion"]), {"n": 0, "values": {}})
        row["n"] = max(row["n"], r["n_queries"])
        row["values"][(r["k"], r["method"])] = r["value"]
    for table in out.values():
        table["ks"] = sorted(table["ks"])
        table["rows"] = sorted(table["rows"].items(), key=lambda i: (i[0][1] != "none", i[0]))
    return dict(sorted(out.items(), key=lambda i: i[0] != "gallery"))


def _flat_index(rows: list[dict]) -> bool:
    """No index has a search knob (neither IVF nor HNSW): nothing to plot."""
    return bool(rows) and all(not r.get("nprobe") and not r.get("ef_search") for r in rows)
