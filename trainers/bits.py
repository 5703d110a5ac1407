"""Bit-packed storage for sign and mask tensors: 8 values per byte.

Tensors are packed row by row (first dimension = samples), each row padded to a
whole byte, so a batch can be packed or unpacked in chunks of samples and the
pieces concatenate to the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)


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
    groups = flat.reshape(rows, -1, 8).to(torch.uint8)
    groups <<= _SHIFTS
    return groups.sum(dim=2, dtype=torch.uint8)


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
    rows = data.shape[0]
    bits = (data.unsqueeze(2) >> _SHIFTS) & 1
    bits = bits.reshape(rows, -1)[:, : _features(shape)]
    return bits.to(torch.bool).reshape(rows, *shape[1:])


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
    return signs_from_bits(unpack_bits(packed), dtype, packed.scale)
