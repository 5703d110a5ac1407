"""The low-memory block's backward against references computed from the formulas.

Exact switches (packed input signs, packed masks) must give the standard block's
gradients; the only difference is the per-channel statistics kept in float16, hence
the documented relative tolerance of 2e-3. The batch-norm sign trick, power-of-two
gradients and the 1-bit weight gradient are checked against docs/methods.md's formulas
evaluated in float64 from the full tensors.
"""

import copy
import math

import pytest
import torch

from trainers import lowmem
from trainers.bits import unpack_signs
from trainers.blocks import BinaryBlock, BlockSpec
from trainers.layers import BinaryConv2d, BinaryLinear, sign
from trainers.lowmem import po2_quantize, po2_quantize_clamped
from trainers.methods import LowMemSwitches

EXACT = LowMemSwitches(binary_inputs=True, packed_masks=True)
F16_STATS_RTOL = 2e-3

CASES = {
    "dense-first": (lambda: BinaryLinear(12, 7), BlockSpec(first=True), (5, 12), False),
    "dense": (lambda: BinaryLinear(12, 7), BlockSpec(), (5, 12), True),
    "dense-last": (lambda: BinaryLinear(12, 7), BlockSpec(sign_output=False), (5, 12), True),
    "conv-valid": (lambda: BinaryConv2d(3, 4, 3), BlockSpec(), (3, 3, 7, 7), True),
    "conv-pool-after-act": (
        lambda: BinaryConv2d(3, 4, 3), BlockSpec(pool="after_act"), (3, 3, 8, 8), True),
    "conv-pool-before-bn": (
        lambda: BinaryConv2d(3, 4, 3, padding=1), BlockSpec(pool="before_bn"), (3, 3, 6, 6),
        True),
    "resnet-unit": (
        lambda: BinaryConv2d(3, 4, 3, stride=2, padding=1),
        BlockSpec(sign_input=True, sign_output=False), (3, 3, 6, 6), False),
    "batch-1": (lambda: BinaryConv2d(2, 3, 3, padding=1), BlockSpec(), (1, 2, 5, 5), True),
}


def run(block, x, g):
    x = x.clone().requires_grad_(True)
    out = block(x)
    (out.float() * g).sum().backward()
    return out.detach().float(), x.grad, block.layer.weight.grad, block.bn.beta.grad


def close(a, b, rtol=F16_STATS_RTOL):
    scale = b.abs().max().clamp(min=1e-6)
    return (a - b).abs().max() <= rtol * scale


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_switches_match_standard_block(name):
    torch.manual_seed(0)
    make, spec, shape, pm1 = CASES[name]
    ref = BinaryBlock(make(), spec, LowMemSwitches())
    low = copy.deepcopy(ref)
    low.switches = EXACT
    x = torch.randn(*shape)
    if pm1:
        x = sign(x)
    g = torch.randn_like(ref(x))
    out_r, dx_r, dw_r, db_r = run(ref, x, g)
    out_l, dx_l, dw_l, db_l = run(low, x, g)
    if spec.sign_output:
        assert torch.equal(out_r, out_l)
    else:  # real-valued batch-norm output: the layer output is held as float16
        assert close(out_l, out_r)
    if spec.first:
        assert dx_l is None  # the first layer's input is data: no gradient is computed
    else:
        assert close(dx_l, dx_r)
    assert close(dw_l, dw_r)
    assert close(db_l, db_r, rtol=1e-5)


def test_running_statistics_match_standard():
    torch.manual_seed(0)
    ref = BinaryBlock(BinaryConv2d(2, 3, 3), BlockSpec(), LowMemSwitches())
    low = copy.deepcopy(ref)
    low.switches = LowMemSwitches.lowmem()
    x = sign(torch.randn(4, 2, 6, 6))
    ref(x)
    low(x)
    assert torch.allclose(ref.bn.running_mean, low.bn.running_mean, rtol=1e-3, atol=1e-3)
    assert torch.allclose(ref.bn.running_sigma1, low.bn.running_sigma1, rtol=1e-3)
    ref.eval()
    low.eval()
    assert torch.equal(ref(x), low(x).float())


def bn_sign_trick_reference(z, beta, dy_out, mask_grad=True):
    """docs/methods.md's sign trick, g = dY / sigma1, xhat ~ sgn(y) mean|y|, in the exact L1 form:
    dX = g - mean(g) - (sgn(y) - mean(sgn(y))) * mean(g * sgn(y) * mean|y|)."""
    dims = (0,) if z.dim() == 2 else (0, 2, 3)
    shape = (1, -1) if z.dim() == 2 else (1, -1, 1, 1)
    mu = z.mean(dims)
    sigma1 = (z - mu.view(shape)).abs().mean(dims)
    y = (z - mu.view(shape)) / sigma1.view(shape) + beta.view(shape)
    dy = dy_out * (y.abs() <= 1) if mask_grad else dy_out
    g = dy / sigma1.view(shape)
    sy = sign(y)
    mean_abs_y = y.abs().mean(dims)
    centred_sign = sy - sy.mean(dims).view(shape)
    dz = g - g.mean(dims).view(shape) - centred_sign * (g * sy * mean_abs_y.view(shape)).mean(
        dims).view(shape)
    return y, dz


