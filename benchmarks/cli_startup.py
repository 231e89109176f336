"""How long the light CLI commands take, beside `python -c "import duckdb"` in the same run.

    python benchmarks/cli_startup.py                       # the demo's pipeline.toml
    python benchmarks/cli_startup.py --config my.toml --repeats 15

Targets (issue 19): `fsr-pipe --help` <= 1.5x the baseline, `status` and `sql` <= 2x, a no-op
`run all` (every unit done) <= 2.5x. The config's run must be finished first: when it is not,
the script runs `fsr-pipe run all` once (not timed; the demo takes a few minutes on 2 cores).

Every command runs as a fresh process, as a user types it (the console script of this venv,
stdout and stderr to /dev/null); the commands take turns for `--repeats` rounds after one
warm-up round (so a change in the machine's load hits them alike), and the median wall time of
each is reported with its ratio to the baseline's median. `imports` says whether the command's
process loaded torch, open_clip, faiss, numpy, pyarrow or rich (one extra run with
`python -X importtime`).

The project's modules are byte-compiled first (`compileall`), as they are for a user: pip
compiles a regular install, and Python caches an editable one's bytecode at its first import.
Here that cache is never written (this VM sets PYTHONDONTWRITEBYTECODE=1), so without the
step every command would compile fsr-pipe's sources at each start while duckdb (compiled at
install) would not. `--no-compile` measures that state instead (stale caches removed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "open_clip", "faiss", "numpy", "pyarrow", "rich")
QUERY = "SELECT stage, count(*) AS units FROM units GROUP BY ALL ORDER BY ALL"


def commands(fsr: str, config: str) -> dict[str, tuple[list[str], float | None]]:
    """name -> (argv, target ratio to the baseline)."""
    c = ["--config", config]
    return {
        "import duckdb": ([sys.executable, "-c", "import duckdb"], None),
        "--help": ([fsr, "--help"], 1.5),
        "status": ([fsr, "status", *c], 2.0),
        "sql": ([fsr, "sql", QUERY, *c], 2.0),
        "run all (no-op)": ([fsr, "run", "all", "--quiet", *c], 2.5),
    }


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def heavy_imports(argv: list[str], fsr: str) -> str:
    """Which HEAVY packages the command's process imported (python -X importtime)."""
    if argv[0] == fsr:
        argv = [sys.executable, "-X", "importtime", "-m", "pipeline.cli", *argv[1:]]
    else:
        argv = [sys.executable, "-X", "importtime", *argv[1:]]
    err = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True).stderr
    loaded = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines()
              if line.startswith("import time:")}
    return ", ".join(m for m in HEAVY if m in loaded) or "none of them"


def bytecode(remove: bool) -> None:
    """Byte-compile the project's packages (or remove their caches: --no-compile)."""
    import pipeline
    import stages

    roots = [Path(pipeline.__file__).parent, Path(stages.__file__).parent]
    if remove:
        for cache in (c for root in roots for c in root.rglob("__pycache__")):
            shutil.rmtree(cache)
        print(f"bytecode: none (caches removed under {', '.join(map(str, roots))})")
        return
    subprocess.run([sys.executable, "-m", "compileall", "-q", *map(str, roots)], check=True,
                   stdout=subprocess.DEVNULL)
    print(f"bytecode: compiled (compileall {' '.join(map(str, roots))})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="pipeline.toml")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--no-compile", action="store_true",
                        help="remove the project's bytecode caches instead of compiling them")
    args = parser.parse_args()
    fsr = shutil.which("fsr-pipe", path=str(Path(sys.executable).parent)) or shutil.which(
        "fsr-pipe")
    if fsr is None:
        sys.exit("fsr-pipe is not on PATH: run from the project's venv (pip install -e .)")
    todo = commands(fsr, args.config)
    bytecode(args.no_compile)
    start = time.perf_counter()
    subprocess.run([fsr, "run", "all", "--quiet", "--config", args.config], check=True,
                   stdout=subprocess.DEVNULL)
    print(f"run all (finishing the run first, not timed): {time.perf_counter() - start:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in todo}
    for round_ in range(args.repeats + 1):
        for name, (argv, _) in todo.items():
            seconds = timed(argv)
            if round_:  # round 0 warms the page cache
                times[name].append(seconds)
    base = statistics.median(times["import duckdb"])
    print(f"\n{os.cpu_count()} CPUs, {args.repeats} rounds, medians; config {args.config}\n")
    print(f"| command | median s | ratio | target | met | imports of {', '.join(HEAVY)} |")
    print("|---|---|---|---|---|---|")
    for name, (argv, target) in todo.items():
        median = statistics.median(times[name])
        ratio = median / base
        met = "" if target is None else ("yes" if ratio <= target else "NO")
        print(f"| `{name}` | {median:.3f} | {ratio:.2f}x | "
              f"{'' if target is None else f'<= {target}x'} | {met} | "
              f"{heavy_imports(argv, fsr)} |")


if __name__ == "__main__":
    main()
