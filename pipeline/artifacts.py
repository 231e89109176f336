"""Atomic artifact writes: write to a temporary name, fsync, rename; describe for the catalog.

A killed process leaves at most a `.<name>.tmp.<pid>` file, never a partial file under the
final name; `remove_stale_tmp` deletes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.catalog import ArtifactRecord, pid_alive

TMP_MARK = ".tmp."


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it is fsynced and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet(table: pa.Table, path: str | Path) -> Path:
    """Atomically write `table` to `path` (zstd); returns the path."""
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


def remove_stale_tmp(directory: str | Path) -> int:
    """Delete temporary files left by dead processes under `directory`; returns the count."""
    removed = 0
    directory = Path(directory)
    if not directory.exists():
        return 0
    for tmp in directory.rglob(f".*{TMP_MARK}*"):
        pid_text = tmp.name.rsplit(TMP_MARK, 1)[-1]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed
