"""The low-memory path of real-valued conv -> L1 batch norm stacks (ResNetE-18's stem and
shortcuts) against the same stack through autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainers.layers import L1BatchNorm
from trainers.methods import make_recipe
from trainers.models import build_model
from trainers.real_blocks import RealConvBN

STACKS = {
    "stem": lambda low: RealConvBN(nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False),
                                   L1BatchNorm(16), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                                   low_memory=low),
    "shortcut": lambda low: RealConvBN(nn.AvgPool2d(2), nn.Conv2d(8, 16, 1, bias=False),
                                       L1BatchNorm(16), low_memory=low),
    "conv-bn-relu": lambda low: RealConvBN(nn.Conv2d(4, 6, 3, padding=1, bias=False),
                                           L1BatchNorm(6), nn.ReLU(), low_memory=low),
}


def saved_bytes(run) -> int:
    """Bytes of the tensors autograd saves while `run()` builds its graph (distinct storages)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    return result, sum(storages.values())


class RoundedZ(nn.Module):
    """z rounded to float16 in the forward, gradient straight through: what the low-memory
    path computes, expressed for autograd."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + (z.half().float() - z).detach()


def with_rounded_z(stack: RealConvBN) -> nn.Sequential:
    parts = list(copy.deepcopy(stack))
    return nn.Sequential(*parts[:stack.conv_at + 1], RoundedZ(), *parts[stack.conv_at + 1:])


def train_once(stack: nn.Module, x: torch.Tensor):
    """Output, (dX, dW, d_beta), bytes autograd saved, of one forward and backward."""
    xi = x.clone().requires_grad_(True)
    out, nbytes = saved_bytes(lambda: stack(xi))
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    convs = [m for m in stack.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in stack.modules() if isinstance(m, L1BatchNorm)]
    return out.detach(), (xi.grad, convs[0].weight.grad, bns[0].beta.grad), nbytes, bns[0]


@pytest.mark.parametrize("name", STACKS)
def test_low_memory_stack_equals_autograd_with_float16_z(name):
    torch.manual_seed(0)
    low = STACKS[name](True)
    with torch.no_grad():
        low.bn.beta.normal_(0, 0.5)
    plain, rounded = STACKS[name](False), with_rounded_z(low)
    plain.load_state_dict(low.state_dict())
    x = torch.randn(5, low.conv.in_channels, 20, 20)
    out, grads, nbytes, bn = train_once(low, x)
    out_r, grads_r, _, bn_r = train_once(rounded, x)
    out_p, grads_p, nbytes_p, _ = train_once(plain, x)
    # Exactly the computation of autograd with z held at float16 ...
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_r):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_mean, bn_r.running_mean)
    torch.testing.assert_close(bn.running_sigma1, bn_r.running_sigma1)
    # ... close to the float32 stack (float16 rounding moves a few activations across the
    # ReLU's zero or a pool's argmax) ...
    torch.testing.assert_close(out, out_p, rtol=2e-3, atol=2e-3)
    for got, want in zip(grads, grads_p):
        assert float((got - want).abs().max()) <= 0.05 * float(want.abs().max())
    # ... keeping beyond its input and parameters only z at float16.
    conv_in = low[:low.conv_at](x)
    kept = conv_in.numel() * 4 if low.conv_at else 0
    kept += sum(p.numel() * p.element_size() for p in low.parameters())
    kept += low.conv(conv_in).numel() * 2
    assert nbytes <= x.numel() * 4 + kept + 1024 < nbytes_p


def test_evaluation_and_no_grad_take_the_plain_path():
    stack = STACKS["stem"](True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        trained = stack(x)  # training mode without gradients: plain stack, same statistics
    stack.eval()
    assert stack(x).shape == trained.shape


def test_resnete18_lowmem_uses_the_low_memory_stem_and_shortcuts():
    lowmem = build_model("resnete18", make_recipe("lowmem"), in_shape=(3, 32, 32))
    standard = build_model("resnete18", make_recipe("standard"), in_shape=(3, 32, 32))
    stacks = [m for m in lowmem.modules() if isinstance(m, RealConvBN)]
    assert len(stacks) == 4 and all(s.low_memory for s in stacks)  # stem + 3 shortcuts
    assert not any(m.low_memory for m in standard.modules() if isinstance(m, RealConvBN))
    assert set(lowmem.state_dict()) == set(copy.deepcopy(standard).state_dict())