def sign_trick_block_run(conv: bool, sw: LowMemSwitches):
    """A dense or conv block with a nonzero beta, run forward and backward on +-1 inputs:
    its dW, the float64 pre-BN output z, beta and the output gradient, and a function that
    makes dW from a dz (the weight-gradient formula of the layer kind)."""
    torch.manual_seed(2)
    if conv:
        layer, x = BinaryConv2d(3, 4, 3), sign(torch.randn(3, 3, 6, 6))
    else:
        layer, x = BinaryLinear(16, 6), sign(torch.randn(8, 16))
    block = BinaryBlock(layer, BlockSpec(), sw)
    with torch.no_grad():
        block.bn.beta.copy_(torch.randn(block.bn.channels) * 0.3)
    g_out = torch.randn_like(block(x))
    _, _, dw, _ = run(block, x, g_out)
    xd = x.double()
    w_sign = sign(layer.weight.detach()).double()
    z = (torch.nn.functional.conv2d(xd, w_sign) if conv else xd @ w_sign.t())

    def weight_grad(dz):
        return torch.nn.grad.conv2d_weight(xd, layer.weight.shape, dz) if conv else dz.t() @ xd

    return dw.double(), z, block.bn.beta.detach().double(), g_out.double(), weight_grad


@pytest.mark.parametrize("conv", [False, True])
def test_bn_sign_trick_matches_formula(conv):
    sw = LowMemSwitches(binary_inputs=True, packed_masks=True, bn_sign_trick=True)
    dw, z, beta, g_out, weight_grad = sign_trick_block_run(conv, sw)
    _, dz = bn_sign_trick_reference(z, beta, g_out)
    assert close(dw, weight_grad(dz))
    assert dz.sum(dim=(0,) if not conv else (0, 2, 3)).abs().max() < 1e-9


def wang_bn_trick_reference(z, beta, dy_out):
    """Wang et al.'s code: x_hat ~ sgn(x_hat) mean|x_hat|, beta added outside, no centring:
    dX = g - mean(g) - sgn(x_hat) * mean(g * sgn(x_hat) * mean|x_hat|)."""
    dims = (0,) if z.dim() == 2 else (0, 2, 3)
    shape = (1, -1) if z.dim() == 2 else (1, -1, 1, 1)
    mu = z.mean(dims)
    sigma1 = (z - mu.view(shape)).abs().mean(dims)
    xhat = (z - mu.view(shape)) / sigma1.view(shape)
    g = dy_out * ((xhat + beta.view(shape)).abs() <= 1) / sigma1.view(shape)
    sx = sign(xhat)
    scale = (g * sx).mean(dims) * xhat.abs().mean(dims)
    return g - g.mean(dims).view(shape) - sx * scale.view(shape)


@pytest.mark.parametrize("conv", [False, True])
def test_wang_bn_trick_matches_wang_formula(conv):
    sw = LowMemSwitches(binary_inputs=True, packed_masks=True, bn_sign_trick=True,
                        wang_bn_trick=True)
    dw, z, beta, g_out, weight_grad = sign_trick_block_run(conv, sw)
    dz = wang_bn_trick_reference(z, beta, g_out)
    _, dz_ours = bn_sign_trick_reference(z, beta, g_out)
    assert close(dw, weight_grad(dz))
    assert not close(dw, weight_grad(dz_ours))  # the two variants really differ


def test_wang_po2_rounds_dz_feeding_dx_and_dw(monkeypatch):
    """The rounding sits on dz (the layer output's gradient), whose powers of two then make
    dX and dW; the block's output gradient reaches batch norm unrounded."""
    torch.manual_seed(4)
    seen = []

    def spy(dz, exp_max):
        q = po2_quantize_clamped(dz, exp_max)
        seen.append((dz.clone(), exp_max, q.clone()))
        return q

    monkeypatch.setattr(lowmem, "po2_quantize_clamped", spy)
    sw = LowMemSwitches(binary_inputs=True, packed_masks=True, po2_grads=True, wang_po2=True)
    layer, x = BinaryLinear(16, 6), sign(torch.randn(8, 16))
    block = BinaryBlock(layer, BlockSpec(), sw)
    g_out = torch.randn_like(block(x)) * 1e-3
    _, dx, dw, _ = run(block, x, g_out)
    (dz, exp_max, q), = seen
    assert exp_max == math.floor(math.log2(dz.abs().max().item()) + 0.5)
    xd, w_sign = x.double(), sign(layer.weight.detach()).double()
    z = xd @ w_sign.t()
    mu = z.mean(0)
    sigma1 = (z - mu).abs().mean(0)
    xhat = (z - mu) / sigma1
    g = g_out.double() * ((xhat + block.bn.beta.detach().double()).abs() <= 1) / sigma1
    sx = sign(xhat)  # the exact L1 backward (bn_sign_trick off), no rounding of dY
    dz_exact = g - g.mean(0) - (sx - sx.mean(0)) * (g * xhat).mean(0)
    assert close(dz.double(), dz_exact)
    assert close(dx.double(), q.double() @ w_sign)
    assert close(dw.double(), q.double().t() @ xd)


