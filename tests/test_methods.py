"""The method registry (pipeline/methods): what each method declares, and that listing them
stays light (config checks and `status` list methods without loading torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from pipeline import methods
from pipeline.config import load_config


def test_every_method_declares_a_distinct_artifact_and_view():
    found = methods.registered()
    assert set(found) == {"freestyle", "untrained", "baseline", "vpt", "splip"}
    assert len({m.kind for m in found.values()}) == len({m.view for m in found.values()}) == 5
    assert len({m.file for m in found.values()}) == len({m.short for m in found.values()}) == 5
    trained = {name for name, m in found.items() if m.trains}
    assert trained == {"freestyle", "vpt", "splip"}
    assert all(m.loss is not None or m.batch_loss is not None
               for m in found.values() if m.trains)
    # Class-aware training (negatives of another class, class labels) is splip's alone.
    assert {name for name, m in found.items() if m.class_aware} == {"splip"}


def test_configured_methods_keep_the_config_order():
    config = load_config(None, ['score.methods=["baseline", "vpt", "freestyle"]'])
    assert [m.name for m in methods.configured(config)] == ["baseline", "vpt", "freestyle"]
    assert [m.name for m in methods.trained(config)] == ["vpt", "freestyle"]
    with pytest.raises(KeyError, match="unknown method 'clip'; methods: "):
        methods.get("clip")


def test_listing_methods_does_not_import_torch():
    code = ("import sys; from pipeline import methods; from pipeline.config import load_config; "
            "load_config(None); print(sorted(methods.registered())); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["['baseline', 'freestyle', 'splip', 'untrained', 'vpt']",
                                           "False"]
