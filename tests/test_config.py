from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.config import ConfigError, fingerprint_fields, load_config, parse_override


def write(tmp_path, text: str):
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def test_defaults_and_shipped_config_load(repo_root):
    config = load_config(repo_root / "pipeline.toml")
    assert config.data.source == "demo"
    assert config.cluster.k == 4
    assert config.work_dir == (repo_root / "runs" / "demo").resolve()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[extract]\nbatchsize = 3\n", "[extract] unknown key(s) ['batchsize']"),
        ("[nope]\nx = 1\n", "unknown section(s) ['nope']"),
        ("[cluster]\nk = 'four'\n", "cluster.k: expected int, got str"),
        ("[cluster]\nk = 1\n", "cluster.k: must be >= 2"),
        ("[cluster]\nk = true\n", "cluster.k: expected int, got boolean"),
        ("[run]\ndevice = 'tpu'\n", "run.device: got 'tpu', allowed: one of 'auto', 'cpu', 'cuda'"),
        ("[data]\nsource = 'dsr'\n", "data.path: is required for source = 'dsr'"),
        ("[data]\nstyles = ['sketch', 'oil']\n", "data.styles: unknown style(s) ['oil']"),
        ("[data]\ntest_fraction = 1.5\n", "data.test_fraction: must be in [0, 1)"),
        ("run = 3\n", "[run] must be a table"),
        ("[index]\ncheck_nprobe = []\n", "index.check_nprobe: must be a non-empty list"),
        ("[index]\ncheck_rerank_k = 5\n", "index.check_rerank_k: must be in [10, 2048]"),
        ("[score]\nfused = ['sketch']\n", "score.fused: 'sketch' is not '<style>+<style>'"),
        ("[score]\nfusions = ['min']\n", "score.fusions: unknown fusion(s) ['min']; allowed"),
        ("[score]\nfusions = ['max']\n", "'max' is now 'cosine-max' (raw cosines; the authors'"),
        ("[score]\nmethods = ['freestyle', 'clip']\n",
         "score.methods: unknown method(s) ['clip']; methods: ['baseline', 'freestyle', "),
        ("[score]\nmethods = []\n", "score.methods: must name at least one of"),
        ("[score]\nmethods = ['vpt', 'vpt']\n", "score.methods: lists a method twice"),
        ("[embed]\nbaseline = true\n", "[embed] baseline is gone: list the methods in "
         "score.methods"),
        ("[score]\nks = []\n", "score.ks: must be a non-empty list"),
        ("[run\n", "invalid TOML"),
        ("[train]\nlr = inf\n", "train.lr: must be a finite number, got inf"),
        ("[cluster]\ntemperature = nan\n", "cluster.temperature: must be a finite number"),
        ("[run]\nwork_dir = ''\n", "run.work_dir: must name a folder"),
    ],
)
def test_bad_values_are_rejected_with_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value)


# The --set flags docs/method.md 9 gives for each row of SpLIP's Tables 5 and 6.
SPLIP_ROWS = {
    "T5 L_class": ["splip.triplet=false", "splip.beta=0"],
    "T5 L_triplet": ["splip.alpha=0", "splip.beta=0", "splip.margin='fixed'"],
    "T5 L_class + L_triplet": ["splip.beta=0", "splip.margin='fixed'"],
    "T5 + adaptive margin": ["splip.beta=0"],
    "T5 + L_cjs (full)": [],
    "T6 w/o LayerNorm": ["splip.layernorm=false"],
    "T6 w/o B_v": ["splip.text_to_vision=false"],
    "T6 w/o B_t": ["splip.vision_to_text=false"],
    "T6 w/o B_vt": ["splip.layer_prompts=false"],
    "T6 w/o visual prompts": ["splip.text_to_vision=false", "splip.layer_prompts=false"],
    "T6 w/o prompt blocks": ["splip.text_to_vision=false", "splip.layer_prompts=false",
                             "splip.vision_to_text=false"],
}


@pytest.mark.parametrize("row", sorted(SPLIP_ROWS))
def test_splip_ablation_rows_load(tmp_path, row):
    config = load_config(write(tmp_path, ""), SPLIP_ROWS[row]).splip
    assert config.triplet == (row != "T5 L_class")
    assert (config.beta > 0) == (row.startswith("T6") or row == "T5 + L_cjs (full)")
    assert config.layernorm == (row != "T6 w/o LayerNorm")


