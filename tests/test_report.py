"""`fsr-pipe report`: the HTML page of a finished tiny demo run, its data against the catalog,
its rendering in headless Chromium (no console errors, every chart and thumbnail decoded, a
non-blank screenshot), runs without the other methods or with bad inputs, the errors, and
`run all` keeping a current report without loading the plotting code."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, write_tiny_config
from typer.testing import CliRunner

from pipeline import commands, report
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.stage import PipelineError
from stages import all_stages

ITEMS = 24
METHODS = 'score.methods=["freestyle", "untrained", "baseline"]'
IVF = "\n[index]\ncheck_queries = 20\nfactory = \"IVF4,Flat\"\ncheck_nprobe = [1, 4]\n"
STYLES = ["art", "lowres", "sketch", "text"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A tiny run of three methods on an IVF index, scored, with its report written."""
    directory = tmp_path_factory.mktemp("report")
    path = write_tiny_config(directory, directory / "run", items=ITEMS, extra=IVF)
    commands.run(all_stages, load_config(path, [METHODS]), ["all"], progress=False)
    result = CliRunner().invoke(app, ["report", "--config", str(path), "--set", METHODS])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(directory / "run" / "report.html")
    return path


class Page(HTMLParser):
    """The elements of a report: ids, <img> attributes, classes, text (stdlib only)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.ids: dict[str, dict] = {}
        self.images: list[dict] = []
        self.classes: list[str] = []
        self.text: list[str] = []
        self.body: dict = {}
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids[attrs["id"]] = {"tag": tag, **attrs}
        if tag == "img":
            self.images.append(attrs)
        if tag == "body":
            self.body = attrs
        self.classes += (attrs.get("class") or "").split()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def page_of(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def rows(config, sql: str) -> list[dict]:
    return commands.sql(all_stages, config, sql).to_pylist()


CHARTS = {"chart-recall-gallery", "chart-recall-batch", "chart-paired-gallery",
          "chart-paired-batch", "chart-training", "chart-style-space", "chart-index-recall"}


def test_report_has_every_section_with_data(finished) -> None:
    config = load_config(finished, [METHODS])
    page = page_of(config.work_dir / "report.html")
    charts = {i for i, a in page.ids.items() if a["tag"] == "img"}
    assert charts == CHARTS
    for chart in CHARTS:
        assert page.ids[chart]["src"].startswith("data:image/svg+xml;base64,")
    assert {"table-recall-gallery", "table-recall-batch", "table-paired", "table-cluster",
            "table-index", "no-failures"} <= page.ids.keys()
    assert "no-paired" not in page.ids and "flat-index" not in page.ids
    # Nothing is fetched: every image is embedded, no script or stylesheet has a src/href.
    html = (config.work_dir / "report.html").read_text()
    assert all(i["src"].startswith("data:image/") for i in page.images)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert report.read_stamp(config.work_dir / "report.html") == report.stamp(all_stages, config)


def test_report_numbers_come_from_the_catalog(finished) -> None:
    """The Recall@K table cells, purity/ARI and failure rows equal the catalog's values."""
    config = load_config(finished, [METHODS])
    data = report.gather(all_stages, config)
    expected = rows(config, "SELECT protocol, style, fusion, k, method, value, n_queries FROM "
                            "retrieval_metrics WHERE metric = 'recall' ORDER BY ALL")
    assert data.recall == expected and len(expected) > 0
    assert [m for m, _ in data.methods] == ["freestyle", "untrained", "baseline"]
    assert {r["versus"] for r in data.paired} == {"untrained", "baseline"}
    metrics = {(r["name"], json.loads(r["labels_json"]).get("split")): r["value"]
               for r in rows(config, "SELECT * FROM current_metrics WHERE stage = 'cluster'")}
    assert data.cluster_quality == [
        {"split": s, "purity": metrics["purity", s], "ari": metrics["adjusted_rand_index", s]}
        for s in ("test", "train")]
    assert {r["method"] for r in data.history} == {"freestyle"}
    assert {r["nprobe"] for r in data.index_recall} == {1, 4}
    assert data.failures == []
    queries = rows(config, "SELECT count(*) AS n FROM gram_features")[0]["n"]
    assert len(data.style_xy) == len(data.style_labels) == len(data.style_clusters) == queries
    assert set(data.style_labels) == {"art", "lowres", "sketch"}
    html = (config.work_dir / "report.html").read_text()
    first = next(r for r in expected if r["protocol"] == "gallery")
    assert f"{first['value']:.3f}" in html


