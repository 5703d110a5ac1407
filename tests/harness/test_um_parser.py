"""UM24C/UM25C/UM34C records: fixtures built here from the layout in METERS.md.

The fixtures do not use `harness.meters.um.encode_record`: they pack the documented
offsets with `struct` so that a mistake in the module cannot hide in its own fixtures.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from harness.meters.base import CorruptFrame
from harness.meters.um import UmStreamParser, encode_record, parse_record

MODEL_IDS = {"um24c": 0x0963, "um25c": 0x09C9, "um34c": 0x0D4C}
# METERS.md: byte 129 of a UM34C record is the XOR of these bytes.
CHECKSUM_BYTES = [1, 3, 7, 9, 15, 17, 19, 23, 31, 39, 41, 45, 49, 53, 55, 57, 59, 63, 67, 69,
                  73, 79, 83, 89, 97, 99, 109, 111, 113, 119, 121, 127]  # fmt: skip


def xor_of(frame: bytes | bytearray) -> int:
    value = 0
    for offset in CHECKSUM_BYTES:
        value ^= frame[offset]
    return value


def fixture(
    model: str,
    volts_raw: int,
    amps_raw: int,
    power_mw: int,
    temp_c: int = 31,
    group: int = 3,
    rec_mah: int = 120,
    rec_mwh: int = 610,
    rec_s: int = 77,
    load_decohm: int = 410,
    good: bool = True,
) -> bytes:
    """A record packed field by field from the documented offsets."""
    frame = bytearray(130)
    struct.pack_into(">H", frame, 0, MODEL_IDS[model])
    struct.pack_into(">H", frame, 2, volts_raw)
    struct.pack_into(">H", frame, 4, amps_raw)
    struct.pack_into(">I", frame, 6, power_mw)
    struct.pack_into(">H", frame, 10, temp_c)
    struct.pack_into(">H", frame, 12, 50 + temp_c // 2)  # degF, kept free of 0x09/0x0D
    struct.pack_into(">H", frame, 14, group)
    for g in range(10):
        struct.pack_into(">II", frame, 16 + 8 * g, 10 * g + 1, 20 * g + 2)
    struct.pack_into(">HH", frame, 96, 60, 62)  # D+, D-
    struct.pack_into(">H", frame, 100, 1)
    struct.pack_into(">II", frame, 102, rec_mah, rec_mwh)
    struct.pack_into(">H", frame, 110, 10)
    struct.pack_into(">I", frame, 112, rec_s)
    struct.pack_into(">H", frame, 116, 1)
    struct.pack_into(">HH", frame, 118, 2, 4)
    struct.pack_into(">I", frame, 122, load_decohm)
    struct.pack_into(">H", frame, 126, 0)
    if model == "um34c":
        frame[128] = 0
        frame[129] = xor_of(frame) ^ (0 if good else 0x21)
    else:
        struct.pack_into(">H", frame, 128, 0xFFF1 if good else 0xFFF2)
    return bytes(frame)


@pytest.mark.parametrize(
    ("model", "volts_raw", "amps_raw", "volts", "amps"),
    [
        ("um24c", 512, 1234, 5.12, 1.234),  # x0.01 V, x0.001 A
        ("um25c", 5123, 12345, 5.123, 1.2345),  # x0.001 V, x0.0001 A
        ("um34c", 498, 2001, 4.98, 2.001),  # x0.01 V, x0.001 A
    ],
)
def test_per_model_scaling(model, volts_raw, amps_raw, volts, amps):
    record = parse_record(fixture(model, volts_raw, amps_raw, power_mw=6321))
    assert record.model == model
    assert record.volts == pytest.approx(volts, abs=1e-12)
    assert record.amps == pytest.approx(amps, abs=1e-12)
    assert record.power_w == pytest.approx(6.321, abs=1e-12)
    assert record.temp_c == 31
    assert record.data_group == 3
    assert (record.recorded_mah, record.recorded_mwh, record.recording_s) == (120, 610, 77)
    assert record.load_ohm == pytest.approx(41.0)


@pytest.mark.parametrize("model", ["um24c", "um25c"])
def test_end_marker_is_checked(model):
    with pytest.raises(CorruptFrame, match="end marker 0xFFF2"):
        parse_record(fixture(model, 500, 100, 500, good=False))


def test_um34c_checksum_is_checked_and_has_no_end_marker():
    good = fixture("um34c", 500, 100, 500)
    assert good[128:130] != b"\xff\xf1"  # no marker: only the checksum counts
    assert parse_record(good).model == "um34c"
    with pytest.raises(CorruptFrame, match="checksum"):
        parse_record(fixture("um34c", 500, 100, 500, good=False))
    flipped = bytearray(good)
    flipped[9] ^= 0x40  # a byte the checksum covers
    with pytest.raises(CorruptFrame, match="checksum"):
        parse_record(bytes(flipped))


def test_unknown_model_and_wrong_length_are_refused():
    frame = bytearray(fixture("um25c", 500, 100, 500))
    frame[0:2] = b"\x12\x34"
    with pytest.raises(CorruptFrame, match="unknown model id 0x1234"):
        parse_record(bytes(frame))
    with pytest.raises(CorruptFrame, match="129 bytes"):
        parse_record(fixture("um25c", 500, 100, 500)[:129])


@pytest.mark.parametrize("model", ["um24c", "um25c", "um34c"])
def test_encoder_agrees_with_the_documented_layout(model):
    """The emulator's encoder, read back by fixture-independent offsets."""
    frame = encode_record(model, volts=5.1, amps=0.8, power_w=4.08)
    scale_v, scale_a = (0.001, 0.0001) if model == "um25c" else (0.01, 0.001)
    assert struct.unpack_from(">H", frame, 0)[0] == MODEL_IDS[model]
    assert struct.unpack_from(">H", frame, 2)[0] == round(5.1 / scale_v)
    assert struct.unpack_from(">H", frame, 4)[0] == round(0.8 / scale_a)
    assert struct.unpack_from(">I", frame, 6)[0] == 4080
    if model == "um34c":
        assert frame[129] == xor_of(frame)
    else:
        assert frame[128:130] == b"\xff\xf1"
    with pytest.raises(CorruptFrame):
        parse_record(encode_record(model, 5.1, 0.8, 4.08, corrupt_check=True))


