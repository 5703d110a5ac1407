"""`harness dashboard`: a live web page of a run's power and memory traces (see server.py)."""

from harness.dashboard.server import DashboardServer, start_dashboard

__all__ = ["DashboardServer", "start_dashboard"]
