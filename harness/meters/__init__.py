"""Power meters: drivers, emulators, the recorder, and `start_recorder` for `harness run`.

An inventory device's `meter` section is a mapping; `meter_from_config` validates it
(one-line `HarnessUsageError` naming the field and value) and builds the driver:

    type: um24c | um25c | um34c   port, [baud 9600], [poll_hz 4], [refresh_hz 2],
                                  [silent_s 5]  (no reply that long: reopen the link)
    type: line                    port, [baud 115200], [columns t_us,bus_mV,current_uA], [rate_hz]
    type: rapl                    [interval_s 0.1], [powercap_root /sys/class/powercap]
    type: modeled                 [profile pi3b+|pi4|pi5|host], [idle_w], [busy_w], [pid],
                                  [interval_s 0.5]  (idle_w/busy_w: your board's own figures;
                                  on a remote device the agent computes it from its own load)
    type: pmic                    read on the device by the agent (Pi 5); nothing to do here
    any type                      [name], [gap_s], [accuracy_pct], [accuracy_w]
                                  (your meter's accuracy class: % of the reading + watts;
                                  default: the driver's datasheet figures, `ACCURACY`)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from harness.errors import HarnessUsageError
from harness.meters import line, modeled, pmic, rapl, um
from harness.meters.base import Meter, PowerSample
from harness.meters.line import LineFormat, LineMeter
from harness.meters.modeled import POWER_PROFILES, ModeledMeter, PowerProfile, default_profile
from harness.meters.rapl import POWERCAP_ROOT, RaplMeter
from harness.meters.recorder import Recorder, RecorderStats, SampleStore
from harness.meters.um import UM_MODELS, UmMeter

METER_TYPES = (*UM_MODELS, "line", "rapl", "modeled", "pmic")
_FIELDS = {
    **{model: {"port", "baud", "poll_hz", "refresh_hz", "silent_s"} for model in UM_MODELS},
    "line": {"port", "baud", "columns", "rate_hz"},
    "rapl": {"interval_s", "powercap_root"},
    "modeled": {"profile", "idle_w", "busy_w", "pid", "interval_s"},
    "pmic": set(),
}
_COMMON = {"type", "name", "gap_s", "accuracy_pct", "accuracy_w"}
_ACCURACY = {**um.ACCURACY, "line": line.ACCURACY, "rapl": rapl.ACCURACY,
             "modeled": modeled.ACCURACY, "pmic": pmic.ACCURACY}


def _field(config: Mapping[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    raw = config.get(key, default)
    if raw is None:
        return None
    value = float(raw) if kind is float and type(raw) is int else raw
    if not isinstance(value, kind) or isinstance(value, bool):
        article = "an" if kind.__name__[0] in "aeiou" else "a"
        raise HarnessUsageError(f"{where}meter.{key}: {raw!r} is not {article} {kind.__name__}")
    if kind in (int, float) and value <= 0:
        raise HarnessUsageError(f"{where}meter.{key}: {raw!r} must be positive")
    return value


def meter_from_config(config: Mapping[str, Any], device_name: str = "") -> Meter | None:
    """Validate a device's `meter` mapping and build its driver (None for `pmic`)."""
    where = f"device {device_name}: " if device_name else ""
    if not isinstance(config, Mapping):
        raise HarnessUsageError(f"{where}meter: {config!r} is not a mapping")
    kind = config.get("type")
    if kind not in METER_TYPES:
        raise HarnessUsageError(f"{where}meter.type: {kind!r} (choices: {', '.join(METER_TYPES)})")
    unknown = sorted(set(config) - _FIELDS[kind] - _COMMON)
    if unknown:
        allowed = ", ".join(sorted(_FIELDS[kind] | _COMMON))
        raise HarnessUsageError(
            f"{where}meter.{unknown[0]}: not a field of type {kind} ({allowed})"
        )
    name = _field(config, "name", str, kind, where)
    if kind == "pmic":
        return None
    if kind in UM_MODELS or kind == "line":
        port = _field(config, "port", str, None, where)
        if not port:
            raise HarnessUsageError(f"{where}meter.port: missing (the serial port of the {kind})")
    if kind in UM_MODELS:
        return UmMeter(
            kind,
            port,
            poll_hz=_field(config, "poll_hz", float, 4.0, where),
            baud=_field(config, "baud", int, 9600, where),
            refresh_hz=_field(config, "refresh_hz", float, 2.0, where),
            name=name,
            silent_s=_field(config, "silent_s", float, 5.0, where),
        )
    if kind == "line":
        columns = config.get("columns", "t_us,bus_mV,current_uA")
        try:
            LineFormat.from_columns(columns)
        except (ValueError, TypeError, AttributeError) as exc:
            raise HarnessUsageError(f"{where}meter.columns: {columns!r}: {exc}") from None
        return LineMeter(
            port,
            columns=columns,
            baud=_field(config, "baud", int, 115200, where),
            nominal_hz=_field(config, "rate_hz", float, 1000.0, where),
            name=name,
        )
    if kind == "rapl":
        return RaplMeter(
            root=_field(config, "powercap_root", str, str(POWERCAP_ROOT), where),
            interval_s=_field(config, "interval_s", float, 0.1, where),
            name=name,
        )
    return ModeledMeter(
        _power_profile(config, where),
        pid=_field(config, "pid", int, None, where),
        interval_s=_field(config, "interval_s", float, 0.5, where),
        name=name,
    )


