"""The `fsr-pipe` command line (Typer). Thin: parsing and printing; the work is in commands.py.

    fsr-pipe run all                      # every stage, resuming what is done
    fsr-pipe run all --executor local     # units on a process pool (or slurm, ray)
    fsr-pipe run cluster                  # cluster and what it needs
    fsr-pipe plan extract                 # freeze a stage's plan for workers
    fsr-pipe stage extract --shard 3      # a worker: one unit, writes its record
    fsr-pipe status | reset STAGE | sql "SELECT ..."
    fsr-pipe report                       # <work_dir>/report.html: charts, examples
    fsr-pipe query --image sketch.png --text "a red car"   # ask the finished run's index
"""

# No `from __future__ import annotations`: Typer reads every command's signature at each
# start, and evaluating string annotations cost it ~4 ms (docs/benchmarks.md, CLI start-up).
import importlib.util
import json
import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pipeline.table import Cell, Styled, color_on, paint, render

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.runner import StageReport

# Commands import what they compute with when they run (pipeline.commands: DuckDB; the stages'
# compute: torch, open_clip, faiss; rich for progress bars), so `--help`, `status` and `sql`
# start in a fraction of a second (docs/benchmarks.md, CLI start-up). Tables and messages are
# plain text (pipeline.table), coloured on a terminal.

# rich_markup_mode=None: plain help and usage errors. Typer's rich help loads ~60 ms of
# formatting modules (markdown_it, rich.markdown) before printing a line, which alone would
# break the --help start-up target (docs/benchmarks.md, CLI start-up).
app = typer.Typer(help="fsr-pipe: style-diversified image retrieval (FreestyleRet) as a "
                  "resumable batch pipeline.", no_args_is_help=True, add_completion=False,
                  rich_markup_mode=None)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="pipeline.toml to use.")]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config value: section.key=value (repeatable).")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")]
ExecutorOption = Annotated[str | None, typer.Option(
    "--executor", "-e", help="Where units run: inline, local, slurm or ray (run.executor).")]
WorkersOption = Annotated[int | None, typer.Option(
    "--workers", "-w", min=0, help="local/ray: worker processes (run.workers; 0 = auto).")]
SubmitOption = Annotated[bool, typer.Option(
    "--submit", help="slurm: submit the array jobs and wait (else only write the scripts).")]

FIRST_SQL = ("SELECT q.style, a.cluster, count(*) AS n FROM style_assignments a "
             "JOIN queries q ON a.item_id = q.query_id GROUP BY ALL ORDER BY ALL")


def _run_flags(executor: str | None, workers: int | None, submit: bool) -> list[str]:
    """The run options as --set overrides (run-only keys: they never change fingerprints)."""
    flags = [] if executor is None else [f"run.executor={json.dumps(executor)}"]
    flags += [] if workers is None else [f"run.workers={workers}"]
    return flags + (["slurm.submit=true"] if submit else [])


def _setup(config_path: Path, overrides: list[str] | None, quiet: bool = False) -> "Config":
    if importlib.util.find_spec("faiss") is None:  # a missing extra: one line, not a traceback
        sys.exit("error: faiss is not installed. Install fsr-pipe with one of its faiss extras: "
                 "pip install -e '.[cpu]' (faiss-cpu), or '.[gpu]' on a CUDA 12 machine "
                 "(faiss-gpu-cu12); not both, they install the same faiss module")
    level = logging.WARNING if quiet else logging.INFO
    if sys.stderr.isatty():
        handler: logging.Handler = _RichLog()
    else:  # plain lines for log files and schedulers
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    # Our loggers speak at INFO; libraries (open_clip, faiss) only at WARNING.
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    for name in ("pipeline", "stages"):
        logging.getLogger(name).setLevel(level)
    from pipeline.config import load_config

    return load_config(config_path, overrides or [])


