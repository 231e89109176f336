"""`slurm`: a stage's pending units as one sbatch array job, one unit per array task.

For each round of a stage's jobs the executor writes, under `<work_dir>/slurm/`, a job file
(`<stage>-<fingerprint>-<n>.jobs.json`) and a readable sbatch script beside it (`.sbatch`);
`n` counts the stage plan's submissions, so a retry never overwrites what an earlier round
ran. Array task i runs `fsr-pipe worker JOBS UNIT_i`, which writes the unit's record; only the
driver ingests records into the catalog.

Without `slurm.submit` (`--submit`) the executor stops the run there (`HandedOff`) and says
how to submit the script; `fsr-pipe run` again afterwards ingests the records and goes on to
the next stage, which gets a script of its own. With it, the executor runs `sbatch`, polls
`sacct` every `slurm.poll_s`, hands each task's record to the driver as soon as the task ends,
and reports a task that ended without one (node failure, time limit, preemption, out of
memory) as lost: the driver resubmits those units in a new, smaller array. Ctrl-C (or any
error) cancels the array with `scancel`. See docs/distributed.md.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.artifacts import write_bytes
from pipeline.config import Config, SlurmConfig
from pipeline.executors.base import (
    Executor,
    Finished,
    HandedOff,
    Outcome,
    gpu_stages,
    read_own_record,
)
from pipeline.jobs import Job
from pipeline.records import RECORDS
from pipeline.stage import PipelineError

log = logging.getLogger(__name__)

SLURM_DIR = "slurm"  # under the run directory: scripts, job files, logs/
# sacct states after which an array task runs no more (CANCELLED may read "CANCELLED by 123").
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "REVOKED"})
# A task that ended without a visible record is looked for again this long before it counts as
# lost: on NFS the driver's host may see a file another node wrote only after its caches expire.
RECORD_GRACE_S = 60.0
# A task sacct has not listed for this long (while sacct answers) counts as lost and is
# cancelled; sacct failing this long in a row stops the run.
UNLISTED_GRACE_S = 600.0
COMMAND_TIMEOUT_S = 120.0  # sbatch, sacct, scancel: slurmctld/slurmdbd may be slow, not dead


@dataclass(frozen=True)
class Submission:
    """The files of one round of a stage's jobs."""

    stage: str
    fingerprint: str
    number: int
    script: Path
    job_file: Path
    units: tuple[str, ...]


def slurm_dir(work_dir: Path) -> Path:
    return work_dir / SLURM_DIR


def next_number(folder: Path, stage: str, fingerprint: str) -> int:
    """1 + the highest submission number of this stage plan's scripts in `folder`."""
    pattern = re.compile(rf"{re.escape(stage)}-{re.escape(fingerprint)}-(\d+)\.sbatch")
    numbers = [int(m.group(1)) for path in folder.glob(f"{stage}-{fingerprint}-*.sbatch")
               if (m := pattern.fullmatch(path.name))]
    return max(numbers, default=0) + 1


def sbatch_options(slurm: SlurmConfig, stage: str, tasks: int, log_dir: Path,
                   gpu: bool) -> list[str]:
    """The script's #SBATCH options (without the prefix), from the [slurm] section; `gpu`:
    the stage computes on a GPU (executors.base.gpu_stages), else slurm.gpus is not asked."""
    options = [f"--job-name=fsr-{stage}", f"--array=0-{tasks - 1}",
               f"--output={log_dir}/%x-%A_%a.out", f"--cpus-per-task={slurm.cpus_per_task}"]
    if slurm.time:
        options.append(f"--time={slurm.time}")
    if slurm.partition:
        options.append(f"--partition={slurm.partition}")
    if slurm.mem:
        options.append(f"--mem={slurm.mem}")
    if slurm.gpus > 0 and gpu:
        options.append(f"--gres=gpu:{slurm.gpus}")
    for line in slurm.extra:
        line = line.strip()
        line = line.removeprefix("#SBATCH").strip()  # "#SBATCH --account=x" works too
        if line:
            options.append(line)
    return options


def script_text(slurm: SlurmConfig, stage: str, fingerprint: str, units: Sequence[str],
                job_file: Path, log_dir: Path, records_dir: Path, number: int,
                gpu: bool = False) -> str:
    """The sbatch array script: task i runs unit units[i] of `job_file`."""
    options = sbatch_options(slurm, stage, len(units), log_dir, gpu)
    # Options are shell words: quoting keeps a path with spaces one word for sbatch.
    sbatch = [f"#SBATCH {shlex.quote(o) if o.startswith('--output=') else o}" for o in options]
    unit_words = " ".join(shlex.quote(u) for u in units)
    return "\n".join([
        "#!/bin/bash",
        f"# fsr-pipe: stage {stage}, plan {fingerprint}, submission {number}: "
        f"{len(units)} unit(s), one per array task.",
        "# Written by `fsr-pipe run --executor slurm`; submit it with: sbatch THIS_SCRIPT",
        "# Array task i runs unit UNITS[i] of the job file below and writes the unit's record to",
        f"#   {records_dir}",
        "# Only the driver ingests records: `fsr-pipe status` shows them, and `fsr-pipe run` "
        "(the same",
        "# command again) ingests them and goes on to the next stage.",
        *sbatch,
        "",
        "set -euo pipefail",
        ': "${SLURM_ARRAY_TASK_ID:?submit this script with sbatch: it is a Slurm array job}"',
        f"UNITS=({unit_words})",
        f"exec {slurm.command} worker {shlex.quote(str(job_file))} "
        '"${UNITS[$SLURM_ARRAY_TASK_ID]}"',
        "",
    ])


