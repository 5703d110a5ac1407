"""Fixtures of the engine's tests."""

from __future__ import annotations

import pytest

from trainers import kernels, native


@pytest.fixture
def compiled_kernels():
    """Skip, with the reason, where the fused C++ kernels cannot be built; the tests that
    use it call them, so they are switched on (also under BNN_FUSED=0) and, with the bit
    forward a test may turn off, switched on again afterwards."""
    if native.load() is None:
        pytest.skip(f"fused kernels cannot be built here: {native.status()}")
    native.set_fused(True)
    yield
    native.set_fused(True)
    kernels.set_bit_forward(True)
