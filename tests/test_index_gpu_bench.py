"""benchmarks/index_gpu.py (issue 19's faiss-gpu vs CPU comparison) on tiny data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import faiss
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "index_gpu.py"
TINY = ["--n", "6000", "--d", "64", "--shards", "3", "--queries", "200", "--factory",
        "IVF64,SQ8", "--nprobe", "4", "64"]


def test_cpu_half_builds_searches_and_reports_recall(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--devices", "cpu",
                           "--work-dir", str(tmp_path)], capture_output=True, text=True,
                          check=True)
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("cpu ")]
    assert [row[4] for row in rows] == ["4", "64"]
    recall = {row[4]: float(row[5]) for row in rows}
    assert recall["64"] > 0.95  # every list visited: only SQ8's rounding misses any
    assert recall["4"] < recall["64"]
    assert "speed-up" not in done.stdout  # one device: no ratio


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="faiss sees a GPU here")
def test_asking_for_the_gpu_without_one_stops_before_building(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--work-dir", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "sees no GPU" in done.stderr and "--devices cpu" in done.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="faiss sees no GPU (needs faiss-gpu + CUDA)")
def test_gpu_and_cpu_side_by_side(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--work-dir", str(tmp_path)],
                          capture_output=True, text=True, check=True)
    gpu_rows = [line.split() for line in done.stdout.splitlines() if line.startswith("gpu ")]
    assert gpu_rows and all(row[1] == "True" for row in gpu_rows)
    assert "GPU / CPU speed-up" in done.stdout


def test_a_reused_data_folder_with_more_queries_searches_the_asked_number(tmp_path: Path) -> None:
    common = [sys.executable, str(SCRIPT), *TINY, "--devices", "cpu", "--work-dir", str(tmp_path)]
    subprocess.run([*common, "--queries", "300"], capture_output=True, check=True)
    done = subprocess.run([*common, "--queries", "100"], capture_output=True, text=True,
                          check=True)
    assert "data: reusing" in done.stdout and "100 queries in batches" in done.stdout
