"""Hybrid quantisation of the trainable part (Vorabbi et al.): forward at q_f bits,
gradients at q_b bits, per-tensor min-max, identity gradient.

These are the transient tensors of a step (activations, their gradients, the head's
weight as the forward uses it), rounded onto the 2**bits-level min-max grid in place of
the float32 values. The weights themselves are held at q_b bits for real by
`hybrid_sgd.HybridSGD` (`qstore`). `bits >= 32` means "leave as is", so q_f = q_b = 32
is the unquantised reference.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

FULL_PRECISION_BITS = 32


def quantise_minmax(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round `x` onto 2**bits evenly spaced levels between its own min and max."""
    if bits >= FULL_PRECISION_BITS or x.numel() == 0:
        return x
    return quantise_minmax_(x.clone(), bits)


def quantise_minmax_(x: torch.Tensor, bits: int) -> torch.Tensor:
    """`quantise_minmax` in place, without scratch tensors (a gradient consumed by a step)."""
    if bits >= FULL_PRECISION_BITS or x.numel() == 0:
        return x
    lo, hi = torch.aminmax(x.detach())
    scale = (hi - lo) / (2**bits - 1)
    if scale <= 0:
        return x
    return x.sub_(lo).div_(scale).round_().mul_(scale).add_(lo)


class HybridQuantise(torch.autograd.Function):
    """Forward: quantise at `forward_bits`. Backward: the incoming gradient passes the
    rounding unchanged (identity gradient), then is itself quantised at `backward_bits`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_bits: int, backward_bits: int) -> torch.Tensor:
        ctx.backward_bits = backward_bits
        return quantise_minmax(x, forward_bits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return quantise_minmax(grad, ctx.backward_bits), None, None


def hybrid_quantise(x: torch.Tensor, qf: int, qb: int) -> torch.Tensor:
    if qf >= FULL_PRECISION_BITS and qb >= FULL_PRECISION_BITS:
        return x
    return HybridQuantise.apply(x, qf, qb)


class QuantisedLinearHead(nn.Module):
    """The bias-free linear classifier of CWR*, its weight used at q_f bits in forward
    (and its weight gradient quantised at q_b bits); 32/32 until `qf`/`qb` are set (the
    first experience trains unquantised, as in the authors' code)."""

    def __init__(self, in_features: int, num_classes: int, qf: int, qb: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.qf, self.qb = qf, qb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(x.flatten(1), hybrid_quantise(self.weight, self.qf, self.qb))
        return hybrid_quantise(logits, self.qf, self.qb)


def quantise_activations(modules: Iterable[nn.Module], qf: int, qb: int) -> list:
    """Quantise the output of every leaf module under `modules` (forward at q_f, its
    gradient at q_b) with forward hooks; returns the hook handles."""
    if qf >= FULL_PRECISION_BITS and qb >= FULL_PRECISION_BITS:
        return []

    def hook(_module, _inputs, output):
        return hybrid_quantise(output, qf, qb) if isinstance(output, torch.Tensor) else output

    handles = []
    for root in modules:
        for module in root.modules():
            if not any(True for _ in module.children()):
                handles.append(module.register_forward_hook(hook))
    return handles
