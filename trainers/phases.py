"""Named ranges of a training step (`lowmem.forward.layer`, `lowmem.backward.dw`, ...) that
`trainers.profiling` sums when a profiler records; free otherwise."""

from __future__ import annotations

import contextlib

import torch


def phase(name: str) -> contextlib.AbstractContextManager:
    """A named `record_function` range while a profiler records, else nothing: a range costs
    about 10 us, which a small model's ~40 ranges per step would pay on every step."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()