def test_splip_ablation_table_in_the_docs_matches(repo_root):
    text = (repo_root / "docs" / "method.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| 5: ", "| 6: "))]
    flags = {frozenset(line.split("|")[2].strip().strip("`").split())
             for line in rows if "`" in line.split("|")[2]}
    assert flags | {frozenset()} == {frozenset(v) for v in SPLIP_ROWS.values()}
    assert len(rows) == len(SPLIP_ROWS) + 1  # + Table 6's full row


def test_splip_defaults_and_refusals(tmp_path):
    config = load_config(write(tmp_path, "")).splip
    assert (config.text_tokens, config.layer_tokens, config.fixed_margin) == (4, 2, 0.2)
    assert (config.triplet, config.layernorm, config.jigsaw_margin) == (True, True, 0.0)
    with pytest.raises(ConfigError, match="splip.triplet: no loss left"):
        load_config(write(tmp_path, ""), ["splip.triplet=false", "splip.alpha=0",
                                          "splip.beta=0"])
    with pytest.raises(ConfigError, match="splip.layernorm: nothing left to train"):
        load_config(write(tmp_path, ""), SPLIP_ROWS["T6 w/o prompt blocks"]
                    + ["splip.layernorm=false", "splip.beta=0"])
    with pytest.raises(ConfigError, match=r"\[splip\] unknown key\(s\) \['layer_norm'\]"):
        load_config(write(tmp_path, "[splip]\nlayer_norm = false\n"))


def test_config_path_that_is_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; pass --config PATH to a pipeline.toml"):
        load_config(tmp_path)


def test_overrides_parse_as_toml_and_validate(tmp_path):
    path = write(tmp_path, "[extract]\nbatch_size = 4\n")
    config = load_config(path, ["extract.batch_size=64", "data.source=folder",
                                "data.path=/x", "cluster.temperature=1"])
    assert config.extract.batch_size == 64
    assert config.data.source == "folder"
    assert config.cluster.temperature == 1.0 and isinstance(config.cluster.temperature, float)
    with pytest.raises(ConfigError, match="extract.batch_size: must be >= 1"):
        load_config(path, ["extract.batch_size=0"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("batch_size=3")


def test_config_is_frozen(tmp_path):
    config = load_config(write(tmp_path, ""))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cluster.k = 5  # type: ignore[misc]


def test_run_only_fields_stay_out_of_fingerprints(tmp_path):
    config = load_config(write(tmp_path, ""))
    fields = fingerprint_fields(config.extract, config.resolve)
    assert "batch_size" not in fields and "num_workers" not in fields
    assert "gram_dim" in fields


def test_one_path_spelt_several_ways_is_one_fingerprint(tmp_path, monkeypatch):
    """A trailing slash, ./, .., ~ or the absolute form of the same file must not re-run the
    pipeline (they were five plans of one folder); a pretrained tag stays a tag."""
    from pipeline.plans import fingerprints
    from stages import all_stages

    (tmp_path / "photos" / "cat").mkdir(parents=True)
    (tmp_path / "vgg.pth").write_bytes(b"weights")
    monkeypatch.setenv("HOME", str(tmp_path))
    path = write(tmp_path, "[data]\nsource = 'folder'\npath = 'photos'\n")
    spellings = [("photos", "vgg.pth"), ("./photos/", "./vgg.pth"),
                 (f"{tmp_path}/photos", f"{tmp_path}/vgg.pth"),
                 ("photos/cat/..", "photos/../vgg.pth"), ("~/photos", "~/vgg.pth")]
    plans = {json.dumps(fingerprints(all_stages(), load_config(path, [
        f"data.path='{data}'", f"extract.vgg_weights='{vgg}'"]))) for data, vgg in spellings}
    assert len(plans) == 1
    other = load_config(path, ["data.path='photos/cat'", "extract.vgg_weights='vgg.pth'"])
    assert json.dumps(fingerprints(all_stages(), other)) not in plans
    config = load_config(path, ["model.pretrained='laion2b_s34b_b79k'"])
    assert fingerprint_fields(config.model, config.resolve)["pretrained"] == "laion2b_s34b_b79k"


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="not found; pass --config"):
        load_config(tmp_path / "missing.toml")


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    sub = tmp_path / "conf"
    sub.mkdir()
    config = load_config(write(sub, "[run]\nwork_dir = 'out'\n"))
    assert config.work_dir == (sub / "out").resolve()