class _RichLog(logging.Handler):
    """rich's log handler on the progress bars' console, made at the first record: a command
    that logs nothing (status, sql) does not import rich."""

    def __init__(self) -> None:
        super().__init__()
        self._handler: logging.Handler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._handler is None:
            from rich.logging import RichHandler

            from pipeline.progress import console

            self._handler = RichHandler(console=console(), show_path=False)
            self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._handler.emit(record)


def _say(*parts: Cell) -> None:
    """One message line on stderr (stdout carries tables and data), styled on a terminal."""
    color = color_on(sys.stderr)
    print("".join(paint(p.text, p.style, color) if isinstance(p, Styled) else p
                  for p in parts), file=sys.stderr, flush=True)


def _fail(exc: Exception | str, code: int) -> None:
    _say(Styled("error:", "bold red"), f" {exc}")
    raise typer.Exit(code)


class Terminated(BaseException):
    """SIGTERM (a scheduler's time limit, `kill`): unwinds like Ctrl-C, so the running unit is
    marked failed and its temporary files are removed, instead of dying silently."""


def _on_sigterm(main_pid: int):  # noqa: ANN202
    def handler(signum, frame):  # noqa: ANN001, ANN202, ARG001
        if os.getpid() != main_pid:  # a DataLoader worker: just go, the main process reports
            os._exit(128 + signal.SIGTERM)
        raise Terminated()
    return handler


def _loaded(*names: tuple[str, str]) -> tuple[type[Exception], ...]:
    """The exception classes (module, class) of the modules loaded so far: one of a module not
    loaded cannot have been raised, so it is not imported to be caught (imports cost start-up
    time: docs/benchmarks.md, CLI start-up)."""
    return tuple(getattr(sys.modules[module], name) for module, name in names
                 if module in sys.modules)


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors that say what to fix (one red line, exit 1)."""
    return (FileNotFoundError, *_loaded(
        ("pipeline.stage", "PipelineError"), ("pipeline.models", "WeightsError"),
        ("pipeline.catalog", "CatalogBusy"), ("pipeline.data.sources", "SourceError")))


def _guard(fn):  # noqa: ANN001, ANN202 - decorator keeps the command's signature
    """Turn the errors users can fix into one red line and an exit code (2 config, 1 other)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _on_sigterm(os.getpid()))
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if isinstance(exc, _loaded(("pipeline.executors.base", "HandedOff"))):
                _say(str(exc))  # e.g. Slurm scripts written for the user to submit
                raise typer.Exit(0) from None
            if isinstance(exc, _loaded(("pipeline.config", "ConfigError"))):
                _fail(exc, 2)
            if not isinstance(exc, _user_errors()):
                raise
            _fail(exc, 1)
        except KeyboardInterrupt:
            _fail("interrupted; finished units are kept, run the same command again to resume",
                  128 + signal.SIGINT)
        except Terminated:
            _fail("terminated (SIGTERM); finished units are kept, run the same command again "
                  "to resume", 128 + signal.SIGTERM)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


@app.command("run")
@_guard
def run_cmd(
    target: Annotated[str, typer.Argument(help="'all' or a stage name (runs what it needs too).")]
    = "all",
    config: ConfigOption = Path("pipeline.toml"),
    overrides: SetOption = None,
    quiet: QuietOption = False,
    executor: ExecutorOption = None,
    workers: WorkersOption = None,
    submit: SubmitOption = False,
) -> None:
    """Run the pipeline (or one stage and what it needs), skipping finished work."""
    from pipeline import commands
    from stages import all_stages

    cfg = _setup(config, [*(overrides or []), *_run_flags(executor, workers, submit)], quiet)
    with commands.held(cfg):  # one catalog connection for both (closed while units run)
        reports = commands.run(all_stages, cfg, [target])
        # The run returned, so every stage up to the target is done: score's tables can be read.
        # all and score ran every stage: their fingerprints are not computed again.
        fps = {r.stage: r.fingerprint for r in reports}
        tables = (commands.result_tables(all_stages, cfg, finished=True, fingerprints=fps)
                  if target in ("all", "score") else None)
    _print_reports(reports)
    same = _same_config(config, overrides)
    recall, paired = tables if tables is not None else (None, [])
    if recall:
        typer.echo(_table(*_recall_view(recall, cfg)))
        typer.echo(f"Again, or as data: fsr-pipe sql \"{commands.recall_sql(cfg)}\"{same}")
        if paired:
            typer.echo(_table(*_paired_view(paired, cfg)))
            typer.echo(f"Wins and losses at every K: fsr-pipe sql "
                       f"\"{commands.paired_sql(cfg)}\"{same}")
    if target == "all" and recall is not None:
        path, _ = commands.report(all_stages, cfg, if_stale=True,  # kept when current
                                  fingerprints=fps)
        _say("\nReport: ", Styled(str(path), "bold"), f" (`fsr-pipe report{same}` rewrites it)")
    if target in ("all", "cluster", "score"):
        _say("\nResults in ", Styled(str(cfg.work_dir), "bold"),
             f" (catalog: {cfg.work_dir / 'catalog.duckdb'}). Try:\n"
             f"  fsr-pipe sql \"{FIRST_SQL}\"{same}")


