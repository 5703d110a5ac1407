"""Bit-packed storage for sign and mask tensors: 8 values per byte.

Tensors are packed row by row (first dimension = samples), each row padded to a
whole byte, so a batch can be packed or unpacked in chunks of samples and the
pieces concatenate to the same result.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)
# Packing 8 bools at once: read them as one little-endian int64 (byte j = bool j) and
# multiply so that byte j's low bit lands on bit 56 + j; the products never overlap.
_GATHER_MAGIC = 0x0102040810204080
_FAST_PACK = sys.byteorder == "little"
# Unpacking by table look-up: row b holds the 8 bits of byte value b, lowest first.
_BIT_TABLE = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(torch.bool)
_SIGN_TABLES: dict[tuple[torch.dtype, float], torch.Tensor] = {}


@dataclass
class PackedBits:
    """A boolean tensor of `shape`, held as uint8 bytes of shape (rows, ceil(features / 8))."""

    data: torch.Tensor
    shape: torch.Size
    scale: float = 1.0  # value of a set bit when read as signs (+scale / -scale)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def _features(shape: torch.Size) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (rows first) into uint8 bytes, one padded byte run per row."""
    rows = mask.shape[0]
    flat = mask.reshape(rows, -1)
    features = flat.shape[1]
    pad = (-features) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    if not _FAST_PACK:
        groups = flat.reshape(rows, -1, 8).to(torch.uint8)
        groups <<= _SHIFTS
        return groups.sum(dim=2, dtype=torch.uint8)
    flat = flat.to(torch.bool).contiguous()
    if flat.storage_offset() % 8:
        flat = flat.clone()
    words = flat.view(torch.uint8).view(torch.int64)
    return ((words * _GATHER_MAGIC) >> 56).bitwise_and_(0xFF).to(torch.uint8)


def pack_bits(mask: torch.Tensor, scale: float = 1.0) -> PackedBits:
    """Pack a bool tensor; its first dimension is the row (sample) dimension."""
    if mask.dim() == 0:
        mask = mask.reshape(1)
    if mask.dim() == 1:
        mask = mask.reshape(1, -1)
        shape = torch.Size([mask.shape[1]])
        return PackedBits(pack_rows(mask), shape, scale)
    return PackedBits(pack_rows(mask), mask.shape, scale)


def unpack_rows(data: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of `pack_rows` for the rows in `data`; `shape[1:]` is the per-row shape."""
    return _look_up(_BIT_TABLE, data, shape)


def _look_up(table: torch.Tensor, data: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    rows = data.shape[0]
    values = table.index_select(0, data.reshape(-1).to(torch.int32)).reshape(rows, -1)
    features = _features(shape)
    if values.shape[1] != features:
        values = values[:, :features]
    return values.reshape(rows, *shape[1:])


def unpack_sign_rows(data: torch.Tensor, shape: torch.Size, dtype: torch.dtype,
                     scale: float = 1.0) -> torch.Tensor:
    """`unpack_rows` straight to +-scale values of `dtype` (e.g. int8 or bfloat16 +-1),
    without a bool or fp32 intermediate."""
    key = (dtype, scale)
    if key not in _SIGN_TABLES:
        _SIGN_TABLES[key] = signs_from_bits(_BIT_TABLE, torch.float32, scale).to(dtype)
    return _look_up(_SIGN_TABLES[key], data, shape)


def unpack_bits(packed: PackedBits) -> torch.Tensor:
    if len(packed.shape) == 1:
        return unpack_rows(packed.data, torch.Size([1, *packed.shape])).reshape(packed.shape)
    return unpack_rows(packed.data, packed.shape)


def signs_from_bits(bits: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Map True -> +scale, False -> -scale."""
    out = bits.to(dtype)
    out.mul_(2 * scale).sub_(scale)
    return out


def unpack_signs(packed: PackedBits, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The packed bits as +-scale values (bit set = positive)."""
    if len(packed.shape) == 1:
        shape = torch.Size([1, *packed.shape])
        return unpack_sign_rows(packed.data, shape, dtype, packed.scale).reshape(packed.shape)
    return unpack_sign_rows(packed.data, packed.shape, dtype, packed.scale)
