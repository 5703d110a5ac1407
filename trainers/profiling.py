"""Where a training step's time goes: per-layer forward/backward times and lowmem phases.

Per layer (every `BinaryBlock`, in forward order): forward time from forward pre-/post-
hooks; backward time from tensor hooks, from the moment the gradient of the block's output
is ready to the moment the gradient of its input is (for the first block, to the start of
the optimizer's step). Blocks run one after another on the CPU, so wall-clock intervals
are the blocks' own times. The optimizer step is timed through its step hooks.

Phases: one more step runs under `torch.profiler`, and the `record_function` ranges that
`trainers.lowmem` opens (`lowmem.forward.layer`, `lowmem.backward.dw`, ...) are summed
over all blocks; profiler overhead makes these somewhat larger than untraced time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from trainers import kernels
from trainers.blocks import BinaryBlock

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class LayerTime:
    """Median seconds per step spent in one block's forward and backward."""

    name: str
    kind: str
    forward_s: float
    backward_s: float


@dataclass
class StepProfile:
    """Per-layer times, optimizer time, whole step, lowmem phases, kernel choice."""

    step_s: float
    optimizer_s: float
    layers: list[LayerTime]
    phases_s: dict[str, float] = field(default_factory=dict)
    kernels: dict = field(default_factory=dict)
    steps: int = 0

    def to_dict(self) -> dict:
        return {
            "step_s": self.step_s,
            "optimizer_s": self.optimizer_s,
            "layers": [vars(layer) for layer in self.layers],
            "phases_s": self.phases_s,
            "kernels": self.kernels,
            "steps": self.steps,
        }


def block_kind(block: BinaryBlock) -> str:
    layer = block.layer
    first = " (real input)" if block.spec.first else ""
    if isinstance(layer, nn.Linear):
        return f"dense {layer.in_features}->{layer.out_features}{first}"
    return (f"conv{layer.kernel_size[0]}x{layer.kernel_size[1]} {layer.in_channels}->"
            f"{layer.out_channels}/s{layer.stride[0]}{first}")


class _StepTimer:
    """Hooks on every block and on the optimizer that note when each part starts and ends."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.blocks = [(name, m) for name, m in model.named_modules()
                       if isinstance(m, BinaryBlock)]
        self.forward: dict[str, list[float]] = {name: [] for name, _ in self.blocks}
        self.backward: dict[str, list[float]] = {name: [] for name, _ in self.blocks}
        self.optimizer: list[float] = []
        self._t0: dict[str, float] = {}
        self._grad_out_at: dict[str, float] = {}
        self._open: list[str] = []  # blocks whose backward started and has no end yet
        self.handles = []
        for name, block in self.blocks:
            self.handles.append(block.register_forward_pre_hook(self._pre(name)))
            self.handles.append(block.register_forward_hook(self._post(name)))
        self.handles.append(optimizer.register_step_pre_hook(self._step_start))
        self.handles.append(optimizer.register_step_post_hook(self._step_end))

    def _pre(self, name: str):
        def hook(_module, inputs):
            x = inputs[0]
            if torch.is_grad_enabled() and x.requires_grad:
                x.register_hook(self._grad_in(name))
            self._t0[name] = time.perf_counter()
        return hook

    def _post(self, name: str):
        def hook(_module, _inputs, output):
            self.forward[name].append(time.perf_counter() - self._t0[name])
            if torch.is_grad_enabled() and output.requires_grad:
                output.register_hook(self._grad_out(name))
        return hook

    def _grad_out(self, name: str):
        def hook(_grad):
            self._grad_out_at[name] = time.perf_counter()
            self._open.append(name)
        return hook

    def _grad_in(self, name: str):
        def hook(_grad):
            self._close(name, time.perf_counter())
        return hook

    def _close(self, name: str, now: float) -> None:
        if name in self._open:
            self._open.remove(name)
            self.backward[name].append(now - self._grad_out_at[name])

    def _step_start(self, *_args) -> None:
        now = time.perf_counter()
        for name in list(self._open):  # blocks without an input gradient (the first one)
            self._close(name, now)
        self._opt_t0 = now

    def _step_end(self, *_args) -> None:
        self.optimizer.append(time.perf_counter() - self._opt_t0)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def lowmem_phases(step: Callable[[torch.Tensor, torch.Tensor], object], batch: Batch
                  ) -> dict[str, float]:
    """Seconds per `lowmem.*` range (summed over blocks) and the optimizer step, one step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(*batch)
    phases: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("lowmem.") or event.key.startswith("Optimizer.step#"):
            phases[event.key] = event.cpu_time_total / 1e6
    return dict(sorted(phases.items()))


def profile_training(model: nn.Module, optimizer: torch.optim.Optimizer,
                     step: Callable[[torch.Tensor, torch.Tensor], object],
                     batches: list[Batch], phases: bool = True) -> StepProfile:
    """Run `step` on each batch (the first is a warm-up) and time every block's forward and
    backward and the optimizer; then, with `phases`, one profiled step for the lowmem
    phases. Needs at least two batches."""
    if len(batches) < 2:
        raise ValueError(f"profiling needs at least 2 batches (1 warm-up), got {len(batches)}")
    step(*batches[0])
    timer = _StepTimer(model, optimizer)
    step_times = []
    try:
        for x, y in batches[1:]:
            start = time.perf_counter()
            step(x, y)
            step_times.append(time.perf_counter() - start)
    finally:
        timer.remove()
    blocks = dict(timer.blocks)
    layers = [LayerTime(name, block_kind(blocks[name]), _median(timer.forward[name]),
                        _median(timer.backward[name])) for name in blocks]
    return StepProfile(
        step_s=_median(step_times),
        optimizer_s=_median(timer.optimizer),
        layers=layers,
        phases_s=lowmem_phases(step, batches[-1]) if phases else {},
        kernels=kernels.describe(),
        steps=len(step_times),
    )


def format_profile(profile: StepProfile) -> str:
    """A readable table: per layer ms and share of the step, then phases."""
    step_ms = profile.step_s * 1e3 or 1.0
    k = profile.kernels
    lines = [
        f"median step {profile.step_s * 1e3:.1f} ms over {profile.steps} steps; lowmem kernels "
        f"{k.get('compute')} (backward {k.get('backward_dtype')}), torch threads "
        f"{k.get('torch_threads')}, elementwise threads {k.get('elementwise_threads')}, "
        f"cpu {k.get('cpu_capability')}",
        f"{'layer':<14} {'kind':<30} {'forward ms':>10} {'backward ms':>11} {'% step':>7}",
    ]
    for layer in profile.layers:
        total = (layer.forward_s + layer.backward_s) * 1e3
        lines.append(f"{layer.name:<14} {layer.kind:<30} {layer.forward_s * 1e3:>10.1f}"
                     f" {layer.backward_s * 1e3:>11.1f} {100 * total / step_ms:>6.1f}%")
    opt_ms = profile.optimizer_s * 1e3
    lines.append(f"{'optimizer':<14} {'':<30} {'':>10} {'':>11} {100 * opt_ms / step_ms:>6.1f}%"
                 f"  ({opt_ms:.1f} ms)")
    if profile.phases_s:
        lines.append("phases (one profiled step, summed over blocks):")
        for name, seconds in profile.phases_s.items():
            lines.append(f"  {name:<40} {seconds * 1e3:>9.1f} ms")
    return "\n".join(lines)