def _same_config(config: Path, overrides: list[str] | None) -> str:
    """The --config/--set flags that select this config again (for the commands we suggest)."""
    flags = [] if config == Path("pipeline.toml") else ["--config", str(config)]
    for text in overrides or []:
        flags += ["--set", text]
    return "".join(" " + shlex.quote(f) for f in flags)


def _method_columns(config: "Config") -> list[tuple[str, str, str]]:
    """(recall_sql column, header suffix, legend) of each configured method."""
    from pipeline import methods

    return [(m.name, m.short, m.title) for m in methods.configured(config)]


View = tuple[list[str], list[list[Cell]], str | None]  # columns, rows, title


def _recall_view(rows: list[dict], config: "Config") -> View:
    """One row per (protocol, query set): Recall@K of each configured method per K."""
    ks = sorted({r["k"] for r in rows})
    methods = [m for m in _method_columns(config) if any(r[m[0]] is not None for r in rows)]
    columns = ["protocol", "queries", "fusion", "n",
               *[f"R@{k} {short}" for k in ks for _, short, _ in methods]]
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault((r["protocol"], r["style"], r["fusion"]), {})[r["k"]] = r
    lines: list[list[Cell]] = []
    for (protocol, style, fusion), by_k in groups.items():
        cells = [_cell(by_k.get(k, {}).get(column)) for k in ks for column, _, _ in methods]
        n = next(iter(by_k.values()))["queries"]
        lines.append([protocol, style, fusion, str(n), *cells])
    return columns, lines, "Recall@K on the test split: " + ", ".join(n for *_, n in methods)


def _paired_view(rows: list[dict], config: "Config") -> View:
    """One row per (protocol, query set) at the smallest K: the first method's wins and
    losses against each other method, query by query, and the sign test's p."""
    from pipeline.commands import SINGLE_STYLES

    k = min(r["k"] for r in rows)
    rows = [r for r in rows if r["k"] == k]
    (_, first, _), *others = _method_columns(config)
    methods = [m for m in others if any(r["versus"] == m[0] for r in rows)]
    columns = ["protocol", "queries", "fusion", "n",
               *[f"{first} vs {short}" for _, short, _ in methods]]
    title = (f"Query by query at R@{k}: +queries only {first} finds, -queries only the other "
             "finds; p: exact sign test (small p: a real difference)")
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["protocol"], r["style"], r["fusion"]), {})[r["versus"]] = r
    # As the recall table (gallery first, query sets by name), each protocol's pooled line last.
    lines: list[list[Cell]] = []
    for (protocol, style, fusion), by_method in sorted(groups.items(), key=lambda g: (
            g[0][0] != "gallery", g[0][0], g[0][1] == SINGLE_STYLES, g[0][1:])):
        cells = [f"+{r['wins']} -{r['losses']} p={r['p']:.2g}" if r else ""
                 for r in (by_method.get(column) for column, _, _ in methods)]
        n = max(r["queries"] for r in by_method.values())
        lines.append([protocol, style, fusion, str(n), *cells])
    return columns, lines, title