def write_submission(config: Config, jobs: Sequence[Job]) -> Submission:
    """Write the job file and the sbatch script of one round of a stage's jobs."""
    stage, fingerprint = jobs[0].stage, jobs[0].fingerprint
    if any(j.stage != stage or j.fingerprint != fingerprint for j in jobs):
        raise ValueError("slurm executor: one stage plan's jobs per run() call")
    folder = slurm_dir(config.work_dir)
    log_dir = folder / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create --output's folder
    number = next_number(folder, stage, fingerprint)
    base = folder / f"{stage}-{fingerprint}-{number}"
    job_file = base.with_name(base.name + ".jobs.json")
    script = base.with_name(base.name + ".sbatch")
    units = tuple(j.unit_key for j in jobs)
    write_bytes(json.dumps({"jobs": [asdict(j) for j in jobs]}, sort_keys=True).encode(),
                job_file)
    records_dir = config.work_dir / stage / fingerprint / RECORDS
    text = script_text(config.slurm, stage, fingerprint, units, job_file, log_dir, records_dir,
                       number, gpu=stage in gpu_stages(config))
    write_bytes(text.encode(), script)
    script.chmod(0o755)
    return Submission(stage, fingerprint, number, script, job_file, units)


def rerun_command(argv: Sequence[str] | None = None) -> str:
    """The `fsr-pipe run ...` command to run again: this process's, when it is one."""
    argv = sys.argv if argv is None else argv
    if len(argv) >= 2 and argv[1] == "run" and (
            Path(argv[0]).name == "fsr-pipe" or argv[0].endswith("pipeline/cli.py")):
        return shlex.join(["fsr-pipe", *argv[1:]])
    return "fsr-pipe run TARGET --executor slurm (this run's target, --config and --set)"


def handoff_message(sub: Submission, earlier: int = 0) -> str:
    """What to do with a script the executor wrote and did not submit."""
    lines = [
        f"{sub.stage}: {len(sub.units)} unit(s) to run on Slurm; wrote the array job",
        f"  {sub.script}",
        "Submit it:",
        f"  sbatch {shlex.quote(str(sub.script))}",
        "When its tasks have ended (squeue --me), run again",
        f"  {rerun_command()}",
        "which ingests their records and goes on to the next stage (`fsr-pipe status` shows "
        "the progress; --submit submits and waits for every stage).",
    ]
    if earlier:
        lines.append(f"({earlier} earlier script(s) of this stage are beside it: if one is "
                     "still queued, let it finish instead of submitting this one.)")
    return "\n".join(lines)


def parse_job_id(stdout: str) -> str:
    """The job id of `sbatch --parsable` output: `12345` or `12345;cluster`."""
    job_id = stdout.strip().splitlines()[-1].split(";")[0].strip() if stdout.strip() else ""
    if not job_id.isdigit():
        raise PipelineError(f"sbatch --parsable printed {stdout.strip()!r}, not a job id")
    return job_id


def _indices(spec: str) -> list[int]:
    """Array indices of `5`, `[5-7]`, `[1,3,5-9:2%4]` (throttle and step allowed)."""
    spec = spec.strip("[]").split("%")[0]
    found: list[int] = []
    for part in filter(None, spec.split(",")):
        span, _, step = part.partition(":")
        first, _, last = span.partition("-")
        found.extend(range(int(first), int(last or first) + 1, int(step or 1)))
    return found


def parse_sacct(text: str, job_id: str) -> dict[int, str]:
    """Array task index -> state, from `sacct --noheader --parsable2 --format=JobID,State`.

    Lines of steps (`123_4.batch`, `123_4.extern`) and of other jobs are left out; a pending
    range (`123_[5-7]|PENDING`) gives each of its tasks; a state is its first word, so
    `CANCELLED by 1000` is CANCELLED."""
    states: dict[int, str] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) < 2 or not fields[0]:
            continue
        name, state = fields[0].strip(), fields[1].strip()
        base, sep, index = name.partition("_")
        if base != job_id or not sep or "." in index:
            continue
        state = (state.split() or ["UNKNOWN"])[0].rstrip("+")
        try:
            indices = _indices(index)
        except ValueError:
            log.warning("sacct: cannot read the job id %r; line ignored", name)
            continue
        for i in indices:
            states[i] = state
    return states


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)


