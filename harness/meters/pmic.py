"""Raspberry Pi 5 PMIC: parse `vcgencmd pmic_read_adc` (standard library only).

The device agent runs the command on the Pi and imports this module, so it must stay
free of anything but the standard library. Lines look like
`   VDD_CORE_A current(7)=2.33166000A` and `   VDD_CORE_V volt(15)=0.72412500V`;
a rail's power is its `_V` reading times its `_A` reading, and board power is the sum
over the rails that have both (EXT5V_V and BATT_V carry a voltage only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PMIC_COMMAND = ("vcgencmd", "pmic_read_adc")
# Raspberry Pi publishes no accuracy for the Pi 5 PMIC's ADC; the rails also miss the
# losses before the PMIC (USB-C input, 5 V peripherals), so the class is an assumption.
ACCURACY: dict[str, object] = {
    "relative": 0.05, "offset_w": 0.05, "assumed": True,
    "source": "assumed ±(5 % + 50 mW): no published accuracy for the Pi 5 PMIC ADC",
}
_LINE = re.compile(
    r"^\s*(?P<rail>\S+)_(?P<kind>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[-+0-9.eE]+)(?P<unit>[AV])\s*$"
)


@dataclass(frozen=True)
class RailReading:
    rail: str
    volts: float
    amps: float

    @property
    def power_w(self) -> float:
        return self.volts * self.amps


@dataclass(frozen=True)
class PmicReading:
    """All rails of one read; `input_volts` is EXT5V (the USB-C supply) when present."""

    rails: tuple[RailReading, ...]
    input_volts: float | None
    unparsed_lines: int

    @property
    def power_w(self) -> float:
        return sum(rail.power_w for rail in self.rails)


class PmicParseError(ValueError):
    """The output holds no rail with both a voltage and a current."""


def parse_pmic_adc(text: str) -> PmicReading:
    """Parse one `vcgencmd pmic_read_adc` output; unparsable lines are counted, not fatal."""
    volts: dict[str, float] = {}
    amps: dict[str, float] = {}
    unparsed = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _LINE.match(line)
        if match is None or match["kind"] != match["unit"]:
            unparsed += 1
            continue
        try:
            value = float(match["value"])
        except ValueError:
            unparsed += 1
            continue
        (volts if match["kind"] == "V" else amps)[match["rail"]] = value
    rails = tuple(RailReading(rail, volts[rail], amps[rail]) for rail in amps if rail in volts)
    if not rails:
        raise PmicParseError(f"no rail with both voltage and current ({unparsed} lines unparsed)")
    return PmicReading(rails=rails, input_volts=volts.get("EXT5V"), unparsed_lines=unparsed)
