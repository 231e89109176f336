from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# torch and faiss both load an OpenMP runtime; busy-waiting threads of one slow the other
# several-fold on 2 cores. Must be set before either is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# As pipeline/__init__.py does (torch is imported here first): MKL's reproducible mode.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def start_cli(config: Path, *args: str) -> subprocess.Popen:
    """`python -m pipeline.cli ARGS --config CONFIG` in a child process, output piped, SIGINT
    at its default: a shell's background job (`cmd &` in a script, so possibly pytest itself)
    inherits SIGINT *ignored* and Python keeps it so, and a Ctrl-C test would see the run
    finish instead of stop."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args, "--config", str(config)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    """Poll until `predicate()` (a kill point) holds; fail if `proc` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before the kill point:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("kill point never reached")
        time.sleep(0.02)


def shared_data_dir() -> Path:
    """`../shared/data` beside the checkout, or $FSR_SHARED_DATA."""
    env = os.environ.get("FSR_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def restore_logging():
    """The CLI installs a log handler on the stderr it sees; under CliRunner that stream is
    closed after the command, and later tests' log lines would hit it ("I/O operation on
    closed file"). Put the root logger's handlers and level back after every test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path} (set FSR_SHARED_DATA to use it)")
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY = """
[run]
work_dir = "{work_dir}"
seed = 0
device = "cpu"

[data]
demo_items = {items}
shard_size = 4
demo_image_size = 48

[extract]
image_size = 64
gram_dim = 32
batch_size = 8
num_workers = 0

[cluster]
k = 4
niter = 10

[model]
arch = "fsr-tiny-vit"

[train]
lr = 0.001
batch_size = 8
epochs = 2
val_fraction = 0.25
num_workers = 0

[embed]
batch_size = 8
num_workers = 0
"""


def write_tiny_config(directory: Path, work_dir: Path, items: int = 16, extra: str = "") -> Path:
    """A pipeline.toml for a demo run that takes seconds (tiny images, tiny Gram)."""
    path = directory / "pipeline.toml"
    path.write_text(TINY.format(work_dir=work_dir, items=items) + extra)
    return path


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    return write_tiny_config(tmp_path, tmp_path / "run")