def test_stream_byte_by_byte_noise_and_torn_record():
    parser = UmStreamParser()
    first = fixture("um25c", 5000, 5000, 2500)
    second = fixture("um25c", 5001, 6000, 3000)
    stream = b"\x00\x13garbage" + first + first[:57] + second
    found = [record for byte in stream for record in parser.feed(bytes([byte]))]
    assert [r.raw for r in found] == [first, second]
    assert parser.rejected == 1  # the torn record
    assert parser.records * 130 + parser.skipped_bytes + parser.pending == len(stream)


# ---------------------------------------------------------------- fuzzing

# Field bytes and noise avoid the first byte of every model id (0x09, 0x0D) and 0xFF, so
# the only model ids in a constructed stream are record starts and the only 0xFFF1 pairs
# are end markers: then what the parser must find is unambiguous.
SAFE = bytes.maketrans(b"\x09\x0d\xff", b"\x49\x4d\xbf")
noise = st.binary(max_size=300).map(lambda raw: raw.translate(SAFE))


def safe_int(byte_count: int):
    return st.integers(0, 256**byte_count - 1).map(
        lambda v: int.from_bytes(v.to_bytes(byte_count, "big").translate(SAFE), "big")
    )


@st.composite
def records(draw, model: str, good: bool) -> bytes:
    frame = fixture(
        model,
        volts_raw=draw(safe_int(2)),
        amps_raw=draw(safe_int(2)),
        power_mw=draw(safe_int(4)),
        temp_c=draw(safe_int(1)),
        rec_mah=draw(safe_int(4)),
        rec_mwh=draw(safe_int(4)),
        rec_s=draw(safe_int(4)),
        load_decohm=draw(safe_int(4)),
        good=good,
    )
    assert not any(b in (0x09, 0x0D, 0xFF) for b in frame[2:128])
    if model == "um34c":
        assume(frame[129] not in (0x09, 0x0D, 0xFF))
    return frame


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2000), chunk=st.integers(1, 200))
def test_arbitrary_bytes_never_raise_and_every_byte_is_accounted_for(data, chunk):
    parser = UmStreamParser()
    found = []
    for start in range(0, len(data), chunk):
        found += parser.feed(data[start : start + chunk])
    assert parser.records == len(found)
    assert parser.records * 130 + parser.skipped_bytes + parser.pending == len(data)
    for record in found:
        assert parse_record(record.raw) == record  # nothing invalid gets through


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    model=st.sampled_from(sorted(MODEL_IDS)),
    kinds=st.lists(st.sampled_from(["good", "bad", "torn"]), min_size=1, max_size=8),
    chunk=st.integers(1, 300),
)
def test_good_records_in_noise_are_all_found_and_bad_ones_all_counted(data, model, kinds, chunk):
    stream = b""
    expected_good = []
    expected_bad = 0
    for kind in kinds:
        stream += data.draw(noise)
        if kind == "good":
            frame = data.draw(records(model, good=True))
            expected_good.append(frame)
        elif kind == "bad":  # wrong end marker / checksum
            frame = data.draw(records(model, good=False))
            expected_bad += 1
        else:  # a torn record: its tail never came; the next full record follows
            torn = data.draw(records(model, good=True))
            torn = torn[: data.draw(st.integers(2, 129))]
            follower = data.draw(records(model, good=True))
            gap = data.draw(noise)
            if model == "um34c":  # an 8-bit checksum can pass by chance: rule that case out
                window = (torn + gap + follower)[:130]
                assume(len(window) < 130 or window[129] != xor_of(window))
            frame = torn + gap + follower
            expected_good.append(follower)
            expected_bad += 1
        stream += frame
    stream += data.draw(noise)
    parser = UmStreamParser()
    found = []
    for start in range(0, len(stream), chunk):
        found += parser.feed(stream[start : start + chunk])
    assert [record.raw for record in found] == expected_good
    assert parser.rejected == expected_bad
    assert parser.records * 130 + parser.skipped_bytes + parser.pending == len(stream)


