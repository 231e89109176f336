"""The slurm executor against a fake Slurm: `sbatch` really runs the array script's tasks as
local processes (two at a time), `sacct` reports their states, `scancel` kills them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_tiny_config
from test_resume import results
from typer.testing import CliRunner

from pipeline import commands
from pipeline.catalog import Catalog
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.executors import HandedOff
from pipeline.executors import slurm as slurm_mod
from pipeline.executors.slurm import SlurmExecutor, parse_job_id, parse_sacct
from pipeline.jobs import Job
from pipeline.stage import PipelineError
from stages import all_stages

SUBMIT = ['run.executor="slurm"', "slurm.submit=true", "slurm.poll_s=0.2"]

# The array tasks of one fake job: run `bash SCRIPT` per index, two at a time, keeping each
# task's state in $FAKE_SLURM_STATE/<job id>.json. FAKE_SLURM_KILL_ONCE=<unit>: on the first
# submission that has that unit, SIGKILL its task once the unit holds its lease (a lost node).
LAUNCHER = r'''
import json, os, re, shlex, signal, subprocess, sys, time
from pathlib import Path

job_id, script = sys.argv[1], Path(sys.argv[2])
state_dir = Path(os.environ["FAKE_SLURM_STATE"])
text = script.read_text()
tasks = int(re.search(r"^#SBATCH --array=0-(\d+)$", text, re.M).group(1)) + 1
name = re.search(r"^#SBATCH --job-name=(\S+)$", text, re.M).group(1)
output = shlex.split(re.search(r"^#SBATCH (.*--output=.*)$", text, re.M).group(1))[0]
output = output.split("=", 1)[1]
units = shlex.split(re.search(r"^UNITS=\((.*)\)$", text, re.M).group(1))
states = {i: "PENDING" for i in range(tasks)}


def save():
    tmp = state_dir / f".{job_id}.json.tmp"
    tmp.write_text(json.dumps(states))
    os.replace(tmp, state_dir / f"{job_id}.json")


kill_at, lease = None, None
marker = state_dir / "killed-once"
unit = os.environ.get("FAKE_SLURM_KILL_ONCE")
if unit in units and not marker.exists():
    words = shlex.split(re.search(r"^exec (.*)$", text, re.M).group(1))
    job_file = words[words.index("worker") + 1]
    job = next(j for j in json.loads(Path(job_file).read_text())["jobs"] if j["unit_key"] == unit)
    lease = Path(job["plan_file"]).parent / "_leases" / f"{unit}.json"
    kill_at = units.index(unit)
killed = None
todo, running = list(range(tasks)), {}
while todo or running:
    while todo and len(running) < 2:
        i = todo.pop(0)
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_JOB_ID": job_id,
               "SLURM_JOB_NAME": name}
        log = output.replace("%x", name).replace("%A", job_id).replace("%a", str(i))
        with open(log, "w") as out:
            running[i] = subprocess.Popen(["bash", str(script)], env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        (state_dir / f"{job_id}_{i}.pid").write_text(str(running[i].pid))
        states[i] = "RUNNING"
        save()
    if kill_at in running and killed is None and lease.exists():
        os.killpg(running[kill_at].pid, signal.SIGKILL)
        marker.touch()
        killed = kill_at
    for i, proc in list(running.items()):
        code = proc.poll()
        if code is None:
            continue
        del running[i]
        states[i] = "COMPLETED" if code == 0 else "NODE_FAIL" if i == killed else "FAILED"
        save()
    time.sleep(0.002 if kill_at is not None and killed is None else 0.02)
'''

SBATCH = r'''
import json, os, re, subprocess, sys
from pathlib import Path

state_dir = Path(os.environ["FAKE_SLURM_STATE"])
args = sys.argv[1:]
assert "--parsable" in args, args
script = Path(args[-1])
tasks = int(re.search(r"^#SBATCH --array=0-(\d+)$", script.read_text(), re.M).group(1)) + 1
counter = state_dir / "next-id"
job_id = int(counter.read_text()) if counter.exists() else 1000
counter.write_text(str(job_id + 1))
(state_dir / f"{job_id}.json").write_text(json.dumps({i: "PENDING" for i in range(tasks)}))
with open(state_dir / "submitted", "a") as out:
    out.write(f"{job_id} {script}\n")
if not os.environ.get("FAKE_SLURM_HOLD"):  # else the tasks stay pending
    with open(state_dir / f"{job_id}.launcher.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(state_dir.parent / "launcher.py"),
                                 str(job_id), str(script)], start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    (state_dir / f"{job_id}.pid").write_text(str(proc.pid))
print(f"{job_id};fakecluster")
'''

# FAKE_SACCT_OLD=1: an sacct without --array (pending tasks come as one 1000_[0-3] line).
SACCT = r'''
import json, os, sys
from pathlib import Path

state_dir = Path(os.environ["FAKE_SLURM_STATE"])
args = sys.argv[1:]
if "--array" in args and os.environ.get("FAKE_SACCT_OLD"):
    sys.exit("sacct: unrecognized option '--array'")
if os.environ.get("FAKE_SLURM_HIDE"):
    sys.exit(0)
job_id = args[args.index("-j") + 1]
states = json.loads((state_dir / f"{job_id}.json").read_text())
pending = [int(i) for i, s in states.items() if s == "PENDING"]
if pending and "--array" not in args:
    print(f"{job_id}_[{min(pending)}-{max(pending)}]|PENDING")
for i, state in states.items():
    if state == "PENDING" and "--array" not in args:
        continue
    print(f"{job_id}_{i}|{state}")
    if state != "PENDING":
        print(f"{job_id}_{i}.batch|{'COMPLETED' if state == 'RUNNING' else state}")
'''

SCANCEL = r'''
import json, os, signal, sys
from pathlib import Path

state_dir = Path(os.environ["FAKE_SLURM_STATE"])
target = sys.argv[1]
with open(state_dir / "scancel", "a") as out:
    out.write(target + "\n")
job_id, _, task = target.partition("_")
pids = [state_dir / f"{job_id}.pid"] if not task else []
pids += [state_dir / f"{job_id}_{task}.pid"] if task else sorted(state_dir.glob(f"{job_id}_*.pid"))
for path in pids:
    try:
        os.killpg(int(path.read_text()), signal.SIGKILL)
    except (OSError, ValueError):
        pass
states = json.loads((state_dir / f"{job_id}.json").read_text())
for i, state in states.items():
    if (not task or i == task) and state in ("PENDING", "RUNNING"):
        states[i] = "CANCELLED by 1000"
(state_dir / f"{job_id}.json").write_text(json.dumps(states))
'''


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch, repo_root):
    """sbatch, sacct and scancel first on PATH; returns the folder of their state files."""
    root = tmp_path / "fake-slurm"
    bin_dir, state = root / "bin", root / "state"
    bin_dir.mkdir(parents=True)
    state.mkdir()
    (root / "launcher.py").write_text(LAUNCHER)
    for name, code in (("sbatch", SBATCH), ("sacct", SACCT), ("scancel", SCANCEL)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{code}")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_STATE", str(state))
    monkeypatch.setenv("PYTHONPATH", str(repo_root))
    yield state
    for pid_file in state.glob("*.pid"):  # nothing of a fake job outlives its test
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def slurm_section(**values: object) -> str:
    """A [slurm] section whose tasks run this checkout's CLI with this interpreter."""
    values = {"command": f"{sys.executable} -m pipeline.cli", **values}
    return "\n[slurm]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def submitted(state: Path) -> list[tuple[str, Path]]:
    path = state / "submitted"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(job_id, Path(script)) for job_id, script in (line.split(" ", 1) for line in lines)]