def test_examples_are_the_best_and_worst_queries_with_their_results(finished) -> None:
    config = load_config(finished, [METHODS])
    data = report.gather(all_stages, config)
    assert data.example_method == "freestyle" and sorted(data.examples) == STYLES
    ranks = rows(config, "SELECT style, query_id, target_id, rank FROM query_ranks WHERE "
                         "method = 'freestyle' AND protocol = 'gallery' AND fusion = 'none'")
    for style, lists in data.examples.items():
        mine = sorted((r for r in ranks if r["style"] == style),
                      key=lambda r: (r["rank"] is None, r["rank"] or 0, r["query_id"]))
        best, worst = (min(report.EXAMPLES, (len(mine) + 1) // 2),
                       min(report.EXAMPLES, len(mine) // 2))
        assert [e.query_id for e in lists["best"]] == [r["query_id"] for r in mine[:best]]
        assert [e.query_id for e in lists["worst"]] == [
            r["query_id"] for r in mine[::-1][:worst]]
        for e in lists["best"] + lists["worst"]:
            row = next(r for r in ranks if r["query_id"] == e.query_id)
            assert e.rank == row["rank"]
            assert len(e.results) == report.TOP
            assert [hit for _, hit, _ in e.results] == [
                row["rank"] == i for i in range(1, report.TOP + 1)]
            assert all(t is not None for t, _, _ in e.results) and e.target_thumb
            assert (e.text is not None) == (style == "text") and (e.thumb is None) == (
                style == "text")
    page = page_of(config.work_dir / "report.html")
    shown = sum(len(v["best"]) + len(v["worst"]) for v in data.examples.values())
    assert page.classes.count("example") == shown
    assert page.classes.count("result-thumb") == shown * report.TOP
    assert page.classes.count("hit") == sum(
        1 for v in data.examples.values() for e in v["best"] + v["worst"]
        if e.rank is not None and e.rank <= report.TOP)
    text = data.examples["text"]
    assert page.classes.count("querytext") == len(text["best"]) + len(text["worst"]) > 0


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium; .ci/run "
                    "installs it when it can)")
    return found


def browse(path: Path, tmp: Path) -> tuple[Page, list[str], Path]:
    """Load the page in headless Chromium: (the DOM after load, the page's console lines,
    a 1200x3000 screenshot)."""
    browser = chromium()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp / 'chromium'}", "--enable-logging=stderr", "--v=0"]
    url = path.resolve().as_uri()
    loaded = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                            timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    console = [line for line in loaded.stderr.splitlines() if ":CONSOLE" in line]
    shot = tmp / "screenshot.png"
    done = subprocess.run([*flags, "--window-size=1200,3000", f"--screenshot={shot}", url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    return Page(loaded.stdout), console, shot


def assert_renders(path: Path, tmp: Path, charts: set[str]) -> Page:
    """Chromium loads the page with no console message, decodes every image, shows `charts`,
    and the screenshot is not blank."""
    from PIL import Image

    dom, console, shot = browse(path, tmp)
    assert console == [], console
    images = len(page_of(path).images)
    assert dom.body.get("data-images-broken") == "0", dom.body
    assert dom.body.get("data-images-loaded") == str(images)
    assert {i for i, a in dom.ids.items() if a["tag"] == "img"} == charts
    with Image.open(shot) as image:
        assert image.size == (1200, 3000)
        grey = np.asarray(image.convert("L"), dtype=np.float32)
    assert grey.std() > 20 and (grey < 128).mean() > 0.01  # text and charts, not a blank page
    return dom


def test_report_renders_in_chromium(finished, tmp_path) -> None:
    config = load_config(finished, [METHODS])
    dom = assert_renders(config.work_dir / "report.html", tmp_path, CHARTS)
    assert dom.classes.count("result-thumb") >= 4 * 2 * report.TOP


@pytest.mark.parametrize(("methods", "absent"), [
    (["freestyle"], {"chart-paired-gallery", "chart-paired-batch"}),
    (["baseline"], {"chart-paired-gallery", "chart-paired-batch", "chart-training"}),
])
def test_report_of_a_run_with_one_method(finished, tmp_path, methods, absent) -> None:
    """No other method: no query-by-query section (a note says why); baseline only: no
    training curve either. The page still renders."""
    config = load_config(finished, [f"score.methods={json.dumps(methods)}"])
    commands.run(all_stages, config, ["score"], progress=False)
    out = tmp_path / "one.html"
    path, written = commands.report(all_stages, config, out)
    assert path == out and written
    page = page_of(out)
    assert "no-paired" in page.ids and "table-paired" not in page.ids
    assert ("no-training" in page.ids) == ("chart-training" in absent)
    assert_renders(out, tmp_path, CHARTS - absent)
    assert report.gather(all_stages, config).example_method == methods[0]


def test_report_of_a_run_with_bad_inputs(tmp_path) -> None:
    """Bad images are listed by stage and reason; the examples skip them; it renders."""
    path = write_tiny_config(tmp_path, tmp_path / "run", items=ITEMS,
                             extra="\n[index]\ncheck_queries = 20\n")
    config = load_config(path, ["data.max_failure_ratio=1.0"])
    commands.run(all_stages, config, ["prepare"], progress=False)
    query = rows(config, "SELECT path FROM queries WHERE split = 'test' AND style = 'sketch' "
                         "ORDER BY query_id LIMIT 1")[0]["path"]
    photo = rows(config, "SELECT path FROM gallery WHERE split = 'train' ORDER BY image_id "
                         "LIMIT 1")[0]["path"]
    Path(query).write_bytes(b"not an image")
    Path(photo).write_bytes(b"not a photo")
    commands.run(all_stages, config, ["all"], progress=False)
    out, _ = commands.report(all_stages, config)
    data = report.gather(all_stages, config)
    assert sorted((f["stage"], f["item_kind"], f["items"]) for f in data.failures) == [
        ("extract", "gallery", 1), ("extract", "query", 1)]
    page = page_of(out)
    assert "table-failures" in page.ids and "no-failures" not in page.ids
    assert page.classes.count("failure") == 2
    html = out.read_text()
    assert query in html and photo in html  # each reason's example path
    assert sorted(data.examples) == STYLES
    bad_id = rows(config, "SELECT query_id FROM queries WHERE path = '" + query + "'")
    shown = {e.query_id for v in data.examples.values() for e in v["best"] + v["worst"]}
    assert bad_id[0]["query_id"] not in shown
    assert "flat-index" in page.ids  # the default index here is exact
    assert_renders(out, tmp_path, CHARTS - {"chart-index-recall"})


def test_report_before_score_finished_says_what_to_run(tmp_path) -> None:
    path = write_tiny_config(tmp_path, tmp_path / "run")
    result = CliRunner().invoke(app, ["report", "--config", str(path)])
    assert result.exit_code == 1
    assert "score stage has not finished" in result.output
    assert "fsr-pipe run all" in result.output
    assert not (tmp_path / "run" / "report.html").exists()
    with pytest.raises(PipelineError, match="fsr-pipe run all"):
        report.write(all_stages, load_config(path))


def test_report_out_option_and_errors(finished, tmp_path) -> None:
    out = tmp_path / "sub" / "mine.html"
    args = ["report", "--config", str(finished), "--set", METHODS]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0 and result.output.strip() == str(out)
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    assert not list(out.parent.glob(".*.tmp"))  # the temporary file was renamed
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 1 and "is a folder" in result.output
    result = CliRunner().invoke(app, [*args, "--set", "report.colour=1"])
    assert result.exit_code == 2 and "report" in result.output


LOADED = ("import atexit, json, sys\n"
          "HEAVY = ('matplotlib', 'jinja2', 'PIL', 'torch', 'faiss')\n"
          "atexit.register(lambda: print('LOADED ' + json.dumps(sorted(\n"
          "    m for m in HEAVY if m in sys.modules))))\n"
          "from pipeline.cli import app\n"
          "app(sys.argv[1:])\n")


def test_run_all_writes_the_report_once(finished) -> None:
    """`run all` writes the report when it is missing or stale and prints its path; with
    nothing to do and a current report it keeps the file and loads no plotting code."""
    config = load_config(finished, [METHODS])
    path = config.work_dir / "report.html"
    args = ["run", "all", "--config", str(finished), "--set", METHODS]
    path.unlink()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"Report: {path}" in " ".join(result.output.split())
    before = (path.stat().st_mtime_ns, path.read_bytes())
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", LOADED, *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Report:" in done.stdout + done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("LOADED "))
    assert json.loads(line.removeprefix("LOADED ")) == []
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    # A report of other results (another stamp) is rewritten.
    path.write_text(path.read_text().replace(report.stamp(all_stages, config), "score-old-v0"))
    assert not report.is_current(all_stages, config)
    assert CliRunner().invoke(app, args).exit_code == 0
    assert report.is_current(all_stages, config) and path.read_bytes() == before[1]


def test_pca_2d_finds_the_spread_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) * [5.0, 0.1, 0.1, 0.1, 0.1, 2.0]
    xy = report.pca_2d(x)
    assert xy.shape == (200, 2)
    np.testing.assert_allclose(np.abs(np.corrcoef(xy[:, 0], x[:, 0])[0, 1]), 1, atol=0.01)
    np.testing.assert_allclose(np.abs(np.corrcoef(xy[:, 1], x[:, 5])[0, 1]), 1, atol=0.05)
    np.testing.assert_array_equal(report.pca_2d(x), xy)
    assert report.pca_2d(np.ones((3, 1))).shape == (3, 2)  # one dimension: PC 2 is zeros


def test_cluster_quality_and_thumbnails(tmp_path) -> None:
    from PIL import Image

    got = report.cluster_quality([
        {"name": "purity", "labels_json": '{"split": "train"}', "value": 0.5},
        {"name": "adjusted_rand_index", "labels_json": '{"split": "train"}', "value": 0.25},
        {"name": "train_points", "labels_json": "{}", "value": 80.0},
        {"name": "purity", "labels_json": '{"split": "test"}', "value": 1.0}])
    assert got == [{"split": "test", "purity": 1.0},
                   {"split": "train", "purity": 0.5, "ari": 0.25}]
    Image.new("RGB", (300, 150), (200, 10, 10)).save(tmp_path / "wide.png")
    uri = report.thumbnail(str(tmp_path / "wide.png"))
    assert uri.startswith("data:image/jpeg;base64,")
    import base64
    import io

    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as small:
        assert small.size == (report.THUMB_PX, report.THUMB_PX // 2)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert report.thumbnail(str(tmp_path / "bad.png")) is None
    assert report.thumbnail(str(tmp_path / "missing.png")) is None


def test_charts_are_svg_images() -> None:
    import base64
    import xml.etree.ElementTree as ET

    from pipeline import report_charts

    uri = report_charts.index_recall(
        [{"method": "freestyle", "rerank_k": r, "nprobe": n, "recall_10_at_10": n / 8}
         for r in (0, 50) for n in (1, 2, 4, 8)], {"freestyle": "FSR"})
    svg = ET.fromstring(base64.b64decode(uri.removeprefix("data:image/svg+xml;base64,")))
    assert svg.tag.endswith("svg")
    lines = [e for e in svg.iter() if e.get("id", "").startswith("line2d")]
    assert len(lines) >= 2
    again = report_charts.index_recall(
        [{"method": "freestyle", "rerank_k": r, "nprobe": n, "recall_10_at_10": n / 8}
         for r in (0, 50) for n in (1, 2, 4, 8)], {"freestyle": "FSR"})
    assert again == uri  # no date, fixed ids: the same data gives the same bytes


def test_render_of_an_hnsw_run_with_no_other_results() -> None:
    """render alone, on made-up data: an HNSW index gets its recall-vs-ef_search chart (no
    'exact' note); absent sections say so instead of failing."""
    rows = [{"method": "freestyle", "factory": "HNSW32", "nprobe": 0, "ef_search": ef,
             "rerank_k": 0, "recall_1_at_1": 0.9, "recall_10_at_10": 0.8 + ef / 1000,
             "queries_per_s": 1000.0, "chosen": ef == 64} for ef in (16, 64, 128)]
    data = report.ReportData(stamp="score-x-v0", work_dir="/nowhere",
                             methods=[("freestyle", "FreestyleRet")], recall=[], paired=[],
                             history=[], cluster_quality=[], index_recall=rows,
                             example_method="freestyle", examples={"text": {"best": [
                                 report.Example(7, None, "<script>alert(1)</script>", None,
                                                None, [])], "worst": []}})
    page = Page(report.render(data))
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report.render(data)  # autoescaped
    assert page.classes.count("querytext") == 1 and "not found" in "".join(page.text)
    assert {i for i, a in page.ids.items() if a["tag"] == "img"} == {"chart-index-recall-hnsw"}
    assert {"no-paired", "no-training", "no-failures", "table-index"} <= page.ids.keys()
    assert "flat-index" not in page.ids
    assert "✓ searched with" in "".join(page.text)
    html = report.render(data)
    assert report.STAMP.search(html.encode()).group(1).decode() == "score-x-v0"


def test_slurm_hand_off_writes_no_report(finished, tmp_path, monkeypatch) -> None:
    """`run all --executor slurm` without --submit stops at the first stage to run (here
    score, for new ks) with the script to submit: no report, the old one untouched."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 0\n")  # on PATH; never called
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = load_config(finished, [METHODS])
    path = config.work_dir / "report.html"
    commands.report(all_stages, config, if_stale=True)
    before = path.read_bytes()
    result = CliRunner().invoke(app, ["run", "all", "--config", str(finished), "--set", METHODS,
                                      "--set", "score.ks=[1, 2]", "--executor", "slurm"])
    assert result.exit_code == 0, result.output
    assert "sbatch" in result.output and "Report:" not in result.output
    assert path.read_bytes() == before
    variant = load_config(finished, [METHODS, "score.ks=[1, 2]"])
    with pytest.raises(PipelineError, match="score stage has not finished"):
        report.write(all_stages, variant, tmp_path / "variant.html")


def test_no_chromium_skips_with_the_reason(monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match="Chromium is not installed"):
        chromium()
