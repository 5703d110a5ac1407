"""Custom floating-point formats (sign, E exponent bits, M mantissa bits, bias) for Bop's momentum.

Yayla & Chen store Bop's momentum in as few bits as the training tolerates. A `FloatFormat`
rounds float32 values to nearest-even, keeps IEEE subnormals (or flushes them), saturates or
overflows to infinity at the top, and stores the codes compactly: in uint8 / int16 containers
when the width is 8 / 16 bits, otherwise as a packed MSB-first bitstream. The layout is the IEEE
one (the all-ones exponent holds infinities and NaN), so (5,10,15) is float16 and (8,7,127) is
bfloat16 bit for bit. All conversions are vectorised torch; exact intermediate arithmetic is done
in float64, where every power of two the formats need is representable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from contract.errors import UsageError
from contract.fields import SpecError
from contract.vocabulary import (
    EXPONENT_BITS_RANGE,
    FLOAT32_MAX_EXPONENT,
    FLOAT32_MIN_EXPONENT,
    MANTISSA_BITS_RANGE,
    parse_momentum_format,
)


def _pow2(exponents: torch.Tensor) -> torch.Tensor:
    """Exact float64 2**e for integer tensors e in [-1022, 1023], built from the bit pattern."""
    return ((exponents + 1023) << 52).view(torch.float64)


@dataclass(frozen=True)
class FloatFormat:
    """A sign + `exponent_bits` + `mantissa_bits` floating-point format with an exponent bias.

    `saturate`: finite values beyond the largest finite value become +-max (True) or +-inf.
    `subnormals`: keep gradual underflow (True) or flush results below the smallest normal to 0.
    """

    exponent_bits: int
    mantissa_bits: int
    bias: int | None = None  # None: the IEEE bias 2**(E-1) - 1
    saturate: bool = True
    subnormals: bool = True

    def __post_init__(self) -> None:
        e_bits, m_bits = self.exponent_bits, self.mantissa_bits
        for name, value, (low, high) in (
            ("exponent bits", e_bits, EXPONENT_BITS_RANGE),
            ("mantissa bits", m_bits, MANTISSA_BITS_RANGE),
        ):
            if not isinstance(value, int) or not low <= value <= high:
                raise UsageError(f"{name} must be an integer in {low}..{high}, got {value!r}")
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (e_bits - 1) - 1)
        if not isinstance(self.bias, int):
            raise UsageError(f"exponent bias must be an integer, got {self.bias!r}")
        if self.min_exponent - m_bits < FLOAT32_MIN_EXPONENT:
            raise UsageError(
                f"format {self.spec} reaches 2^{self.min_exponent - m_bits}, below float32's"
                f" smallest value 2^{FLOAT32_MIN_EXPONENT}; use a smaller bias"
            )
        if self.max_exponent > FLOAT32_MAX_EXPONENT:
            raise UsageError(
                f"format {self.spec} reaches 2^{self.max_exponent}, beyond float32's range;"
                " use a larger bias"
            )

    @classmethod
    def parse(cls, text: str, *, saturate: bool = True, subnormals: bool = True) -> FloatFormat:
        """Read "E,M" or "E,M,bias" (e.g. "5,10" is float16, "8,7" bfloat16): the syntax of
        `contract.vocabulary.parse_momentum_format`, which the host checks plans with."""
        try:
            e_bits, m_bits, bias = parse_momentum_format(text, "momentum format")
        except SpecError as exc:
            raise UsageError(str(exc)) from None
        return cls(e_bits, m_bits, bias, saturate=saturate, subnormals=subnormals)

    # --- properties of the format -------------------------------------------------------
    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def spec(self) -> str:
        return f"{self.exponent_bits},{self.mantissa_bits},{self.bias}"

    @property
    def min_exponent(self) -> int:
        """Unbiased exponent of the smallest normal number (also the subnormals' scale)."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        """Unbiased exponent of the largest finite number."""
        return 2**self.exponent_bits - 2 - self.bias

    @property
    def min_subnormal(self) -> float:
        return math.ldexp(1.0, self.min_exponent - self.mantissa_bits)

    @property
    def min_positive(self) -> float:
        return self.min_subnormal if self.subnormals else self.min_normal

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.min_exponent)

    @property
    def max_finite(self) -> float:
        m_bits = self.mantissa_bits
        return math.ldexp(2.0 ** (m_bits + 1) - 1, self.max_exponent - m_bits)

    @property
    def container_dtype(self) -> torch.dtype:
        return {8: torch.uint8, 16: torch.int16}.get(self.bits, torch.uint8)

    @property
    def is_bitstream(self) -> bool:
        return self.bits not in (8, 16)

    def storage_bytes(self, numel: int) -> int:
        """Bytes the encoded storage of `numel` values occupies."""
        return math.ceil(numel * self.bits / 8)

    def represents(self, value: float) -> bool:
        """Whether |value| lies between the smallest positive and the largest finite value."""
        return self.min_positive <= abs(value) <= self.max_finite

    def check_threshold(self, tau: float) -> None:
        """Refuse a format in which the flip threshold tau is indistinct from 0 or infinity."""
        if not self.represents(tau):
            raise UsageError(
                f"momentum format {self.spec} cannot represent tau={tau:g} (its positive values"
                f" span {self.min_positive:.3g}..{self.max_finite:.3g}); choose another bias"
                " or --momentum-format auto"
            )

    # --- codes ---------------------------------------------------------------------------
    def to_codes(self, values: torch.Tensor) -> torch.Tensor:
        """Round values to nearest-even in this format; return the bit patterns as int64."""
        e_bits, m_bits = self.exponent_bits, self.mantissa_bits
        x = values.detach().reshape(-1).to(torch.float64)
        sign = torch.signbit(x).to(torch.int64)
        magnitude = x.abs()
        exponent = (magnitude.view(torch.int64) >> 52) - 1023
        exponent = exponent.clamp(self.min_exponent, self.max_exponent + 1)
        steps = torch.round(magnitude * _pow2(m_bits - exponent)).clamp(max=2.0 ** (m_bits + 2))
        codes = ((exponent + self.bias) << m_bits) + steps.to(torch.int64) - (1 << m_bits)
        inf_code = (2**e_bits - 1) << m_bits
        overflow_code = inf_code - 1 if self.saturate else inf_code
        codes = torch.where(codes >= inf_code, overflow_code, codes)
        if not self.subnormals:
            codes = torch.where(codes < (1 << m_bits), 0, codes)
        codes = torch.where(torch.isinf(magnitude), inf_code, codes)
        nan_code = inf_code | (1 << (m_bits - 1)) if m_bits > 0 else inf_code
        codes = torch.where(torch.isnan(magnitude), nan_code, codes)
        return codes | (sign << (e_bits + m_bits))

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The float32 values of int bit patterns (exact: every value is a float32)."""
        e_bits, m_bits = self.exponent_bits, self.mantissa_bits
        c = codes.to(torch.int64)
        field = (c >> m_bits) & (2**e_bits - 1)
        mantissa = c & ((1 << m_bits) - 1)
        normal = field != 0
        exponent = torch.where(normal, field - self.bias, self.min_exponent)
        steps = torch.where(normal, mantissa + (1 << m_bits), mantissa)
        value = steps.to(torch.float64) * _pow2(exponent - m_bits)
        special = torch.where(mantissa == 0, math.inf, math.nan).to(torch.float64)
        value = torch.where(field == 2**e_bits - 1, special, value)
        value = torch.where(((c >> (e_bits + m_bits)) & 1).bool(), -value, value)
        return value.to(torch.float32)

    def quantize(self, values: torch.Tensor) -> torch.Tensor:
        """Values rounded into this format, as float32 of the same shape."""
        return self.from_codes(self.to_codes(values)).reshape(values.shape)

    # --- compact storage -----------------------------------------------------------------
    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """Flat compact storage of `values` (uint8 / int16 container, or a uint8 bitstream)."""
        codes = self.to_codes(values)
        if self.bits == 8:
            return codes.to(torch.uint8)
        if self.bits == 16:
            return (((codes + 2**15) & 0xFFFF) - 2**15).to(torch.int16)
        return pack_codes(codes, self.bits)

    def decode(self, storage: torch.Tensor, numel: int) -> torch.Tensor:
        """Flat float32 values of the first `numel` entries of `storage`."""
        if self.bits == 8:
            codes = storage[:numel].to(torch.int64)
        elif self.bits == 16:
            codes = storage[:numel].to(torch.int64) & 0xFFFF
        else:
            codes = unpack_codes(storage, self.bits, numel)
        return self.from_codes(codes)

    def storage_range(self, start: int, stop: int) -> slice:
        """Slice of the storage holding elements start..stop (start a multiple of 8 for streams)."""
        if not self.is_bitstream:
            return slice(start, stop)
        if start % 8:
            raise ValueError(f"bitstream slices must start at a multiple of 8, got {start}")
        return slice(start * self.bits // 8, math.ceil(stop * self.bits / 8))

    def empty_storage(self, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Storage for `numel` zeros."""
        size = self.storage_bytes(numel) if self.is_bitstream else numel
        return torch.zeros(size, dtype=self.container_dtype, device=device)