def script_units(script: Path) -> list[str]:
    line = next(x for x in script.read_text().splitlines() if x.startswith("UNITS=("))
    return line[len("UNITS=("):-1].split()


TIMINGS = ("queries_per_s",)  # measured, not computed: differs between any two runs


def parquet_rows(work_dir: Path) -> dict[tuple[str, str, str], object]:
    """Every current Parquet artifact's rows (timings left out), by (stage, unit, file)."""
    catalog = Catalog.in_dir(work_dir)
    out = {}
    for stage, unit, path in catalog.rows(
            "SELECT stage, unit_key, path FROM artifacts WHERE path LIKE '%.parquet' "
            "ORDER BY ALL"):
        table = pq.read_table(path)
        table = table.drop_columns([c for c in TIMINGS if c in table.column_names])
        if "path" in table.column_names:  # prepare's image paths are absolute
            rel = [p and os.path.relpath(p, work_dir) for p in table["path"].to_pylist()]
            table = table.set_column(table.column_names.index("path"), "path",
                                     pa.array(rel, pa.string()))
        out[(stage, unit, Path(path).name)] = table
    return out


def unit_states(work_dir: Path) -> dict[str, set[str]]:
    rows = Catalog.in_dir(work_dir).rows("SELECT stage, status FROM units")
    out: dict[str, set[str]] = {}
    for stage, status in rows:
        out.setdefault(stage, set()).add(status)
    return out


