"""Atomic artifact writes: write to a temporary name, fsync, rename; describe for the catalog.

A killed process leaves at most a `.<name>.tmp.<host>.<pid>` file, never a partial file under
the final name; `remove_stale_tmp` deletes those whose process is gone, and never another
host's while its unit may still be alive.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.leases import Lease, pid_alive, this_host
from pipeline.records import RECORDS, ArtifactRecord

if TYPE_CHECKING:
    import pyarrow as pa

TMP_MARK = ".tmp."


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it is fsynced and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{this_host()}.{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet(table: pa.Table, path: str | Path) -> Path:
    """Atomically write `table` to `path` (zstd); returns the path."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def write_bytes(data: bytes, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe(kind: str, path: str | Path, rows: int | None) -> ArtifactRecord:
    """The catalog record of a finished artifact file."""
    path = Path(path).resolve()
    return ArtifactRecord(kind, str(path), rows, path.stat().st_size, sha256_file(path))


def _tmp_owner(tmp: Path, directory: Path) -> tuple[str, int | None, str]:
    """(host, pid, unit key) of a temporary file under a stage plan's folder."""
    owner = tmp.name.rsplit(TMP_MARK, 1)[-1]
    host, _, pid = owner.rpartition(".")
    rel = tmp.relative_to(directory).parts
    unit = rel[0] if len(rel) > 1 and rel[0] != RECORDS else tmp.name[1:].split(".json", 1)[0]
    return host or this_host(), int(pid) if pid.isdigit() else None, unit


def remove_stale_tmp(directory: str | Path, leases: Mapping[str, Lease] | None = None,
                     lease_s: float = 120.0) -> int:
    """Delete temporary files left by dead processes under a stage plan's folder.

    This host's files go when their process is gone. Another host's (a shared run directory)
    go only when their unit has no live lease in `leases` and the file is older than
    `lease_s`: its process cannot be checked from here. Returns the count."""
    removed = 0
    directory = Path(directory)
    if not directory.exists():
        return 0
    here, now = this_host(), time.time()
    for tmp in directory.rglob(f".*{TMP_MARK}*"):
        host, pid, unit = _tmp_owner(tmp, directory)
        if host == here:
            stale = pid is not None and not pid_alive(pid)
        else:
            lease = (leases or {}).get(unit)
            try:
                old = now - tmp.stat().st_mtime > lease_s
            except FileNotFoundError:
                continue
            stale = old and (lease is None or lease.state(lease_s, now) == "lost")
        if stale:
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed
