"""The device side of the harness; `import device_agent` in your own training script for
`window`, `begin_window` and `end_window` (torch-free: the host imports this package too)."""

from device_agent.windows import WindowRecord, begin_window, end_window, window

__all__ = ["WindowRecord", "begin_window", "end_window", "window"]
