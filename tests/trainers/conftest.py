"""Fixtures of the engine's tests."""

from __future__ import annotations

import pytest

from trainers import kernels, native


@pytest.fixture
def compiled_kernels():
    """Skip, with the reason, where the fused C++ kernels cannot be built; afterwards put the
    switches a test may turn off (fused path, bit forward) back on."""
    if native.load() is None:
        pytest.skip(f"fused kernels cannot be built here: {native.status()}")
    yield
    native.set_fused(True)
    kernels.set_bit_forward(True)