def power_profile(config: Mapping[str, Any], device_name: str = "") -> PowerProfile:
    """A `modeled` meter section's profile (for an agent that models its own power)."""
    return _power_profile(config, f"device {device_name}: " if device_name else "")


def _power_profile(config: Mapping[str, Any], where: str) -> PowerProfile:
    """The named (or detected) profile, with the board's own idle/busy watts where given."""
    profile_name = config.get("profile")
    if profile_name is not None and profile_name not in POWER_PROFILES:
        raise HarnessUsageError(
            f"{where}meter.profile: {profile_name!r} (choices: {', '.join(POWER_PROFILES)})"
        )
    profile = POWER_PROFILES[profile_name] if profile_name else default_profile()
    idle_w = _field(config, "idle_w", float, profile.idle_w, where)
    busy_w = _field(config, "busy_w", float, profile.busy_w, where)
    if busy_w < idle_w:
        raise HarnessUsageError(
            f"{where}meter.busy_w: {busy_w!r} is below idle_w {idle_w!r} (watts all cores busy"
            " and at rest)"
        )
    if (idle_w, busy_w) == (profile.idle_w, profile.busy_w):
        return profile
    return replace(profile, name=f"{profile.name} (calibrated)", idle_w=idle_w, busy_w=busy_w)


def describe_meter(config: Mapping[str, Any], device_name: str = "") -> dict[str, Any]:
    """What the run records about a device's meter, so that every energy figure can say
    what produced it: name, type, kind (`measured` or `modeled`) and accuracy class."""
    where = f"device {device_name}: " if device_name else ""
    kind = config.get("type")
    accuracy = dict(_ACCURACY[kind])
    pct = _field(config, "accuracy_pct", float, None, where)
    watts = config.get("accuracy_w")
    if watts is not None and (isinstance(watts, bool) or not isinstance(watts, (int, float))
                              or watts < 0):
        raise HarnessUsageError(f"{where}meter.accuracy_w: {watts!r} is not a number >= 0")
    if pct is not None or watts is not None:
        accuracy = {
            "relative": pct / 100 if pct is not None else accuracy["relative"],
            "offset_w": float(watts) if watts is not None else accuracy["offset_w"],
            "source": "the inventory's accuracy_pct / accuracy_w",
            "assumed": False,
        }
    if kind in UM_MODELS:  # a reading's age at its poll (UmMeter.age_correction_s)
        poll_hz = _field(config, "poll_hz", float, 4.0, where)
        refresh_hz = _field(config, "refresh_hz", float, 2.0, where)
        accuracy["timing_s"] = 0.5 / max(poll_hz, refresh_hz)
    return {
        "name": config.get("name", kind),
        "type": kind,
        "kind": "modeled" if kind == "modeled" else "measured",
        "accuracy": accuracy,
    }


class AgentSourcedRecorder:
    """For `pmic`: the device agent reads the PMIC and streams `power` events itself."""

    def __init__(self, device_name: str) -> None:
        self.device = device_name
        self.stats = RecorderStats()

    def stop(self, timeout_s: float = 0.0) -> RecorderStats:
        return self.stats


def start_recorder(
    meter_config: Mapping[str, Any], store: SampleStore, device_name: str, remote: bool = False
) -> Recorder | AgentSourcedRecorder:
    """Validate the device's meter section and start reading it into the store. A remote
    device's `modeled` source is computed by its agent (where the load is), not here."""
    meter = meter_from_config(meter_config, device_name)
    if meter is None or (remote and meter_config.get("type") == "modeled"):
        return AgentSourcedRecorder(device_name)
    gap_s = _field(meter_config, "gap_s", float, None, f"device {device_name}: ")
    return Recorder(meter, store, device_name, gap_s=gap_s).start()


__all__ = [
    "METER_TYPES",
    "AgentSourcedRecorder",
    "PowerSample",
    "Recorder",
    "describe_meter",
    "meter_from_config",
    "power_profile",
    "start_recorder",
]