@app.command("stage")
@_guard
def stage_cmd(
    name: Annotated[str, typer.Argument(help="Stage to run (its plan must exist).")],
    shard: Annotated[int | None, typer.Option(min=0, help="Run only this shard's unit.")] = None,
    config: ConfigOption = Path("pipeline.toml"),
    overrides: SetOption = None,
    quiet: QuietOption = False,
) -> None:
    """Run a stage's units, or one shard of it, as a worker (e.g. a Slurm array task): from
    the plan file `fsr-pipe plan` wrote, writing unit records, never opening the catalog.
    `fsr-pipe run` or `status` ingests the records."""
    from pipeline import commands
    from stages import all_stages

    cfg = _setup(config, overrides, quiet)
    records = commands.work(all_stages, cfg, name, shard=shard)
    for r in records:
        _say(f"  {r.stage} {r.unit_key}: {r.rows} rows in {r.seconds:.1f}s "
             f"(record written; `fsr-pipe status` ingests it)")
    if not records:
        _say("Nothing to do: those units are done or running elsewhere.")


@app.command("plan")
@_guard
def plan_cmd(
    name: Annotated[str, typer.Argument(help="Stage to plan (its inputs must be complete).")],
    config: ConfigOption = Path("pipeline.toml"),
    overrides: SetOption = None,
    quiet: QuietOption = False,
) -> None:
    """Plan a stage and write its plan file, so workers (`fsr-pipe stage NAME --shard N`) can
    run its units without the catalog."""
    from pipeline import commands
    from stages import all_stages

    cfg = _setup(config, overrides, quiet)
    for r in commands.run(all_stages, cfg, [name], plan_only=True):
        _say(f"  {r.stage:<10} {r.units} unit(s) planned (fingerprint {r.fingerprint}): "
             f"{cfg.work_dir / r.stage / r.fingerprint / '_plan.json'}")


@app.command("worker", hidden=True)
@_guard
def worker_cmd(
    job_file: Annotated[Path, typer.Argument(help="A job file the driver wrote.")],
    units: Annotated[list[str] | None, typer.Argument(help="Units of it to run.")] = None,
    quiet: QuietOption = False,
) -> None:
    """Run units of a job file (what the driver's Slurm scripts call)."""
    _setup(None, [], quiet)
    from pipeline.worker import run_job_file

    for r in run_job_file(job_file, units):
        _say(f"  {r.stage} {r.unit_key}: {r.rows} rows in {r.seconds:.1f}s")


@app.command("status")
@_guard
def status_cmd(config: ConfigOption = Path("pipeline.toml"), overrides: SetOption = None) -> None:
    """Per stage: units done / pending / running / lost / failed / stale, rows and time;
    ingests the unit records workers wrote since the last run."""
    from pipeline import commands
    from stages import all_stages

    cfg = _setup(config, overrides, quiet=True)
    statuses = commands.status(all_stages, cfg)
    rows: list[list[Cell]] = []
    for st in statuses:
        if not st.planned:
            state: list[Cell] = [Styled("not planned", "dim"), "", "", "", "",
                                 str(st.stale or "")]
        else:
            state = [str(st.done), str(st.pending), str(st.running), str(st.lost),
                     Styled(str(st.failed), "red") if st.failed else "0", str(st.stale or "")]
        rows.append([st.stage, st.fingerprint, *state, f"{st.rows:,}", f"{st.seconds:.1f}",
                     st.notes or ""])
    typer.echo(_table(["stage", "fingerprint", "done", "pending", "running", "lost", "failed",
                       "stale", "rows", "seconds", "notes"], rows,
                      f"fsr-pipe status: {cfg.work_dir}"))
    if ingested := sum(st.ingested for st in statuses):
        typer.echo(f"Ingested {ingested} unit record(s) that workers finished since the last "
                   "run.")
    for st in statuses:
        for line in st.running_on[:10]:
            typer.echo(f"  running: {st.stage} {line}")
        if len(st.running_on) > 10:
            typer.echo(f"  running: {st.stage} ... {len(st.running_on) - 10} more")
    if not (cfg.work_dir / "catalog.duckdb").exists():
        typer.echo(f"No run in {cfg.work_dir} yet (no catalog.duckdb): `fsr-pipe run all` "
                   "starts one.")


