"""Shared fixtures: where real data sets live on this machine, repository paths."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real MNIST for tests and benchmarks; the product never depends on this path.
DEFAULT_MNIST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"


def pytest_configure(config: pytest.Config) -> None:
    """A suite started as a background job of a non-interactive shell inherits SIGINT
    ignored, and so would every process it starts: the tests that stop a child with SIGINT
    (Ctrl-C) would then wait for nothing. Catching it here makes it the default again in
    children (a caught signal is reset by exec, an ignored one is not)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def mnist_dir_setting() -> Path:
    return Path(os.environ.get("BNN_MNIST_DIR", DEFAULT_MNIST_DIR))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark what a test needs from its fixtures and skips: real MNIST (`mnist_dir`), sshd lab
    devices (`lab_factory`, `fleet.requires_sshd`); `-m "not sshd"` and the like then select
    by what a machine has."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "mnist_dir" in names:
            item.add_marker(pytest.mark.mnist)
        needs_sshd = any("sshd" in str(m.kwargs.get("reason", ""))
                         for m in item.iter_markers("skipif"))  # fleet.requires_sshd
        if "lab_factory" in names or needs_sshd:
            item.add_marker(pytest.mark.sshd)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST IDX files; the test is skipped (with the reason) when absent."""
    path = mnist_dir_setting()
    if not (path / "train-images-idx3-ubyte.gz").exists() and not (
        path / "train-images-idx3-ubyte"
    ).exists():
        pytest.skip(f"real MNIST not found at {path} (set BNN_MNIST_DIR)")
    return path
