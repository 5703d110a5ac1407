"""Standard binary layers: forward values and gradients (gradcheck in float64)."""

import pytest
import torch

from trainers import native
from trainers.layers import (
    BinarizeWeight,
    BinaryConv2d,
    BinaryLinear,
    L1BatchNorm,
    L1BatchNormFunction,
    SignSTE,
    sign,
)


def test_sign_maps_zero_to_plus_one():
    x = torch.tensor([-2.0, -0.0, 0.0, 0.5])
    assert sign(x).tolist() == [-1.0, 1.0, 1.0, 1.0]


def test_sign_ste_forward_and_backward_with_exact_zeros():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.3, 1.0, 2.0], requires_grad=True)
    y = SignSTE.apply(x)
    assert y.tolist() == [-1, -1, 1, 1, 1, 1]
    y.backward(torch.arange(1.0, 7.0))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0]


def test_binarize_weight_clips_gradient():
    w = torch.tensor([-1.2, -0.5, 0.0, 1.0, 3.0], requires_grad=True)
    BinarizeWeight.apply(w).sum().backward()
    assert w.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_binary_linear_uses_sign_of_latent_weights():
    layer = BinaryLinear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -0.2, 0.0], [-0.9, 0.4, -0.01]]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert layer(x).tolist() == [[1 - 2 + 3, -1 + 2 - 3]]


def test_binary_conv_matches_conv_of_signs():
    torch.manual_seed(1)
    layer = BinaryConv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 5, 5)
    ref = torch.nn.functional.conv2d(x, sign(layer.weight.detach()), padding=1)
    assert torch.allclose(layer(x), ref)


def test_l1_batchnorm_forward_statistics():
    bn = L1BatchNorm(2)
    x = torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, 13.0], [7.0, 7.0]])
    y = bn(x)
    # channel 0: mu 4, mean |x - mu| = 2; channel 1: mu 10, mean |x - mu| = 1.5
    expected = torch.tensor([[-1.5, 0.0], [-0.5, 0.0], [0.5, 2.0], [1.5, -2.0]])
    assert torch.allclose(y, expected, atol=1e-4)
    assert torch.allclose(bn.running_mean, torch.tensor([0.4, 1.0]))


def test_l1_batchnorm_gradcheck_dense_and_conv():
    torch.manual_seed(0)
    for shape, channels in [((6, 3), 3), ((3, 2, 4, 4), 2)]:
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        beta = torch.randn(channels, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, b: L1BatchNormFunction.apply(x, b, 0.0)[0], (x, beta)
        )


def test_binary_linear_gradcheck_wrt_input():
    torch.manual_seed(0)
    layer = BinaryLinear(4, 3).double()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.usefixtures("compiled_kernels")
def test_binarize_weight_gradient_kernel_equals_the_autograd_expression():
    """`ste_weight_grad` (one pass) gives what grad * (|w| <= 1) gives, the border included."""
    torch.manual_seed(4)
    w = torch.randn(37, 53) * 1.5
    w[0, :4] = torch.tensor([-1.0, 1.0, -1.0000001, 1.0000001])
    grad = torch.randn(37, 53)
    results = []
    for fused in (True, False):
        native.set_fused(fused)
        latent = w.clone().requires_grad_(True)
        BinarizeWeight.apply(latent).backward(grad)
        results.append(latent.grad)
    assert torch.equal(results[0], results[1])
    assert results[0][0, :4].tolist() == [grad[0, 0].item(), grad[0, 1].item(), 0.0, 0.0]
