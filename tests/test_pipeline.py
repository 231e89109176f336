"""The runner end to end on a tiny demo: plans, skips, fingerprints, CLI, SQL."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT
from typer.testing import CliRunner

from pipeline import commands
from pipeline.arrays import arrow_to_vectors
from pipeline.catalog import Catalog
from pipeline.cli import app
from pipeline.config import load_config

STAGES = ["ingest", "prepare", "extract", "cluster"]  # the foundation; train/embed: test_train.py


def ran(reports) -> dict[str, int]:
    return {r.stage: r.ran for r in reports}


def test_run_all_then_nothing_to_do(tiny_config):
    config = load_config(tiny_config)
    first = commands.run(config, ["cluster"], progress=False)
    assert [r.stage for r in first] == STAGES
    assert ran(first) == {"ingest": 1, "prepare": 4, "extract": 4, "cluster": 1}
    second = commands.run(config, ["cluster"], progress=False)
    assert ran(second) == dict.fromkeys(STAGES, 0)
    assert {r.stage: r.skipped for r in second} == {"ingest": 1, "prepare": 4, "extract": 4,
                                                    "cluster": 1}
    catalog = Catalog.in_dir(config.work_dir)
    counts = dict(catalog.rows(
        "SELECT style, count(*) FROM gram_features JOIN queries USING (query_id) GROUP BY style"))
    assert counts == {"sketch": 16, "art": 16, "lowres": 16}
    assert catalog.rows("SELECT count(*) FROM queries WHERE style = 'text' AND text <> ''") == [
        (16,)]
    assert catalog.rows("SELECT count(*) FROM style_centres") == [(4,)]
    names = {r[0] for r in catalog.rows("SELECT DISTINCT name FROM current_metrics")}
    assert {"purity", "adjusted_rand_index"} <= names


def test_config_change_reruns_only_what_it_affects(tiny_config):
    config = load_config(tiny_config)
    commands.run(config, ["cluster"], progress=False)
    k3 = load_config(tiny_config, ["cluster.k=3"])
    assert ran(commands.run(k3, ["cluster"], progress=False)) == {
        "ingest": 0, "prepare": 0, "extract": 0, "cluster": 1}
    gram = load_config(tiny_config, ["cluster.k=3", "extract.gram_dim=16"])
    assert ran(commands.run(gram, ["cluster"], progress=False)) == {
        "ingest": 0, "prepare": 0, "extract": 4, "cluster": 1}
    # Run-only settings do not invalidate anything.
    batch = load_config(tiny_config, ["cluster.k=3", "extract.gram_dim=16",
                                      "extract.batch_size=3"])
    assert ran(commands.run(batch, ["cluster"], progress=False)) == dict.fromkeys(STAGES, 0)
    status = {s.stage: s for s in commands.status(batch)}
    assert status["extract"].done == 4 and status["extract"].stale == 4
    assert status["cluster"].stale == 2
    # Going back to an earlier config finds its finished units again.
    assert ran(commands.run(config, ["cluster"], progress=False)) == dict.fromkeys(STAGES, 0)
    catalog = Catalog.in_dir(config.work_dir)
    assert catalog.rows("SELECT count(*) FROM style_centres") == [(4,)]


def test_outputs_never_overwrite_other_fingerprints(tiny_config):
    config = load_config(tiny_config)
    commands.run(config, ["cluster"], progress=False)
    other = load_config(tiny_config, ["cluster.k=3"])
    commands.run(other, ["cluster"], progress=False)
    dirs = sorted(p.name for p in (config.work_dir / "cluster").iterdir())
    assert len(dirs) == 2


def test_stage_needs_its_inputs(tiny_config):
    config = load_config(tiny_config)
    with pytest.raises(commands.PipelineError, match="run `fsr-pipe run prepare` first"):
        commands.run(config, ["extract"], with_upstream=False, progress=False)
    commands.run(config, ["prepare"], progress=False)
    reports = commands.run(config, ["extract"], shard=2, with_upstream=False, progress=False)
    assert ran(reports) == {"extract": 1}
    with pytest.raises(commands.PipelineError, match="has no unit shard-00099"):
        commands.run(config, ["extract"], shard=99, with_upstream=False, progress=False)


def test_gram_vectors_are_normalised_and_styles_cluster(tmp_path):
    from conftest import write_tiny_config

    config = load_config(write_tiny_config(tmp_path, tmp_path / "run", items=32))
    commands.run(config, ["cluster"], progress=False)
    catalog = Catalog.in_dir(config.work_dir)
    x = arrow_to_vectors(catalog.query("SELECT gram FROM gram_features")["gram"])
    assert x.shape == (96, 32)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    purity = catalog.rows("SELECT value FROM current_metrics WHERE name = 'purity' "
                          "AND labels_json LIKE '%train%'")[0][0]
    # Four styles in four clusters: chance purity is ~0.25-0.3; even random VGG does better.
    assert purity > 0.5


def test_cli_run_status_sql_reset(tiny_config):
    cli = CliRunner()
    args = ["--config", str(tiny_config)]
    result = cli.invoke(app, ["run", "all", *args])
    assert result.exit_code == 0, result.output
    assert "fsr-pipe sql" in result.output
    result = cli.invoke(app, ["run", "all", *args])
    assert "Nothing to do" in result.output
    result = cli.invoke(app, ["status", *args])
    assert result.exit_code == 0 and "extract" in result.output and "random init" in result.output
    result = cli.invoke(app, ["sql", "SELECT style, count(*) AS n FROM queries GROUP BY style "
                              "ORDER BY style", *args])
    assert result.exit_code == 0
    assert "sketch" in result.output and "lowres" in result.output
    result = cli.invoke(app, ["sql", "SELECT nope FROM queries", *args])
    assert result.exit_code == 1 and "nope" in result.output
    result = cli.invoke(app, ["run", "all", "--set", "cluster.k=x", *args])
    assert result.exit_code == 2 and "cluster.k" in result.output
    # Weights that cannot load: one red line naming the setting, not a traceback.
    garbage = tiny_config.parent / "garbage.pth"
    garbage.write_text("not weights")
    for setting in (f"extract.vgg_weights='{garbage}'", "model.pretrained=no_such_tag"):
        result = cli.invoke(app, ["run", "all", "--set", setting, *args])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert "error:" in result.output and setting.split("=")[1].strip("'") in result.output
    result = cli.invoke(app, ["reset", "extract", "--yes", *args])
    assert result.exit_code == 0 and "extract, cluster" in result.output
    result = cli.invoke(app, ["run", "all", *args])
    assert result.exit_code == 0
    assert "extract    4 unit(s) run" in result.output
    assert "prepare    0 unit(s) run" in result.output


def test_artifacts_match_their_catalog_records(tiny_config):
    from pipeline.artifacts import sha256_file

    config = load_config(tiny_config)
    commands.run(config, ["cluster"], progress=False)
    for path, rows, sha in Catalog.in_dir(config.work_dir).rows(
            "SELECT path, rows, sha256 FROM artifacts"):
        assert sha256_file(path) == sha
        assert pq.read_metadata(path).num_rows == rows


def test_cli_without_faiss_names_the_extras(tmp_path):
    """A `pip install -e .` without the cpu or gpu extra: one line saying which to install."""
    stub = tmp_path / "faiss"  # shadows the installed faiss, as if no extra was installed
    stub.mkdir()
    (stub / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'faiss'\", name='faiss')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "status"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: faiss is not installed. Install fsr-pipe with one of its faiss extras: "
        "pip install -e '.[cpu]' (faiss-cpu), or '.[gpu]' on a CUDA 12 machine "
        "(faiss-gpu-cu12); not both, they install the same faiss module"]
