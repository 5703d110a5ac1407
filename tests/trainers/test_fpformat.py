"""FloatFormat against torch's own float16 / bfloat16 conversions, bit for bit, and its storage."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contract.errors import UsageError
from trainers.bop.fpformat import FloatFormat, pack_codes, quantize_many, unpack_codes

FP16 = FloatFormat(5, 10, saturate=False)
BF16 = FloatFormat(8, 7, saturate=False)
IEEE = [(FP16, torch.float16), (BF16, torch.bfloat16)]


def torch_codes(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return values.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF


def assert_codes_match(fmt: FloatFormat, dtype: torch.dtype, values: torch.Tensor) -> None:
    ours = fmt.to_codes(values)
    nan = torch.isnan(values)
    assert torch.equal(ours[~nan], torch_codes(values[~nan], dtype))
    assert torch.isnan(fmt.from_codes(ours[nan])).all()


float32s = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)


@settings(max_examples=300, deadline=None)
@given(st.lists(float32s, min_size=1, max_size=64))
def test_encoding_matches_torch_float16_and_bfloat16(values):
    x = torch.tensor(values, dtype=torch.float32)
    for fmt, dtype in IEEE:
        assert_codes_match(fmt, dtype, x)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**15 - 2), st.booleans())
def test_ties_round_to_even_like_torch(code, negative):
    # The midpoint between two neighbouring values is exact in float32 for both formats.
    for fmt, dtype in IEEE:
        pair = fmt.from_codes(torch.tensor([code, code + 1]))
        if not torch.isfinite(pair).all():
            continue
        midpoint = (pair[0].double() + pair[1].double()) / 2
        x = torch.tensor([midpoint], dtype=torch.float64).float()
        assert x.double().item() == midpoint  # really a tie
        x = -x if negative else x
        assert_codes_match(fmt, dtype, x)
        assert fmt.to_codes(x).item() & 1 == 0  # the even neighbour


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 2**10 - 1))
def test_float16_subnormals_and_their_ties(steps):
    tiny = 2.0**-24
    x = torch.tensor([steps * tiny, (steps + 0.5) * tiny, -steps * tiny, 0.25 * tiny, 0.5 * tiny])
    assert_codes_match(FP16, torch.float16, x)


def test_every_float16_and_bfloat16_code_decodes_like_torch():
    codes = torch.arange(2**16, dtype=torch.int64)
    as_int16 = ((codes + 2**15) & 0xFFFF) - 2**15
    for fmt, dtype in IEEE:
        ours = fmt.from_codes(codes)
        theirs = as_int16.to(torch.int16).view(dtype).float()
        nan = torch.isnan(theirs)
        assert torch.equal(torch.isnan(ours), nan)
        assert torch.equal(ours[~nan].view(torch.int32), theirs[~nan].view(torch.int32))


def test_infinities_overflow_and_saturation():
    x = torch.tensor([math.inf, -math.inf, 65519.0, 65520.0, -1e6])
    assert_codes_match(FP16, torch.float16, x)
    saturating = FloatFormat(5, 10)
    assert saturating.quantize(x).tolist() == [math.inf, -math.inf, 65504.0, 65504.0, -65504.0]


def test_flush_to_zero_mode_drops_subnormals():
    flushing = FloatFormat(5, 10, subnormals=False)
    x = torch.tensor([2.0**-24, 2.0**-15, 2.0**-14, -(2.0**-14)])
    assert flushing.quantize(x).tolist() == [0.0, 0.0, 2.0**-14, -(2.0**-14)]
    assert flushing.min_positive == 2.0**-14


def test_custom_bias_shifts_the_range():
    fmt = FloatFormat(4, 3, 20)
    assert fmt.min_subnormal == 2.0 ** (1 - 20 - 3)
    assert fmt.max_finite == 15 * 2.0 ** (14 - 20 - 3)
    x = torch.tensor([1e-6, 3e-7, 1.0])
    q = fmt.quantize(x)
    assert q[2].item() == fmt.max_finite  # saturated
    assert abs(q[0].item() - 1e-6) <= 2.0 ** (math.floor(math.log2(1e-6)) - 3 - 1)


@pytest.mark.parametrize("width", [3, 4, 5, 7, 8, 9, 12, 15, 16, 17])
def test_bitstream_round_trip(width):
    codes = torch.randint(0, 2**width, (1003,), generator=torch.Generator().manual_seed(width))
    stream = pack_codes(codes, width)
    assert stream.dtype == torch.uint8 and stream.numel() == math.ceil(1003 * width / 8)
    assert torch.equal(unpack_codes(stream, width, 1003), codes)


@pytest.mark.parametrize("spec", ["5,10", "8,7", "4,3,10", "3,8,12", "2,1"])
def test_encode_decode_storage(spec):
    fmt = FloatFormat.parse(spec)
    x = torch.randn(997, generator=torch.Generator().manual_seed(1)) * 1e-3
    storage = fmt.encode(x)
    assert storage.dtype == fmt.container_dtype
    assert storage.numel() * storage.element_size() == fmt.storage_bytes(997)
    assert torch.equal(fmt.decode(storage, 997), fmt.quantize(x))


def test_chunked_storage_slices_agree_with_whole():
    fmt = FloatFormat.parse("3,8,12")
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2)) * 1e-4
    storage = fmt.empty_storage(1000)
    for start in range(0, 1000, 256):
        stop = min(start + 256, 1000)
        storage[fmt.storage_range(start, stop)] = fmt.encode(x[start:stop])
    assert torch.equal(storage, fmt.encode(x))


def test_parse_and_properties():
    fmt = FloatFormat.parse(" 5, 10 ")
    assert (fmt.bits, fmt.bias, fmt.spec) == (16, 15, "5,10,15")
    assert FloatFormat.parse("4,3,9").bias == 9


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("5", "'5'"),
        ("a,b", "'a,b'"),
        ("1,4", "1"),
        ("9,4", "9"),
        ("5,24", "24"),
        ("5,-1", "-1"),
        ("8,23,200", "8,23,200"),
        ("8,7,-10", "8,7,-10"),
    ],
)
def test_bad_formats_are_one_line_usage_errors(spec, named):
    with pytest.raises(UsageError) as error:
        FloatFormat.parse(spec)
    message = str(error.value)
    assert "\n" not in message and named in message


def test_format_that_cannot_represent_tau_is_refused():
    with pytest.raises(UsageError, match=r"5,10,15 cannot represent tau=1e-08"):
        FloatFormat.parse("5,10").check_threshold(1e-8)
    FloatFormat.parse("5,10,30").check_threshold(1e-8)
    with pytest.raises(UsageError, match="tau=1000"):
        FloatFormat.parse("4,3,10").check_threshold(1000.0)


MANY = [FP16, BF16, FloatFormat(4, 3, 10, subnormals=False), FloatFormat(2, 1),
        FloatFormat(6, 9, 70)]


@settings(max_examples=100, deadline=None)
@given(st.lists(float32s, min_size=1, max_size=32))
def test_quantize_many_agrees_with_each_format(values):
    x = torch.tensor(values, dtype=torch.float32)
    rows = quantize_many(x.expand(len(MANY), -1), MANY)
    for row, fmt in zip(rows, MANY):
        expected = fmt.quantize(x)
        assert torch.equal(torch.isnan(row), torch.isnan(expected))
        keep = ~torch.isnan(expected)
        assert torch.equal(row[keep].view(torch.int32), expected[keep].view(torch.int32))