def pack_codes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack the low `width` bits of each code, MSB first, into a uint8 bitstream."""
    numel = codes.numel()
    bits = torch.zeros(math.ceil(numel * width / 8) * 8, dtype=torch.uint8, device=codes.device)
    grid = bits[: numel * width].view(numel, width)
    for position in range(width):  # loop over bit positions, not elements
        grid[:, position] = ((codes >> (width - 1 - position)) & 1).to(torch.uint8)
    octets = bits.view(-1, 8)
    packed = torch.zeros(octets.shape[0], dtype=torch.uint8, device=codes.device)
    for position in range(8):
        packed |= octets[:, position] << (7 - position)
    return packed


def unpack_codes(stream: torch.Tensor, width: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `numel` codes of a bitstream, as int64."""
    needed = math.ceil(numel * width / 8)
    octets = stream[:needed]
    bits = torch.empty(needed, 8, dtype=torch.uint8, device=stream.device)
    for position in range(8):
        bits[:, position] = (octets >> (7 - position)) & 1
    grid = bits.view(-1)[: numel * width].view(numel, width)
    codes = torch.zeros(numel, dtype=torch.int64, device=stream.device)
    for position in range(width):
        codes |= grid[:, position].to(torch.int64) << (width - 1 - position)
    return codes


