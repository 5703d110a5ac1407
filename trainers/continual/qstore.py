"""A tensor held for real at q bits: integer codes with a per-tensor scale and zero point.

Affine (asymmetric) min-max quantisation, as Vorabbi et al.'s code quantises the trainable
part (`standard_pow2_add_quantization_noise`: per-tensor min and max, 2**q - 1 steps,
round to nearest), with the range widened to hold 0 and an integer zero point (Jacob et
al.), so that a zero stays exactly zero (CWR* zeroes head rows before each experience).

Storage (`storage_dtype`): q < 8 bits as bit planes packed 8 codes a byte (plane j holds
bit j of every code, `trainers.bits.pack_rows`), q = 8 as uint8, 9-16 as int16 and 17-31
as int32 (codes offset by 2**(q-1) so they fit the signed type).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers.bits import pack_rows, unpack_rows

ROUNDINGS = ("nearest", "stochastic")
MAX_STORED_BITS = 31
SCALE_ZERO_POINT_BYTES = 8  # float32 scale + int32 zero point, per tensor


def storage_dtype(bits: int) -> torch.dtype:
    """The integer type that holds a `bits`-bit code (uint8 bytes for packed widths too)."""
    if not 1 <= bits <= MAX_STORED_BITS:
        raise ValueError(f"a stored code has 1..{MAX_STORED_BITS} bits, got {bits}")
    if bits <= 8:
        return torch.uint8
    return torch.int16 if bits <= 16 else torch.int32


def _offset(bits: int) -> int:
    """What is subtracted from a code to store it in a signed type (9 bits and up)."""
    return 2 ** (bits - 1) if bits > 8 else 0


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes 0..2**bits-1 (any integer type, flat) as `bits` bit planes of ceil(n / 8) bytes."""
    flat = codes.reshape(-1).to(torch.uint8)
    planes = torch.stack([(flat >> j) & 1 for j in range(bits)]).to(torch.bool)
    return pack_rows(planes)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the `numel` codes as int32."""
    planes = unpack_rows(packed, torch.Size([bits, numel]))
    codes = torch.zeros(numel, dtype=torch.int32)
    for j in range(bits):
        codes |= planes[j].to(torch.int32) << j
    return codes


@dataclass
class QuantisedTensor:
    """`shape` values held as `bits`-bit codes: value = (code - zero_point) * scale."""

    codes: torch.Tensor  # storage_dtype(bits); packed bit planes when bits < 8
    shape: torch.Size
    bits: int
    scale: float
    zero_point: int

    @property
    def nbytes(self) -> int:
        """Bytes held: the codes, a float32 scale and an int32 zero point."""
        return self.codes.numel() * self.codes.element_size() + SCALE_ZERO_POINT_BYTES

    def int_codes(self) -> torch.Tensor:
        """The codes 0..2**bits-1 as int32, flat."""
        numel = self.shape.numel()
        if self.bits < 8:
            return unpack_codes(self.codes, self.bits, numel)
        return self.codes.reshape(-1).to(torch.int32) + _offset(self.bits)

    def dequantise(self) -> torch.Tensor:
        """The float32 values (a new tensor of `shape`)."""
        codes = self.int_codes()
        wide = torch.float64 if self.bits > 16 else torch.float32
        values = (codes - self.zero_point).to(wide) * self.scale
        return values.to(torch.float32).reshape(self.shape)


def quantise(x: torch.Tensor, bits: int, rounding: str = "nearest",
             generator: torch.Generator | None = None) -> QuantisedTensor:
    """Hold `x` at `bits` bits on its own min-max grid (widened to hold 0).

    `nearest` rounds half to even (as `tf.round` in the authors' code); `stochastic` rounds
    up with probability equal to the fraction, so that updates smaller than a step survive
    in expectation.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    dtype = storage_dtype(bits)
    levels = 2**bits - 1
    wide = torch.float64 if bits > 16 else torch.float32
    x = x.detach()
    lo = min(float(x.min()), 0.0) if x.numel() else 0.0
    hi = max(float(x.max()), 0.0) if x.numel() else 0.0
    # the scale is kept as a float32 (4 bytes) and the zero point as an int32
    scale = float(torch.tensor((hi - lo) / levels, dtype=torch.float32))
    if scale <= 0.0:  # all zeros: any scale holds them exactly
        scale = 1.0
    zero_point = min(levels, max(0, round(-lo / scale)))
    q = x.to(wide, copy=True).div_(scale).add_(zero_point)  # in place: one scratch tensor
    if rounding == "nearest":
        q.round_()
    else:
        q.add_(torch.rand(q.shape, generator=generator, dtype=wide)).floor_()
    codes = q.clamp_(0, levels).to(torch.int32)
    del q
    if bits < 8:
        stored = pack_codes(codes, bits)
    else:
        stored = codes.sub_(_offset(bits)).to(dtype)
    return QuantisedTensor(stored, x.shape, bits, scale, zero_point)
