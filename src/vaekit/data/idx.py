"""Reading and writing IDX files (the MNIST file format), plain or gzipped."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

from vaekit.errors import DataError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES = {np.dtype(np.uint8): 0x08}


def read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the name ends in ``.gz``."""
    raw = Path(path).read_bytes()
    return gzip.decompress(raw) if str(path).endswith(".gz") else raw


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def md5_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into an array of the stored shape; raises DataError on malformed input."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DataError(f"{source} is not an IDX file (bad magic number {data[:4]!r})")
    dtype, ndim = np.dtype(_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"{source}: IDX header announces shape {shape} ({expected} bytes), file has {len(data)}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def encode_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX bytes."""
    code = _CODES.get(array.dtype)
    if code is None:
        raise DataError(f"encode_idx supports uint8 arrays, got dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return header + np.ascontiguousarray(array).tobytes()