def test_po2_quantize_clamped_is_wangs_window():
    """Wang et al.'s 4-bit exponent biased by 8 - R: [R-16, R-1], clamped, not flushed."""
    g = torch.cat([torch.randn(20000) * 10.0 ** torch.randint(-9, 2, (20000,)),
                   torch.tensor([0.0, 2**-0.5, -(2**0.5), 1.0, -3.0, 1e-30, 100.0])])
    exp_max = 2.0
    q = po2_quantize_clamped(g, exp_max).double()
    e = torch.log2(g.abs().double()).round().clamp(exp_max - 16, exp_max - 1)
    assert torch.equal(q, torch.where(g == 0, 0.0, torch.exp2(e) * g.sign()))
    assert q[-3:].tolist() == [-2.0, 2.0**-14, 2.0]


def test_wang_fp16_carries_float16_activation_gradients():
    sw = LowMemSwitches(binary_inputs=True, packed_masks=True, fp16_grads=True, wang_fp16=True)
    block = BinaryBlock(BinaryLinear(16, 6), BlockSpec(), sw)
    x = sign(torch.randn(8, 16)).half().requires_grad_(True)
    out = block(x)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float16


def test_a_variant_needs_its_technique():
    from contract.errors import UsageError

    with pytest.raises(UsageError, match="'wang_po2' is a variant of 'po2_grads'"):
        LowMemSwitches(wang_po2=True)
    sw = LowMemSwitches.lowmem().with_changes(enable=["wang_po2"])
    assert not sw.with_changes(disable=["po2_grads"]).wang_po2  # goes with its technique
    with pytest.raises(UsageError):
        sw.with_changes(enable=["wang_fp16"], disable=["fp16_grads"])


def test_binary_dw_is_sign_over_sqrt_n_packed():
    torch.manual_seed(3)
    x = sign(torch.randn(6, 10))
    exact = BinaryBlock(BinaryLinear(10, 5), BlockSpec(), EXACT)
    onebit = copy.deepcopy(exact)
    onebit.switches = LowMemSwitches(binary_inputs=True, packed_masks=True, binary_dw=True)
    g = torch.randn(6, 5)
    _, _, dw, _ = run(exact, x, g)
    _, _, none, _ = run(onebit, x, g)
    assert none is None
    packed = onebit.layer.weight.packed_grad
    assert packed.data.dtype == torch.uint8
    assert packed.data.numel() == 5 * math.ceil(10 / 8)
    assert torch.equal(unpack_signs(packed), sign(dw) / math.sqrt(50))


def test_po2_quantize_rounds_to_powers_of_two_with_4_bit_exponent():
    g = torch.tensor([0.0, 1.0, -3.0, 0.3, 2.0**-14, 2.0**-15, -(2.0**-16)])
    q = po2_quantize(g, exp_max=2)
    # exponents below exp_max - 15 = -13 are flushed to zero
    assert q.tolist() == [0.0, 1.0, -4.0, 0.25, 0.0, 0.0, 0.0]


def test_lowmem_keeps_low_bit_tensors_only():
    """What a lowmem block saves for backward: uint8 bits, float16 stats, the weight."""
    torch.manual_seed(0)
    block = BinaryBlock(BinaryConv2d(8, 8, 3, padding=1), BlockSpec(pool="after_act"),
                        LowMemSwitches.lowmem())
    block.layer.weight.data = block.layer.weight.data.half()
    block.bn.beta.data = block.bn.beta.data.half()
    x = sign(torch.randn(4, 8, 8, 8)).bfloat16().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x)
    assert out.dtype == torch.bfloat16
    kinds = {(t.dtype, tuple(t.shape)) for t in saved if t.numel()}
    weight = block.layer.weight
    for t in saved:
        if t.numel() == 0 or t is weight:
            continue
        assert t.dtype in (torch.uint8, torch.float16), (t.dtype, t.shape)
    per_element = [t for t in saved if t.numel() and t is not weight and t.dtype == torch.uint8]
    activation_bytes = sum(t.numel() * t.element_size() for t in per_element)
    # Per input element: 1 bit of input sign, 1 bit of sgn(y), 1 bit of STE mask and 2 bits
    # of max-pool position (one uint8 per 2x2 window): 5 bits against 32.
    fp32_input_bytes = x.numel() * 4
    assert activation_bytes * 32 <= fp32_input_bytes * 5, kinds
