"""The runner end to end on a tiny demo: plans, skips, fingerprints, CLI, SQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO_ROOT
from typer.testing import CliRunner

from pipeline import commands
from pipeline.arrays import arrow_to_vectors
from pipeline.catalog import Catalog
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.leases import lease_path, this_host
from stages import all_stages

STAGES = ["ingest", "prepare", "extract", "cluster"]  # the foundation; train/embed: test_train.py


def ran(reports) -> dict[str, int]:
    return {r.stage: r.ran for r in reports}


def test_run_all_then_nothing_to_do(tiny_config):
    config = load_config(tiny_config)
    first = commands.run(all_stages, config, ["cluster"], progress=False)
    assert [r.stage for r in first] == STAGES
    assert ran(first) == {"ingest": 1, "prepare": 4, "extract": 4, "cluster": 1}
    second = commands.run(all_stages, config, ["cluster"], progress=False)
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
    commands.run(all_stages, config, ["cluster"], progress=False)
    k3 = load_config(tiny_config, ["cluster.k=3"])
    assert ran(commands.run(all_stages, k3, ["cluster"], progress=False)) == {
        "ingest": 0, "prepare": 0, "extract": 0, "cluster": 1}
    gram = load_config(tiny_config, ["cluster.k=3", "extract.gram_dim=16"])
    assert ran(commands.run(all_stages, gram, ["cluster"], progress=False)) == {
        "ingest": 0, "prepare": 0, "extract": 4, "cluster": 1}
    # Run-only settings do not invalidate anything.
    batch = load_config(tiny_config, ["cluster.k=3", "extract.gram_dim=16",
                                      "extract.batch_size=3"])
    assert ran(commands.run(all_stages,
                            batch, ["cluster"], progress=False)) == dict.fromkeys(STAGES, 0)
    status = {s.stage: s for s in commands.status(all_stages, batch)}
    assert status["extract"].done == 4 and status["extract"].stale == 4
    assert status["cluster"].stale == 2
    # Going back to an earlier config finds its finished units again.
    assert ran(commands.run(all_stages,
                            config, ["cluster"], progress=False)) == dict.fromkeys(STAGES, 0)
    catalog = Catalog.in_dir(config.work_dir)
    assert catalog.rows("SELECT count(*) FROM style_centres") == [(4,)]


def test_sql_shows_the_plans_of_the_config_it_is_given(tiny_config):
    config = load_config(tiny_config)
    k3 = load_config(tiny_config, ["cluster.k=3"])
    commands.run(all_stages, config, ["cluster"], progress=False)
    commands.run(all_stages,
                 k3, ["cluster"], progress=False)  # the last run: the stored views follow it

    def one(cfg, query):
        return commands.sql(all_stages, cfg, query).to_pylist()

    centres = "SELECT count(*) AS n FROM style_centres"
    assert one(config, centres) == [{"n": 4}] and one(k3, centres) == [{"n": 3}]
    fps = {c: commands.fingerprints(all_stages(), c)["cluster"] for c in (config, k3)}
    for cfg in (config, k3):
        rows = one(cfg, "SELECT fingerprint, config_json, done FROM stage_summary "
                        "JOIN stages USING (stage, fingerprint) WHERE stage = 'cluster'")
        assert len(rows) == 1 and rows[0]["fingerprint"] == fps[cfg]
        assert f'"k": {cfg.cluster.k}' in rows[0]["config_json"] and rows[0]["done"] == 1
    # A config that never ran: no cluster plan, empty (but typed) views; upstream plans shown.
    k5 = load_config(tiny_config, ["cluster.k=5"])
    assert one(k5, centres) == [{"n": 0}]
    assert one(k5, "SELECT stage FROM stages ORDER BY ALL") == [
        {"stage": s} for s in sorted(["ingest", "prepare", "extract"])]
    # Opening the catalog directly still shows the last run's plans.
    assert Catalog.in_dir(config.work_dir).rows(centres) == [(3,)]


def test_outputs_never_overwrite_other_fingerprints(tiny_config):
    config = load_config(tiny_config)
    commands.run(all_stages, config, ["cluster"], progress=False)
    other = load_config(tiny_config, ["cluster.k=3"])
    commands.run(all_stages, other, ["cluster"], progress=False)
    dirs = sorted(p.name for p in (config.work_dir / "cluster").iterdir())
    assert len(dirs) == 2


def test_stage_needs_its_inputs(tiny_config):
    config = load_config(tiny_config)
    with pytest.raises(commands.PipelineError, match="run `fsr-pipe run prepare` first"):
        commands.run(all_stages, config, ["extract"], plan_only=True, progress=False)
    # A worker runs from the plan file the driver writes; without it, it says what to run.
    with pytest.raises(commands.PipelineError, match="run `fsr-pipe plan extract` once"):
        commands.work(all_stages, config, "extract", shard=2, progress=False)
    commands.run(all_stages, config, ["prepare"], progress=False)
    commands.run(all_stages, config, ["extract"], plan_only=True, progress=False)
    records = commands.work(all_stages, config, "extract", shard=2, progress=False)
    assert [(r.unit_key, r.status) for r in records] == [("shard-00002", "done")]
    assert commands.work(all_stages,
                         config, "extract", shard=2, progress=False) == []  # done: skipped
    with pytest.raises(commands.PipelineError, match="has no unit shard-00099"):
        commands.work(all_stages, config, "extract", shard=99, progress=False)
    extract = {s.stage: s for s in commands.status(all_stages, config)}["extract"]
    assert (extract.ingested, extract.done, extract.pending) == (1, 1, 3)
    reports = commands.run(all_stages, config, ["extract"], progress=False)
    assert ran(reports) == {"ingest": 0, "prepare": 0, "extract": 3}


def test_gram_vectors_are_normalised_and_styles_cluster(tmp_path):
    from conftest import write_tiny_config

    config = load_config(write_tiny_config(tmp_path, tmp_path / "run", items=32))
    commands.run(all_stages, config, ["cluster"], progress=False)
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


def test_cli_stops_bad_settings_before_any_work(tiny_config, tmp_path):
    """Settings that would fail at train (or on the first tensor) fail at once, one line."""
    cli = CliRunner()
    args = ["--config", str(tiny_config)]
    cases = [
        ("embed.bogus=1", 2, "[embed] unknown key(s) ['bogus']"),  # rich must not eat [embed]
        ("model.shallow_layers=99", 2, "model.shallow_layers: 99 exceeds the 4 vision layers"),
        ("model.arch='no-such-vit'", 1, "unknown CLIP architecture 'no-such-vit'"),
        ("model.arch='RN50'", 1, "has no vision transformer tower"),
        (f"model.pretrained='{tmp_path}'", 1, "(model.pretrained) is a directory"),
        (f"model.pretrained='{tmp_path / 'nope.pt'}'", 1, "does not exist"),
        ("data.test_fraction=0", 2, "data.test_fraction = 0 puts no demo photo in the test"),
        (f"extract.vgg_weights='{tmp_path / 'vgg.pth'}'", 1,
         "(extract.vgg_weights) does not exist"),
        (f"extract.vgg_weights='{tmp_path}'", 1, "(extract.vgg_weights) is a directory"),
        ("index.factory='IVF8,Bogus'", 2, "index.factory: index factory string 'IVF8,Bogus' is "
                                         "not valid for d=64"),
        ("index.factory='IVF8,PQ7'", 2, "is not valid for d=64"),  # 7 does not divide 64
    ]
    if not torch.cuda.is_available():
        cases.append(("run.device='cuda'", 2, "run.device: 'cuda' but torch sees no CUDA"))
    for setting, code, message in cases:
        result = cli.invoke(app, ["run", "all", "--set", setting, *args])
        assert result.exit_code == code, (setting, result.output)
        assert isinstance(result.exception, SystemExit), (setting, result.exception)
        assert message in " ".join(result.output.split()), (setting, result.output)
        assert not (tmp_path / "run").exists(), f"{setting}: work started before the check"


def test_cli_shards_reset_and_csv(tiny_config):
    cli = CliRunner()
    args = ["--config", str(tiny_config)]
    assert cli.invoke(app, ["run", "prepare", *args]).exit_code == 0
    result = cli.invoke(app, ["stage", "extract", "--shard", "-1", *args])
    assert result.exit_code == 2 and "'--shard': -1" in result.output, result.output
    result = cli.invoke(app, ["stage", "ingest", "--shard", "0", *args])
    assert result.exit_code == 1 and "is not sharded" in result.output, result.output
    result = cli.invoke(app, ["stage", "bogus", *args])  # was "Nothing to do", exit 0
    assert result.exit_code == 1 and "unknown stage(s) ['bogus']; stages: ['ingest'" in " ".join(
        result.output.split()), result.output
    result = cli.invoke(app, ["stage", "all", *args])
    assert result.exit_code == 1 and "`fsr-pipe run all` runs every stage" in " ".join(
        result.output.split()), result.output
    # Without a terminal to ask on, reset refuses to delete unless told to.
    result = cli.invoke(app, ["reset", "prepare", *args])
    assert result.exit_code == 2 and "--yes" in result.output, result.output
    assert commands.status(all_stages, load_config(tiny_config))[1].done == 4
    # CSV: nested values as JSON text; --max-rows applies to CSV too (all rows by default).
    query = "SELECT i, [i, i + 1] AS pair, {'a': i} AS s FROM range(3) t(i) ORDER BY i"
    result = cli.invoke(app, ["sql", query, "--csv", *args])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        '"i","pair","s"', '0,"[0, 1]","{""a"": 0}"', '1,"[1, 2]","{""a"": 1}"',
        '2,"[2, 3]","{""a"": 2}"']
    result = cli.invoke(app, ["sql", query, "--csv", "--max-rows", "1", *args])
    assert len(result.output.splitlines()) == 2
    # The commands a run suggests select the same config.
    result = cli.invoke(app, ["run", "cluster", "--set", "cluster.k=3", *args])
    assert result.exit_code == 0, result.output
    hint = " ".join(result.output.split())
    assert f"--config {tiny_config} --set cluster.k=3" in hint, result.output


def test_reset_refuses_while_a_live_process_runs_a_unit(tiny_config):
    config = load_config(tiny_config)
    commands.run(all_stages, config, ["prepare"], progress=False)
    fp = commands.status(all_stages, config)[1].fingerprint
    out_dir = config.work_dir / "prepare" / fp

    def lease(pid: int) -> None:
        path = lease_path(out_dir, "shard-00001")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"unit_key": "shard-00001", "host": this_host(), "pid": pid,
                                    "attempt": 1, "since": 0.0}))

    lease(os.getpid())  # alive: this test's process
    with pytest.raises(commands.PipelineError, match=r"cannot reset ingest: 1 unit\(s\) are "
                       r"being run by live workers: prepare shard-00001"):
        commands.reset(all_stages, config, "ingest")
    assert (config.work_dir / "prepare").is_dir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lease(gone.pid)  # a dead process's lease does not block
    assert commands.reset(all_stages, config, "ingest") == ["ingest", *STAGES[1:], "train", "embed",
                                                "index", "score"]
    assert not (config.work_dir / "prepare").exists()


def test_artifacts_match_their_catalog_records(tiny_config):
    from pipeline.artifacts import sha256_file

    config = load_config(tiny_config)
    commands.run(all_stages, config, ["cluster"], progress=False)
    for path, rows, sha in Catalog.in_dir(config.work_dir).rows(
            "SELECT path, rows, sha256 FROM artifacts"):
        assert sha256_file(path) == sha
        assert pq.read_metadata(path).num_rows == rows


def test_cli_without_faiss_names_the_extras(tmp_path):
    """A `pip install -e .` without the cpu or gpu extra: one line saying which to install."""
    import site

    # The venv's packages without faiss, as if no extra was installed (python -S: no site).
    packages = tmp_path / "site-packages"
    packages.mkdir()
    for folder in site.getsitepackages():
        for entry in Path(folder).iterdir():
            if not entry.name.startswith("faiss") and not (packages / entry.name).exists():
                (packages / entry.name).symlink_to(entry)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(packages), str(REPO_ROOT)])}
    done = subprocess.run([sys.executable, "-S", "-m", "pipeline.cli", "status"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: faiss is not installed. Install fsr-pipe with one of its faiss extras: "
        "pip install -e '.[cpu]' (faiss-cpu), or '.[gpu]' on a CUDA 12 machine "
        "(faiss-gpu-cu12); not both, they install the same faiss module"]


def test_stored_views_keep_the_units_done_before_a_failure(tiny_config, monkeypatch):
    """A plain duckdb client reads the stored views: after a unit fails, they still list the
    files of the units that finished before it."""
    from stages.extract import ExtractStage

    config = load_config(tiny_config)
    commands.run(all_stages, config, ["prepare"], progress=False)
    original, calls = ExtractStage.run, []

    def fail_second(self, ctx, unit):
        calls.append(unit.key)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return original(self, ctx, unit)

    monkeypatch.setattr(ExtractStage, "run", fail_second)
    with pytest.raises(RuntimeError, match="disk full"):
        commands.run(all_stages, config, ["extract"], progress=False)
    catalog = Catalog.in_dir(config.work_dir)
    done = catalog.rows("SELECT unit_key, rows FROM units WHERE stage = 'extract' AND "
                        "status = 'done'")
    assert [k for k, _ in done] == calls[:1]
    stored = catalog.rows("SELECT count(*) FROM gram_features")[0][0] + catalog.rows(
        "SELECT count(*) FROM gallery_gram")[0][0]
    assert stored == done[0][1] > 0
