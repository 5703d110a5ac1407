"""`standard`'s batch norm (+ sign) on the compiled kernels against the autograd reference
(`L1BatchNormFunction` then `SignSTE`): the same outputs, gradients and running statistics,
up to float32 summation order."""

from __future__ import annotations

import copy

import pytest
import torch

from trainers import native
from trainers.blocks import BinaryBlock, BlockSpec
from trainers.layers import (
    BinaryConv2d,
    BinaryLinear,
    L1BatchNorm,
    L1BatchNormFunction,
    SignSTE,
    fused_standard_bn,
)
from trainers.methods import LowMemSwitches

pytestmark = pytest.mark.usefixtures("compiled_kernels")


def reference(bn: L1BatchNorm, x: torch.Tensor, sign_output: bool) -> torch.Tensor:
    y, mu, sigma1 = L1BatchNormFunction.apply(x, bn.beta, bn.eps)
    bn.update_running(mu, sigma1)
    return SignSTE.apply(y) if sign_output else y


@pytest.mark.parametrize("shape", [(7, 5), (6, 4, 5, 3), (3, 17, 9, 9)])
@pytest.mark.parametrize("sign_output", [True, False])
def test_fused_batch_norm_equals_autograd(shape, sign_output):
    torch.manual_seed(0)
    bn = L1BatchNorm(shape[1])
    with torch.no_grad():
        bn.beta.uniform_(-0.5, 0.5)
    ref_bn = copy.deepcopy(bn)
    x = (torch.randn(*shape) * 3 + 0.5).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    assert fused_standard_bn(x, bn)
    out = bn(x, sign_output=sign_output)
    out_ref = reference(ref_bn, x_ref, sign_output)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    if sign_output:
        assert torch.equal(out, out_ref)
    else:
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.beta.grad, ref_bn.beta.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_sigma1, ref_bn.running_sigma1)


@pytest.mark.parametrize("kind", ["dense", "conv-pool"])
def test_standard_block_same_with_and_without_kernels(kind):
    torch.manual_seed(1)
    if kind == "dense":
        block = BinaryBlock(BinaryLinear(20, 12), BlockSpec(), LowMemSwitches())
        x = torch.randn(8, 20)
    else:
        block = BinaryBlock(BinaryConv2d(3, 6, 3, padding=1), BlockSpec(pool="after_act"),
                            LowMemSwitches())
        x = torch.randn(4, 3, 8, 8)
    twin = copy.deepcopy(block)
    out = block(x)
    out.sum().backward()
    native.set_fused(False)
    out_ref = twin(x)
    out_ref.sum().backward()
    assert torch.equal(out, out_ref)
    torch.testing.assert_close(block.layer.weight.grad, twin.layer.weight.grad, rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(block.bn.beta.grad, twin.bn.beta.grad, rtol=1e-4, atol=1e-5)