def quantize_many(values: torch.Tensor, formats: list[FloatFormat]) -> torch.Tensor:
    """Row i of `values` (shape (len(formats), n)) rounded into formats[i], as float32.

    The same rounding as `FloatFormat.quantize`, for many formats in one vectorised pass (the
    encoding search replays every candidate at once).
    """
    def column(numbers, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(numbers, dtype=dtype, device=values.device).unsqueeze(1)

    m_bits = column([f.mantissa_bits for f in formats])
    min_exponent = column([f.min_exponent for f in formats])
    max_exponent = column([f.max_exponent for f in formats])
    max_finite = column([f.max_finite for f in formats], torch.float64)
    saturate = column([f.saturate for f in formats], torch.bool)
    flush_below = column([0.0 if f.subnormals else f.min_normal for f in formats], torch.float64)
    x = values.to(torch.float64)
    magnitude = x.abs()
    exponent = (magnitude.view(torch.int64) >> 52) - 1023
    exponent = torch.maximum(torch.minimum(exponent, max_exponent + 1), min_exponent)
    rounded = torch.round(magnitude * _pow2(m_bits - exponent)) * _pow2(exponent - m_bits)
    overflow = torch.where(saturate, max_finite, math.inf)
    rounded = torch.where(rounded > max_finite, overflow, rounded)
    rounded = torch.where(rounded < flush_below, 0.0, rounded)
    rounded = torch.where(torch.isinf(magnitude), math.inf, rounded)
    return torch.copysign(rounded, x).to(torch.float32)