@pytest.mark.slow
def test_submitted_array_jobs_give_the_inline_results(tmp_path, fake_slurm):
    (tmp_path / "ref").mkdir()
    reference = write_tiny_config(tmp_path / "ref", tmp_path / "ref" / "run", items=16)
    commands.run(all_stages, load_config(reference), ["all"], progress=False)

    (tmp_path / "sl").mkdir()
    work = tmp_path / "sl" / "run"
    path = write_tiny_config(tmp_path / "sl", work, items=16, extra=slurm_section())
    started = time.monotonic()
    reports = commands.run(all_stages, load_config(path, SUBMIT), ["all"], progress=False)
    took = time.monotonic() - started

    assert all(r.ran == r.units and r.retried == 0 for r in reports), reports
    assert unit_states(work) == {r.stage: {"done"} for r in reports}
    jobs = submitted(fake_slurm)
    assert len(jobs) == len(reports), jobs  # one array job per stage
    assert [script_units(s) for _, s in jobs] == [
        [u.key for u in Catalog.in_dir(work).units(r.stage, r.fingerprint)] for r in reports]
    # Each task logged to the script's --output file, and ran as a task (not the driver).
    logs = sorted(p.name for p in (work / "slurm" / "logs").iterdir())
    assert len(logs) == sum(r.units for r in reports) and "fsr-extract-1002_3.out" in logs
    pids = Catalog.in_dir(work).rows("SELECT DISTINCT pid FROM units")
    assert os.getpid() not in {pid for (pid,) in pids}

    expected, got = results(tmp_path / "ref" / "run"), results(work)
    for view in expected:
        assert got[view].equals(expected[view]), f"{view} differs from the inline run"
    expected_rows, got_rows = parquet_rows(tmp_path / "ref" / "run"), parquet_rows(work)
    assert got_rows.keys() == expected_rows.keys()
    for key, table in expected_rows.items():
        assert got_rows[key].equals(table), f"{key} differs from the inline run"
    print(f"slurm run all: {took:.1f}s")


def test_a_task_lost_without_a_record_is_resubmitted_alone(tmp_path, fake_slurm, monkeypatch):
    work = tmp_path / "run"
    path = write_tiny_config(tmp_path, work, items=16, extra=slurm_section())
    commands.run(all_stages,
                 load_config(path), ["prepare"], progress=False)  # inline, in this process
    monkeypatch.setattr(slurm_mod, "RECORD_GRACE_S", 0.5)
    monkeypatch.setenv("FAKE_SLURM_KILL_ONCE", "shard-00001")
    monkeypatch.setenv("FAKE_SACCT_OLD", "1")  # and an sacct without --array
    reports = commands.run(all_stages, load_config(path, SUBMIT), ["extract"], progress=False)

    extract = {r.stage: r for r in reports}["extract"]
    assert (extract.units, extract.ran, extract.retried) == (4, 4, 1), extract
    assert (fake_slurm / "killed-once").exists()
    jobs = submitted(fake_slurm)
    scripts = [s for _, s in jobs]
    assert [s.name for s in scripts] == [f"extract-{extract.fingerprint}-{n}.sbatch"
                                         for n in (1, 2)]
    assert script_units(scripts[0]) == [f"shard-{i:05d}" for i in range(4)]
    assert script_units(scripts[1]) == ["shard-00001"]  # only the lost unit, in a new array
    assert "--array=0-0" in scripts[1].read_text()
    assert json.loads((fake_slurm / f"{jobs[0][0]}.json").read_text())["1"] == "NODE_FAIL"
    catalog = Catalog.in_dir(work)
    units = {u.key: u for u in catalog.units("extract", extract.fingerprint)}
    assert {u.status for u in units.values()} == {"done"}
    record = json.loads((work / "extract" / extract.fingerprint / "_records" /
                         "shard-00001.json").read_text())
    assert record["attempt"] == 2 and record["status"] == "done"
    # Both job files are kept: the first still names all four units.
    job_files = sorted((work / "slurm").glob("extract-*.jobs.json"))
    assert [len(json.loads(p.read_text())["jobs"]) for p in job_files] == [4, 1]