@pytest.mark.parametrize("model", ["um24c", "um25c", "um34c"])
def test_power_class_bounds_every_worst_case_reading(model):
    """The class `ACCURACY` records is a bound: for readings off by the full voltage and
    current classes either way, anywhere on a 5 V +-5 % supply up to the model's current,
    the power error stays within relative x P + offset_w."""
    from harness.meters.base import SUPPLY_VOLTS
    from harness.meters.um import ACCURACY, UM_MODELS, UM_SPECS

    spec, scale, bound = UM_SPECS[model], UM_MODELS[model], ACCURACY[model]
    max_amps = {"um24c": 3.0, "um25c": 5.0, "um34c": 4.0}[model]
    worst_ratio = 0.0
    for volts in (SUPPLY_VOLTS[0], 5.0, SUPPLY_VOLTS[1]):
        for amps in (0.0, 0.01, 0.3, 1.0, 2.5, max_amps):
            dv = spec.volts_fraction * volts + spec.volts_digits * scale.volts_per_count
            di = spec.amps_fraction * amps + spec.amps_digits * scale.amps_per_count
            power = volts * amps
            error = max(abs((volts + sv * dv) * (amps + si * di) - power)
                        for sv in (-1, 1) for si in (-1, 1))
            allowed = bound["relative"] * power + bound["offset_w"]
            assert error <= allowed, (volts, amps, error, allowed)
            worst_ratio = max(worst_ratio, error / allowed)
    assert worst_ratio > 0.5  # tight enough to mean something, not a blanket figure
    assert bound["assumed"] is spec.assumed and bound["source"] == spec.source


def test_the_um25c_class_is_the_published_one_and_the_others_say_they_are_assumed():
    from harness.meters.um import ACCURACY

    assert not ACCURACY["um25c"]["assumed"]
    assert "davatorium/um25c-client" in ACCURACY["um25c"]["source"]
    for model in ("um24c", "um34c"):
        assert ACCURACY[model]["assumed"] and ACCURACY[model]["source"].startswith("assumed")