@app.command("query")
@_guard
def query_cmd(
    text: Annotated[str | None, typer.Option("--text", "-t", help="Words to search for.")]
    = None,
    image: Annotated[Path | None, typer.Option(
        "--image", "-i", help="An image file of any style (sketch, painting, photo).")] = None,
    method: Annotated[str | None, typer.Option(
        "--method", "-m", help="A method of score.methods (default: the first, freestyle).")]
    = None,
    k: Annotated[int, typer.Option("--k", "-k", min=1, help="Results per query.")] = 10,
    fusion: Annotated[str, typer.Option(
        help="--text with --image: softmax-max (the authors'), cosine-max or mean.")]
    = "softmax-max",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
    queries: Annotated[Path | None, typer.Option(
        "--queries", "-f", help="Batch mode: a .csv or .parquet file, one query per row "
        "(columns text and/or image; id, if present, is copied).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Batch mode: the Parquet to write (default: FILE.results.parquet beside it).")]
    = None,
    config: ConfigOption = Path("pipeline.toml"),
    overrides: SetOption = None,
    quiet: QuietOption = False,
) -> None:
    """Search the finished run's index for a text, an image (any style) or both (fused), as
    the score stage does: the trained model, the index and its exact re-ranking. Prints rank,
    image_id, path, class and score (cosine; softmax-max: its log-probability)."""
    if queries is not None and (text is not None or image is not None or as_json or as_csv):
        _fail("--queries runs a whole file and writes Parquet; leave out --text, --image, "
              "--json and --csv", 2)
    if queries is None and out is not None:
        _fail("--out is for batch mode (--queries FILE)", 2)
    if as_json and as_csv:
        _fail("--json or --csv, not both", 2)
    if queries is None and text is None and image is None:
        _fail("give --text, --image or both (or --queries FILE for a batch)", 2)
    from pipeline import commands
    from stages import all_stages

    cfg = _setup(config, overrides, quiet=quiet or as_json or as_csv)
    if queries is not None:
        report = commands.query_file(all_stages, cfg, queries, out, method, k, fusion)
        _say(f"{report.queries} queries in {report.seconds:.1f}s ({report.per_s:,.1f}/s) "
             f"-> {report.out}")
        for row, why in report.failed[:10]:
            _say(Styled(f"  row {row}:", "red"), f" {why}")
        if len(report.failed) > 10:
            _say(f"  ... {len(report.failed) - 10} more (rows with `error` set)")
        return
    used, rows = commands.query(all_stages, cfg, text, None if image is None else str(image),
                                method, k, fusion)
    if as_json:
        typer.echo(json.dumps({"method": used, "text": text,
                               "image": None if image is None else str(image),
                               "fusion": fusion if text is not None and image else None,
                               "results": rows}, indent=2))
    elif as_csv:
        import csv

        writer = csv.DictWriter(sys.stdout, ["rank", "image_id", "path", "class", "score"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        asked = " + ".join(([f"image {image}"] if image else [])
                           + ([f"text {text!r}"] if text is not None else []))
        how = f", {fusion}" if text is not None and image else ""
        typer.echo(_table(["rank", "image_id", "path", "class", "score"],
                          [[str(r["rank"]), str(r["image_id"]), r["path"] or "",
                            r["class"] or "", f"{r['score']:.4f}"] for r in rows],
                          f"{used}: {asked}{how}, top {len(rows)}"))


@app.command("reset")
@_guard
def reset_cmd(
    name: Annotated[str, typer.Argument(help="Stage to forget (its dependants go too).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    config: ConfigOption = Path("pipeline.toml"),
    overrides: SetOption = None,
) -> None:
    """Forget a stage and the stages after it, under every config run in this work dir (all
    fingerprints), and delete their files."""
    from pipeline import commands
    from stages import all_stages

    cfg = _setup(config, overrides, quiet=True)
    if not yes:
        if not sys.stdin.isatty():
            _fail("reset deletes results and stdin is not a terminal to ask; pass --yes", 2)
        typer.confirm(f"Delete every result of {name} and of each stage after it in "
                      f"{cfg.work_dir}?", abort=True)
    names = commands.reset(all_stages, cfg, name)
    _say(f"reset: {', '.join(names)}")


@app.command("sql")
@_guard
def sql_cmd(
    query: Annotated[str, typer.Argument(help="SQL over the catalog tables and views.")],
    config: ConfigOption = Path("pipeline.toml"),
    overrides: SetOption = None,
    max_rows: Annotated[int | None, typer.Option(
        min=0, help="Rows to print (default: 50 in a table, all with --csv).")] = None,
    csv: Annotated[bool, typer.Option("--csv", help="Print CSV instead of a table.")] = False,
) -> None:
    """Query the run's catalog (tables, views over Parquet artifacts) and print the result."""
    from pipeline import commands
    from stages import all_stages

    cfg = _setup(config, overrides, quiet=True)
    try:
        result = commands.sql(all_stages, cfg, query, arrow=csv)
    except Exception as exc:  # duckdb raises many types; show them as one line
        if type(exc).__module__.split(".")[0] not in ("duckdb", "_duckdb"):
            raise
        _fail(exc, 1)
    if csv:
        import pyarrow.csv as pacsv

        pacsv.write_csv(_flat(result.slice(0, max_rows)), sys.stdout.buffer)
        return
    columns, rows = result
    max_rows = 50 if max_rows is None else max_rows
    typer.echo(_table(columns, [[_cell(v) for v in row] for row in rows[:max_rows]]))
    if len(rows) > max_rows:
        typer.echo(f"({len(rows)} rows, {max_rows} shown; --max-rows to see more)")


@app.command("report")
@_guard
def report_cmd(
    config: ConfigOption = Path("pipeline.toml"),
    overrides: SetOption = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="HTML file to write (default: <work_dir>/report.html).")] = None,
) -> None:
    """Write one self-contained HTML page about the finished run (Recall@K charts, wins and
    losses, training curve, style space, index recall, bad inputs, example queries) and print
    its path. The score stage must have finished for this config (`fsr-pipe run all`)."""
    from pipeline import commands
    from stages import all_stages

    cfg = _setup(config, overrides, quiet=True)
    path, _ = commands.report(all_stages, cfg, out)
    typer.echo(str(path))


def _flat(result):  # noqa: ANN001, ANN202 - pyarrow Table in and out
    """Nested columns (embeddings, weights, structs) as JSON text: CSV has no lists."""
    import json

    import pyarrow as pa

    for i, field in enumerate(result.schema):
        if pa.types.is_nested(field.type):
            text = [None if v is None else json.dumps(v, default=str)
                    for v in result.column(i).to_pylist()]
            result = result.set_column(i, field.name, pa.array(text, pa.string()))
    return result


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 6:
        return "[" + ", ".join(_cell(v) for v in value[:4]) + f", ... ({len(value)})]"
    return "" if value is None else str(value)


def _table(columns: list[str], rows: list[list[Cell]], title: str | None = None) -> str:
    """A table for stdout (pipeable), coloured on a terminal."""
    return render(columns, rows, title, color=color_on(sys.stdout))


def _print_reports(reports: "list[StageReport]") -> None:
    ran = sum(r.ran for r in reports)
    for r in reports:
        _say(f"  {r.stage:<10} {r.ran} unit(s) run, {r.skipped} already done "
             f"(fingerprint {r.fingerprint})")
    if ran == 0:
        _say("Nothing to do: every unit is done for this config.")


if __name__ == "__main__":
    app()
