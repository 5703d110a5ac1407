"""Why a device cannot be used; all are `DeviceUnreachable`, so a run skips the device."""

from __future__ import annotations

from harness.errors import DeviceUnreachable


class HostKeyRejected(DeviceUnreachable):
    """The device's host key is unknown or differs from the recorded one; nothing was run."""


class AuthenticationFailed(DeviceUnreachable):
    """The device answered but refused our key or password; retrying will not help."""


class DeviceNotReady(DeviceUnreachable):
    """The device is reachable but lacks what the agent needs (Python packages, disk)."""
