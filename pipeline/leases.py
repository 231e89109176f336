"""Who runs a unit right now: lease files with a heartbeat, readable from any host.

A worker writes `<stage>/<fingerprint>/_leases/<unit>.json` (host, pid, attempt, since) when
it starts a unit and touches it every `run.heartbeat_s`; it deletes it when the unit ends. A
lease is *alive* while its heartbeat is fresh, *lost* once it is older than `run.lease_s`
or, on this host, as soon as its process is gone (SIGKILL, out of memory). Only lost units are
redone, so two hosts never run one unit at once. See docs/distributed.md.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict
from pathlib import Path

from pipeline.frozen import frozen

LEASES = "_leases"
HOST_ENV = "FSR_HOSTNAME"  # overrides the host name (containers, tests with two "hosts")


def this_host() -> str:
    """The name this process goes by in leases, records and temporary file names."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@frozen
class Lease:
    unit_key: str
    host: str
    pid: int
    attempt: int
    since: float  # unix time the unit started
    heartbeat: float  # unix time of the last heartbeat (the file's mtime)

    def state(self, lease_s: float, now: float | None = None) -> str:
        """'alive' or 'lost' (see the module docstring)."""
        now = time.time() if now is None else now
        if self.host == this_host() and not pid_alive(self.pid):
            return "lost"
        return "lost" if now - self.heartbeat > lease_s else "alive"


def lease_path(out_dir: Path, unit_key: str) -> Path:
    return out_dir / LEASES / f"{unit_key}.json"


def _load(path: Path) -> Lease | None:
    try:
        data = json.loads(path.read_text())
        heartbeat = path.stat().st_mtime
    except (OSError, ValueError):  # gone (the unit ended), or being replaced
        return None
    return Lease(data["unit_key"], data["host"], data["pid"], data["attempt"], data["since"],
                 heartbeat)


def read_lease(out_dir: Path, unit_key: str) -> Lease | None:
    """One unit's lease, or None when nobody runs it."""
    return _load(lease_path(out_dir, unit_key))


def read_leases(out_dir: Path) -> dict[str, Lease]:
    """Every lease file under a stage plan's folder, by unit key."""
    folder = out_dir / LEASES
    if not folder.is_dir():
        return {}
    found = (_load(Path(entry.path)) for entry in os.scandir(folder)
             if entry.name.endswith(".json") and not entry.name.startswith("."))
    return {lease.unit_key: lease for lease in found if lease is not None}


class Holding:
    """Context manager: hold the lease of one unit, heartbeating in a daemon thread."""

    def __init__(self, out_dir: Path, unit_key: str, attempt: int, heartbeat_s: float) -> None:
        self.path = lease_path(out_dir, unit_key)
        self.heartbeat_s = heartbeat_s
        now = time.time()
        self.lease = Lease(unit_key, this_host(), os.getpid(), attempt, now, now)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"lease {unit_key}")

    def __enter__(self) -> Holding:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self.lease)
        del data["heartbeat"]  # the file's mtime is the heartbeat
        tmp = self.path.with_name(f".{self.path.name}.{this_host()}.{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)
        try:
            self._thread.start()
        except BaseException:  # a signal before the heartbeat runs: leave no lease behind
            self.path.unlink(missing_ok=True)
            raise
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:  # reset deleted the stage meanwhile
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        holder = _load(self.path)
        if holder is None or (holder.host, holder.pid) == (self.lease.host, self.lease.pid):
            self.path.unlink(missing_ok=True)  # never another worker's lease


class UnitBusy(RuntimeError):
    """Another live worker holds the unit's lease: this one must not run it too."""


def check_free(out_dir: Path, unit_key: str, lease_s: float) -> None:
    """Raise UnitBusy if a live worker other than this process holds the unit's lease."""
    lease = read_lease(out_dir, unit_key)
    if lease is None or (lease.host, lease.pid) == (this_host(), os.getpid()):
        return
    if lease.state(lease_s) == "alive":
        raise UnitBusy(f"unit {unit_key} is being run by {lease.host} (pid {lease.pid}, "
                       f"attempt {lease.attempt}); not running it twice")


def release(out_dir: Path, unit_key: str, attempt: int) -> None:
    """Delete the lease of an attempt the executor saw end (its worker is gone: killed, actor
    or Slurm task ended), so the retry need not wait `run.lease_s` for it to look lost."""
    lease = read_lease(out_dir, unit_key)
    if lease is not None and lease.attempt == attempt:
        lease_path(out_dir, unit_key).unlink(missing_ok=True)
