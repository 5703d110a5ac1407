"""LowMemAdam: float16 moments that follow torch's fp32 Adam, whatever the gradient scale."""

import math

import pytest
import torch

from trainers.bits import pack_bits
from trainers.lowmem_optim import LowMemAdam


@pytest.mark.parametrize("grad_scale", [1e-6, 1.0, 1e3])
def test_follows_fp32_adam_at_any_gradient_scale(grad_scale):
    torch.manual_seed(0)
    p32 = torch.nn.Parameter(torch.zeros(1000))
    p16 = torch.nn.Parameter(torch.zeros(1000, dtype=torch.float16))
    ref, low = torch.optim.Adam([p32], lr=1e-3), LowMemAdam([p16], lr=1e-3)
    for _ in range(200):
        g = torch.randn(1000) * grad_scale
        p32.grad, p16.grad = g.clone(), g.half()
        ref.step()
        low.step()
    moved = p32.abs().mean().item()
    assert moved > 5e-3  # the reference really moved
    # float16 parameters and moments drift from fp32 by rounding: within 15 % of the
    # mean distance travelled after 200 steps (without scaling, 1e-6 gradients underflow
    # (1 - beta2) g^2 to zero and the steps blow up to lr / eps)
    assert (p32 - p16.float()).abs().max().item() < 0.15 * moved
    assert low.state[p16]["exp_avg"].dtype == torch.float16


def test_packed_sign_gradients_match_adam_on_signs():
    torch.manual_seed(1)
    w32 = torch.nn.Parameter(torch.zeros(4, 8))
    w16 = torch.nn.Parameter(torch.zeros(4, 8, dtype=torch.float16))
    ref, low = torch.optim.Adam([w32], lr=1e-2), LowMemAdam([w16], lr=1e-2)
    for _ in range(20):
        g = torch.randn(4, 8)
        w32.grad = torch.where(g >= 0, 1.0, -1.0)
        w16.packed_grad = pack_bits(g >= 0, scale=1 / math.sqrt(32))
        ref.step()
        low.step()
        assert w16.packed_grad is None  # consumed by the step
    assert (w32 - w16.float()).abs().max().item() < 2e-3


def test_rejects_bad_hyperparameters():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="-1"):
        LowMemAdam([p], lr=-1)
