"""Small array helpers shared by stages: vectors <-> Arrow, stable ids, seeded hashing."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa


def vectors_to_arrow(x: np.ndarray, dtype: str = "float32") -> pa.FixedSizeListArray:
    """(n, d) array -> Arrow fixed_size_list<dtype>[d] (DuckDB reads it as FLOAT[d])."""
    assert x.ndim == 2, f"expected (n, d), got {x.shape}"
    x = np.ascontiguousarray(x, dtype=dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def arrow_to_vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Arrow (fixed-size) list<float> column of equal-length rows -> (n, d) float32 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array(
            [], type=column.type)
    # A copy: Arrow buffers are read-only, and torch refuses (warns on) read-only arrays.
    flat = np.array(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    if len(column) == 0:
        return flat.reshape(0, getattr(column.type, "list_size", 0))
    assert len(flat) % len(column) == 0, "rows of different lengths"
    return flat.reshape(len(column), -1)


def stable_id(key: str) -> int:
    """A non-negative int64 id from a string key: stable across runs and machines."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def stable_uniform(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by (seed, key): seeded splits and samples without state."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64