def run_tasks(script: Path, tasks: int) -> None:
    """What Slurm would do with a submitted script: run its array tasks (two at a time)."""
    procs: list[subprocess.Popen] = []
    for i in range(tasks):
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_JOB_ID": "77"}
        procs.append(subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
        if len(procs) % 2 == 0 or i == tasks - 1:
            for proc in procs[-2:]:
                out, _ = proc.communicate(timeout=300)
                assert proc.returncode == 0, out


def test_without_submit_the_script_is_handed_over_then_ingested(tmp_path, fake_slurm):
    work = tmp_path / "run"
    section = slurm_section(partition="gpu-a100", time="00:30:00", gpus=2, mem="16G",
                            cpus_per_task=3, extra=["--account=proj42", "--qos=low"])
    path = write_tiny_config(tmp_path, work, items=16, extra=section)
    commands.run(all_stages, load_config(path), ["prepare"], progress=False)
    slurm_cfg = load_config(path, ['run.executor="slurm"'])
    with pytest.raises(HandedOff) as info:
        commands.run(all_stages, slurm_cfg, ["cluster"], progress=False)
    fp = {s.stage: s.fingerprint for s in commands.status(all_stages, slurm_cfg)}
    script = work / "slurm" / f"extract-{fp['extract']}-1.sbatch"
    message = str(info.value)
    assert str(script) in message and f"sbatch {script}" in message
    assert "fsr-pipe run" in message and "next stage" in message
    assert not submitted(fake_slurm), "nothing is submitted without --submit"

    text = script.read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "stage extract" in text and fp["extract"] in text and "fsr-pipe status" in text
    sbatch = [line for line in lines if line.startswith("#SBATCH ")]
    assert sbatch == [
        "#SBATCH --job-name=fsr-extract", "#SBATCH --array=0-3",
        f"#SBATCH --output={work}/slurm/logs/%x-%A_%a.out", "#SBATCH --cpus-per-task=3",
        "#SBATCH --time=00:30:00", "#SBATCH --partition=gpu-a100", "#SBATCH --mem=16G",
        "#SBATCH --gres=gpu:2", "#SBATCH --account=proj42", "#SBATCH --qos=low"]
    assert "UNITS=(shard-00000 shard-00001 shard-00002 shard-00003)" in lines
    assert "set -euo pipefail" in lines
    job_file = work / "slurm" / f"extract-{fp['extract']}-1.jobs.json"
    assert (f"exec {sys.executable} -m pipeline.cli worker {job_file} "
            '"${UNITS[$SLURM_ARRAY_TASK_ID]}"') in lines
    assert (work / "slurm" / "logs").is_dir()  # sbatch would not create it

    # Outside an array task the script says so instead of running anything.
    env = {k: v for k, v in os.environ.items() if k != "SLURM_ARRAY_TASK_ID"}
    bare = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert bare.returncode != 0 and "submit this script with sbatch" in bare.stderr

    run_tasks(script, 4)  # "the user submits it"
    with pytest.raises(HandedOff) as info:
        commands.run(all_stages, slurm_cfg, ["cluster"], progress=False)
    catalog = Catalog.in_dir(work)
    assert {u.status for u in catalog.units("extract", fp["extract"])} == {"done"}
    script = work / "slurm" / f"cluster-{fp['cluster']}-1.sbatch"
    assert str(script) in str(info.value)
    text = script.read_text()
    assert "#SBATCH --array=0-0" in text and "UNITS=(all)" in text.splitlines()
    assert "--gres" not in text and "gpu:" not in text  # cluster runs on CPUs
    assert "#SBATCH --partition=gpu-a100" in text and "#SBATCH --account=proj42" in text


def test_no_sbatch_on_path_is_one_error_line(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    path = write_tiny_config(tmp_path, tmp_path / "run", items=16)
    with pytest.raises(PipelineError, match="`sbatch` is not on PATH"):
        SlurmExecutor(load_config(path, ['run.executor="slurm"']))
    result = CliRunner().invoke(app, ["run", "all", "--config", str(path), "--executor",
                                      "slurm"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "sbatch" in errors[0] and "--executor local" in errors[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "ingest").exists()  # it stopped before running anything
    # --submit also needs sacct (to follow the tasks); writing the script needs only sbatch.
    (empty / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (empty / "sbatch").chmod(0o755)
    SlurmExecutor(load_config(path, ['run.executor="slurm"']))
    with pytest.raises(PipelineError, match="`sacct` is not on PATH"):
        SlurmExecutor(load_config(path, ['run.executor="slurm"', "slurm.submit=true"]))


def test_sacct_output_is_parsed():
    text = textwrap.dedent("""\
        123_0|COMPLETED
        123_0.batch|COMPLETED
        123_0.extern|COMPLETED
        123_1|CANCELLED by 1000
        123_1.batch|CANCELLED
        123_2|RUNNING
        123_[5-7]|PENDING
        123_[9,11-15:2%2]|PENDING
        123_3|OUT_OF_MEMORY
        123_4|FAILED+
        999_8|COMPLETED
        123|PENDING

        garbage line
        """)
    assert parse_sacct(text, "123") == {
        0: "COMPLETED", 1: "CANCELLED", 2: "RUNNING", 3: "OUT_OF_MEMORY", 4: "FAILED",
        5: "PENDING", 6: "PENDING", 7: "PENDING", 9: "PENDING", 11: "PENDING", 13: "PENDING",
        15: "PENDING"}
    assert parse_sacct("", "123") == {}
    assert parse_job_id("4242\n") == "4242" and parse_job_id("4242;cluster1\n") == "4242"
    with pytest.raises(PipelineError, match="not a job id"):
        parse_job_id("sbatch: error: nope")


def _jobs(config, n: int) -> list[Job]:
    plan = config.work_dir / "extract" / "fp0" / "_plan.json"
    return [Job.of(config, plan, f"shard-{i:05d}", {}, "extract", "fp0", "stages:all_stages")
            for i in range(n)]


def test_ctrl_c_while_waiting_cancels_the_array(tmp_path, fake_slurm, monkeypatch):
    monkeypatch.setenv("FAKE_SLURM_HOLD", "1")  # the tasks stay pending
    path = write_tiny_config(tmp_path, tmp_path / "run", items=16, extra=slurm_section())
    executor = SlurmExecutor(load_config(path, SUBMIT))
    polls = []
    real_sacct = executor.sacct

    def sacct(job_id: str) -> dict[int, str] | None:  # Ctrl-C at the second poll
        polls.append(real_sacct(job_id))
        if len(polls) == 2:
            raise KeyboardInterrupt
        return polls[-1]

    monkeypatch.setattr(executor, "sacct", sacct)
    outcomes = []
    with pytest.raises(KeyboardInterrupt):
        executor.run(_jobs(load_config(path, SUBMIT), 3), outcomes.append)
    assert outcomes == [] and polls[0] == {0: "PENDING", 1: "PENDING", 2: "PENDING"}
    [(job_id, _)] = submitted(fake_slurm)
    assert (fake_slurm / "scancel").read_text().split() == [job_id]
    assert set(json.loads((fake_slurm / f"{job_id}.json").read_text()).values()) == {
        "CANCELLED by 1000"}


def test_a_task_sacct_never_lists_counts_as_lost(tmp_path, fake_slurm, monkeypatch):
    monkeypatch.setenv("FAKE_SLURM_HOLD", "1")
    monkeypatch.setenv("FAKE_SLURM_HIDE", "1")  # sacct answers, listing nothing
    monkeypatch.setattr(slurm_mod, "UNLISTED_GRACE_S", 0.3)
    path = write_tiny_config(tmp_path, tmp_path / "run", items=16,
                             extra=slurm_section(poll_s=0.1))
    config = load_config(path, SUBMIT)
    outcomes = []
    SlurmExecutor(config).run(_jobs(config, 2), outcomes.append)
    assert [o.record for o in outcomes] == [None, None]
    assert all("was not listed by sacct" in o.reason for o in outcomes), outcomes
    [(job_id, _)] = submitted(fake_slurm)
    assert sorted((fake_slurm / "scancel").read_text().split()) == [f"{job_id}_0",
                                                                    f"{job_id}_1"]
