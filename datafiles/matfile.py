"""A small numpy-only reader for MATLAB level-5 MAT-files (numeric arrays only).

SVHN ships as `train_32x32.mat` / `test_32x32.mat` in this format; reading it here keeps
scipy off the devices. Supports both byte orders, zlib-compressed variables and MATLAB's
habit of storing an array in a narrower type than its class (e.g. a double array kept as
uint8). Cells, structs, sparse, char and complex arrays are skipped, not read.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from contract.errors import UsageError

HEADER_BYTES = 128
MI_MATRIX, MI_COMPRESSED = 14, 15
# Storage types of data elements (miINT8 ... miUINT64).
MI_TYPES = {
    1: "i1",
    2: "u1",
    3: "i2",
    4: "u2",
    5: "i4",
    6: "u4",
    7: "f4",
    9: "f8",
    12: "i8",
    13: "u8",
}
# Array classes of numeric arrays (mxDOUBLE_CLASS ... mxUINT64_CLASS).
MX_CLASSES = {
    6: "f8",
    7: "f4",
    8: "i1",
    9: "u1",
    10: "i2",
    11: "u2",
    12: "i4",
    13: "u4",
    14: "i8",
    15: "u8",
}
COMPLEX_FLAG = 0x0800


class _Elements:
    """Walks the tagged data elements of a byte string."""

    def __init__(self, data: bytes, order: str, path: Path) -> None:
        self.data, self.order, self.path, self.pos = data, order, path, 0

    def next(self, pad: bool = True) -> tuple[int, bytes]:
        """(type, payload) of the next element; `pad` skips to the next 8-byte boundary."""
        if self.pos + 8 > len(self.data):
            raise UsageError(f"{self.path}: truncated MAT-file element at byte {self.pos}")
        first = int(np.frombuffer(self.data, self.order + "u4", 1, self.pos)[0])
        if first >> 16:  # small data element: type, size and up to 4 bytes in 8 bytes
            mtype, size = first & 0xFFFF, first >> 16
            if size > 4:
                raise UsageError(f"{self.path}: bad small MAT-file element at byte {self.pos}")
            payload = self.data[self.pos + 4 : self.pos + 4 + size]
            self.pos += 8
            return mtype, payload
        size = int(np.frombuffer(self.data, self.order + "u4", 1, self.pos + 4)[0])
        start, end = self.pos + 8, self.pos + 8 + size
        if end > len(self.data):
            raise UsageError(
                f"{self.path}: MAT-file element at byte {self.pos} needs {size} bytes, "
                f"{len(self.data) - start} left (truncated file?)"
            )
        self.pos = end + (-size % 8 if pad else 0)
        return first, self.data[start:end]

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)


def _numeric(payload: bytes, mtype: int, order: str, path: Path) -> np.ndarray:
    if mtype not in MI_TYPES:
        raise UsageError(f"{path}: unsupported MAT-file data type {mtype}")
    return np.frombuffer(payload, dtype=order + MI_TYPES[mtype])


def _read_matrix(payload: bytes, order: str, path: Path) -> tuple[str, np.ndarray | None]:
    """Name and value of one miMATRIX element; value None when it is not a real numeric array."""
    parts = _Elements(payload, order, path)
    _, flags_raw = parts.next()
    flags = int(np.frombuffer(flags_raw, order + "u4", 1)[0])
    mx_class = flags & 0xFF
    dims_type, dims_raw = parts.next()
    dims = tuple(int(d) for d in _numeric(dims_raw, dims_type, order, path))
    _, name_raw = parts.next()
    name = name_raw.decode("ascii", errors="replace")
    if mx_class not in MX_CLASSES or flags & COMPLEX_FLAG:
        return name, None
    data_type, data_raw = parts.next()
    values = _numeric(data_raw, data_type, order, path)
    count = int(np.prod(dims))
    if values.size != count:
        raise UsageError(
            f"{path}: variable {name!r} has {values.size} values, expected {count} for shape {dims}"
        )
    return name, values.astype(MX_CLASSES[mx_class]).reshape(dims, order="F")


def read_mat5(path: Path, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The real numeric variables of a level-5 MAT-file (only `names` when given)."""
    data = Path(path).read_bytes()
    if len(data) < HEADER_BYTES:
        raise UsageError(f"{path}: {len(data)} bytes is too short for a MAT-file header")
    endian = data[126:128]
    if endian not in (b"IM", b"MI") or not data[:6] == b"MATLAB":
        raise UsageError(
            f"{path}: not a MATLAB 5 MAT-file (header {data[:10]!r}, endian mark {endian!r})"
        )
    order = "<" if endian == b"IM" else ">"
    elements = _Elements(data[HEADER_BYTES:], order, path)
    variables: dict[str, np.ndarray] = {}
    while not elements.done:
        mtype, payload = elements.next(pad=False)
        if mtype == MI_COMPRESSED:
            try:
                payload = zlib.decompress(payload)
            except zlib.error as exc:
                raise UsageError(f"{path}: corrupt compressed variable ({exc})") from None
            mtype, payload = _Elements(payload, order, path).next()
        if mtype != MI_MATRIX:
            continue
        name, value = _read_matrix(payload, order, path)
        if value is not None and (names is None or name in names):
            variables[name] = value
    return variables