def submit(script: Path) -> str:
    """`sbatch --parsable SCRIPT`; returns the job id."""
    try:
        done = _run(["sbatch", "--parsable", str(script)])
    except subprocess.TimeoutExpired:
        raise PipelineError(f"sbatch {script} did not answer in {COMMAND_TIMEOUT_S:.0f} s; "
                            "check `squeue --me` before running again") from None
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().replace("\n", " ")
        raise PipelineError(f"sbatch {script} failed (exit {done.returncode}): {why}")
    return parse_job_id(done.stdout)


def cancel(target: str) -> None:
    """`scancel TARGET` (a job or one task, `123_4`); a failure is only logged."""
    try:
        done = _run(["scancel", target])
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("scancel %s: %s", target, exc)
        return
    if done.returncode != 0:
        log.warning("scancel %s failed: %s", target, done.stderr.strip())


class SlurmExecutor(Executor):
    name = "slurm"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.slurm = config.slurm
        needed = ["sbatch", "sacct"] if self.slurm.submit else ["sbatch"]
        for tool in needed:
            if shutil.which(tool) is None:
                raise PipelineError(
                    f"`{tool}` is not on PATH: run.executor = slurm needs a Slurm login node "
                    "(or use --executor local)")
        self._sacct_array = True  # sacct --array (newer Slurm); dropped if sacct rejects it

    def run(self, jobs: Sequence[Job], finished: Finished) -> None:
        if not jobs:
            return
        sub = write_submission(self.config, jobs)
        if not self.slurm.submit:
            raise HandedOff(handoff_message(sub, earlier=sub.number - 1))
        job_id = submit(sub.script)
        log.info("%s: submitted Slurm job %s (%d array task(s)): %s", sub.stage, job_id,
                 len(jobs), sub.script)
        try:
            self._wait(job_id, list(jobs), finished)
        except BaseException as exc:
            why = "interrupted" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__
            log.warning("%s: cancelling Slurm job %s (%s)", sub.stage, job_id, why)
            cancel(job_id)
            raise

    def sacct(self, job_id: str) -> dict[int, str] | None:
        """The array's task states, or None when sacct fails (logged)."""
        args = ["sacct", "-j", job_id, "--noheader", "--parsable2", "--format=JobID,State"]
        try:
            done = _run(args[:3] + ["--array"] + args[3:] if self._sacct_array else args)
            if done.returncode != 0 and self._sacct_array and "array" in done.stderr:
                self._sacct_array = False  # an older sacct: pending ranges come as 1_[2-5]
                done = _run(args)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("sacct -j %s: %s", job_id, exc)
            return None
        if done.returncode != 0:
            log.warning("sacct -j %s failed: %s", job_id, done.stderr.strip())
            return None
        return parse_sacct(done.stdout, job_id)

    def _wait(self, job_id: str, jobs: list[Job], finished: Finished) -> None:
        """Poll until every task has ended; report each task's outcome as soon as it has."""
        pending = set(range(len(jobs)))
        unlisted = dict.fromkeys(pending, 0.0)  # seconds sacct answered without the task
        ended: dict[int, float] = {}  # task -> when it was first seen ended without a record
        last_ok = failing_since = time.monotonic()
        while pending:
            states = self.sacct(job_id)
            now = time.monotonic()
            if states is None:
                if now - failing_since > UNLISTED_GRACE_S:
                    raise PipelineError(
                        f"sacct has failed for {now - failing_since:.0f} s, so the tasks of "
                        f"Slurm job {job_id} cannot be followed; see the warnings above")
                last_ok = now  # time without answers does not count as unlisted
                states = {}
            else:
                failing_since = now
                for i in pending:
                    unlisted[i] = 0.0 if i in states else unlisted[i] + now - last_ok
                last_ok = now
            for i in sorted(pending):
                state = states.get(i)
                gone = unlisted[i] > UNLISTED_GRACE_S
                if state == "PENDING" and not gone:
                    continue  # not started: no record to look for
                job = jobs[i]
                record = read_own_record(job)
                if record is not None:
                    pending.discard(i)
                    finished(Outcome(job, record))
                    continue
                if state in TERMINAL_STATES or gone:
                    first = ended.setdefault(i, now)
                    if now - first < RECORD_GRACE_S and not gone:
                        continue  # look again: the record may not be visible here yet
                    pending.discard(i)
                    task = f"{job_id}_{i}"
                    if gone:
                        cancel(task)
                        reason = (f"slurm task {task} was not listed by sacct for "
                                  f"{unlisted[i]:.0f} s (state unknown) and wrote no record")
                    else:
                        reason = f"slurm task {task} ended {state} without a record"
                    finished(Outcome(job, None, reason))
            if pending:
                time.sleep(self.slurm.poll_s)
