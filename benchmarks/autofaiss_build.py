"""Build an autofaiss index from a folder of `.npy` embeddings; print one JSON line of results.

Runs inside its own environment (autofaiss pins numpy<2; the project uses numpy 2), which
`benchmarks/index_scale.py` starts as a subprocess; see benchmarks/README.md for the one-line
setup. By hand:

    .venv-autofaiss/bin/python benchmarks/autofaiss_build.py EMB_DIR OUT_DIR \
        --max-index-memory-usage 4G --current-memory-available 4G

The JSON line holds the wall time of `autofaiss.build_index` (everything it does: reading,
choosing the index, training, adding, tuning its search parameters, its own metrics, saving),
the time of each phase autofaiss logs (`>>> Finished "..." in N secs`), the chosen index key
and search parameters, the index size, this process's peak RSS (VmHWM) and the sampled peak
of its anonymous RSS while `build_index` ran (benchmarks/rss.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from pathlib import Path

from rss import AnonPeak, rss_kib  # benchmarks/rss.py, beside this script

FINISHED = re.compile(r'>>> Finished "(.*)" in ([0-9.]+) secs')


class PhaseTimes(logging.Handler):
    """Collects autofaiss's `Timeit` lines as (phase, seconds)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.phases: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = FINISHED.search(record.getMessage())
        if match:
            self.phases.append((match.group(1).strip(), float(match.group(2))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("embeddings", type=Path, help="folder of .npy files (n_i, d) float32")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--max-index-memory-usage", default="4G")
    parser.add_argument("--current-memory-available", default="4G")
    parser.add_argument("--nb-cores", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import autofaiss
    import faiss

    rss_before = rss_kib("VmRSS")  # imports done: what the build adds is on top
    handler = PhaseTimes()
    logging.getLogger("autofaiss").addHandler(handler)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    index_path = args.out_dir / "knn.index"
    infos_path = args.out_dir / "index_infos.json"
    started = time.perf_counter()
    with AnonPeak() as anon:
        autofaiss.build_index(
            embeddings=str(args.embeddings), index_path=str(index_path),
            index_infos_path=str(infos_path), file_format="npy", metric_type="ip",
            max_index_memory_usage=args.max_index_memory_usage,
            current_memory_available=args.current_memory_available, nb_cores=args.nb_cores,
            save_on_disk=True, use_gpu=False, verbose=logging.INFO)
    seconds = time.perf_counter() - started
    if not index_path.is_file():
        raise SystemExit(f"autofaiss wrote no index to {index_path}; its log says why")
    infos = json.loads(infos_path.read_text()) if infos_path.is_file() else {}
    print(json.dumps({
        "seconds": seconds,
        "peak_rss_kib": rss_kib("VmHWM"),
        "rss_after_imports_kib": rss_before,
        "anon_before_kib": anon.start_kib,
        "anon_peak_kib": anon.peak_kib,
        "index_path": str(index_path),
        "index_bytes": index_path.stat().st_size,
        "index_key": infos.get("index_key"),
        "index_param": infos.get("index_param"),
        "infos": infos,
        "phases": handler.phases,
        "versions": {"autofaiss": getattr(autofaiss, "__version__", "?"),
                     "faiss": faiss.__version__},
    }))


if __name__ == "__main__":
    main()
