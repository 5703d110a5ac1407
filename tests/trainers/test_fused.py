"""The fused C++ low-memory block and LowMemAdam against the reference PyTorch path.

Same state, same arithmetic: outputs, input gradients and batch-norm gradients must be
identical, the 1-bit weight gradients identical (up to sign flips of near-zero sums that
a different product chunking may round differently), running statistics identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainers import kernels, native
from trainers.blocks import BinaryBlock, BlockSpec
from trainers.layers import BinaryConv2d, BinaryLinear
from trainers.lowmem import LowMemBlockFunction, po2_quantize
from trainers.lowmem_fused import FusedBlockFunction, applies
from trainers.lowmem_optim import LowMemAdam
from trainers.methods import LowMemSwitches, make_recipe
from trainers.models import build_model

pytestmark = [pytest.mark.compiler, pytest.mark.usefixtures("compiled_kernels")]


FP16_EPS = torch.finfo(torch.float16).eps

BLOCKS = {
    "dense": (lambda: BinaryLinear(40, 24), BlockSpec(), (5, 40)),
    "dense-odd-width": (lambda: BinaryLinear(13, 11), BlockSpec(), (3, 13)),
    "dense-last": (lambda: BinaryLinear(24, 10), BlockSpec(sign_output=False), (6, 24)),
    "dense-first": (lambda: BinaryLinear(30, 16), BlockSpec(first=True), (4, 30)),
    # not run whole in C++ (sign_input): the step-by-step fused path's dense route
    "dense-sign-input": (lambda: BinaryLinear(24, 16), BlockSpec(sign_input=True), (5, 24)),
    "conv": (lambda: BinaryConv2d(16, 32, 3, padding=1), BlockSpec(), (4, 16, 8, 8)),
    "conv-first": (lambda: BinaryConv2d(3, 16, 3), BlockSpec(first=True), (4, 3, 9, 9)),
    "conv-pool-before-bn": (lambda: BinaryConv2d(8, 16, 3, padding=1),
                            BlockSpec(pool="before_bn"), (3, 8, 8, 8)),
    "conv-pool-after-act": (lambda: BinaryConv2d(8, 16, 3), BlockSpec(pool="after_act"),
                            (3, 8, 10, 10)),
    "conv-odd-pool": (lambda: BinaryConv2d(8, 16, 3), BlockSpec(pool="after_act"),
                      (2, 8, 9, 11)),
    "conv-sign-input-stride-2": (lambda: BinaryConv2d(16, 24, 3, stride=2, padding=1),
                                 BlockSpec(sign_input=True, sign_output=False), (4, 16, 8, 8)),
    "conv-batch-1": (lambda: BinaryConv2d(5, 8, 3, padding=1), BlockSpec(), (1, 5, 5, 9)),
}


def run_block(function, block: BinaryBlock, x: torch.Tensor, grad_seed: int = 1):
    x = x.clone().requires_grad_(True)
    out = function.apply(x, block.layer.weight, block.bn.beta, block)
    torch.manual_seed(grad_seed)
    out.backward(torch.randn(out.shape).to(out.dtype))
    packed = block.layer.weight.packed_grad
    result = (out.detach().float(), None if x.grad is None else x.grad.clone(),
              block.bn.beta.grad.clone(), packed.data.clone(),
              block.bn.running_mean.clone(), block.bn.running_sigma1.clone(), out.dtype)
    block.bn.beta.grad = None
    block.layer.weight.packed_grad = None
    return result


@pytest.mark.parametrize("blocked", [False, True], ids=["whole", "blocked"])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_fused_block_equals_reference(name, blocked, monkeypatch):
    """`blocked`: a dense dX made a few columns of sgn(W) at a time, a conv dW summed a few
    output channels at a time (the way the largest layers run)."""
    if blocked:
        from trainers import lowmem_fused

        monkeypatch.setattr(lowmem_fused, "DX_BLOCK_ELEMENTS", 64)
        monkeypatch.setattr(lowmem_fused, "CONV_DW_BLOCK_ELEMENTS", 1024)
    make, spec, shape = BLOCKS[name]
    torch.manual_seed(3)
    block = BinaryBlock(make(), spec, LowMemSwitches.lowmem())
    block.layer.weight.data = block.layer.weight.data.half()
    block.bn.beta.data = (torch.randn(block.bn.beta.shape) * 0.2).half()
    x = torch.randn(*shape)
    if not (spec.first or spec.sign_input):
        x = x.sign().to(torch.bfloat16)
    ref_block, fused_block = block, copy.deepcopy(block)
    ref = run_block(LowMemBlockFunction, ref_block, x)
    fused = run_block(FusedBlockFunction, fused_block, x)
    out, grad_x, d_beta, dw, running_mean, running_sigma1, _ = fused
    assert torch.equal(ref[0], out)
    assert (ref[1] is None) == (grad_x is None)
    if grad_x is not None:
        assert torch.equal(ref[1], grad_x)
    torch.testing.assert_close(ref[2], d_beta, rtol=1e-6, atol=0)
    # A conv block's dW is summed over chunks of samples in 16-bit products: near-zero sums
    # may round to the other sign. Dense blocks are one product: identical.
    flipped = bit_count(ref[3] ^ dw) / (dw.numel() * 8)
    assert flipped == 0 if isinstance(block.layer, BinaryLinear) else flipped < 0.005
    assert torch.equal(ref[4], running_mean) and torch.equal(ref[5], running_sigma1)


VARIANTS = {
    "wang_bn_trick": ("wang_bn_trick",),
    "wang_po2": ("wang_po2",),
    "wang_fp16": ("wang_fp16",),
    "wang_all": ("wang_bn_trick", "wang_po2", "wang_fp16"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_fused_block_equals_reference_with_wang_variants(name, variant):
    """Wang et al.'s numerics run on the fused kernels too, equal to the reference."""
    make, spec, shape = BLOCKS[name]
    torch.manual_seed(3)
    block = BinaryBlock(make(), spec, LowMemSwitches.lowmem().with_changes(
        enable=VARIANTS[variant]))
    block.layer.weight.data = block.layer.weight.data.half()
    block.bn.beta.data = (torch.randn(block.bn.beta.shape) * 0.2).half()
    x = torch.randn(*shape)
    if not (spec.first or spec.sign_input):  # as the block below hands it over
        x = x.sign().to(torch.float16 if block.switches.wang_fp16 else torch.bfloat16)
    fused_block = copy.deepcopy(block)
    ref = run_block(LowMemBlockFunction, block, x)
    fused = run_block(FusedBlockFunction, fused_block, x)
    out_dtype = torch.float16 if block.switches.wang_fp16 and spec.sign_output else None
    assert out_dtype is None or ref[6] == fused[6] == out_dtype
    assert torch.equal(ref[0], fused[0])
    if ref[1] is not None:
        assert ref[1].dtype == fused[1].dtype == x.dtype
        assert torch.equal(ref[1].float(), fused[1].float())
    torch.testing.assert_close(ref[2], fused[2], rtol=1e-6, atol=0)
    flipped = bit_count(ref[3] ^ fused[3]) / (fused[3].numel() * 8)
    assert flipped == 0 if isinstance(block.layer, BinaryLinear) else flipped < 0.005
    assert torch.equal(ref[4], fused[4]) and torch.equal(ref[5], fused[5])


def test_fused_block_in_evaluation_mode_uses_running_statistics():
    make, spec, shape = BLOCKS["conv-pool-after-act"]
    torch.manual_seed(4)
    block = BinaryBlock(make(), spec, LowMemSwitches.lowmem())
    x = torch.randn(*shape).sign().to(torch.bfloat16)
    run_block(FusedBlockFunction, block, x)  # one training step moves the running stats
    block.eval()
    with torch.no_grad():
        ref = LowMemBlockFunction.apply(x, block.layer.weight, block.bn.beta, block)
        fused = FusedBlockFunction.apply(x, block.layer.weight, block.bn.beta, block)
    assert torch.equal(ref.float(), fused.float())


def test_fused_path_applies_only_where_its_state_is_kept():
    block = BinaryBlock(BinaryLinear(8, 8), BlockSpec(), LowMemSwitches.lowmem())
    assert applies(block)
    for switch in ("bn_sign_trick", "packed_masks"):
        sw = LowMemSwitches.lowmem().with_changes(disable=[switch])
        assert not applies(BinaryBlock(BinaryLinear(8, 8), BlockSpec(), sw))
    native.set_fused(False)
    assert not applies(block)
    assert native.status() == "reference (BNN_FUSED=0)"


@pytest.mark.parametrize("name", ["mlp", "cnv"])
@pytest.mark.parametrize("products", ["int8-bf16", "fp32"])
def test_fused_model_step_matches_reference(name, products, monkeypatch):
    """A whole model: same logits, same batch-norm gradients, 1-bit dW equal but for
    near-zero sums that the bf16 products may round across zero (< 0.2 %); on either
    product path (`kernels`' "auto" picks one per machine). With float32 products the two
    paths sum in different orders, and power-of-two rounding turns those last-bit
    differences into whole levels (cnv's beta gradients then differ well beyond float
    rounding), so there they are held equal with the rounding off."""
    monkeypatch.setattr(kernels, "_compute", "int8" if products == "int8-bf16" else "fp32")
    monkeypatch.setattr(kernels, "_grad_dtype", "bf16")
    disable = [] if products == "int8-bf16" else ["po2_grads"]
    base, x, y = lowmem_model_and_batch(name, 8, disable)
    runs = []
    for fused in (False, True):
        native.set_fused(fused)
        runs.append(model_step(copy.deepcopy(base), x, y))
    (logits_ref, beta_ref, dw_ref), (logits, beta, dw) = runs
    assert torch.equal(logits_ref, logits)
    for a, b in zip(beta_ref, beta):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-6)
    flipped = sum(bit_count(a ^ b) for a, b in zip(dw_ref, dw))
    total = sum(a.numel() * 8 for a in dw_ref)
    assert flipped / total < 2e-3


def lowmem_model_and_batch(name: str, batch: int, disable: list[str] | None = None):
    """A lowmem model (seed 0; switches in `disable` off) and a batch of inputs in [-1, 1]
    with labels."""
    torch.manual_seed(0)
    model = build_model(name, make_recipe("lowmem", disable=disable or []))
    return model, torch.rand(batch, *model.in_shape) * 2 - 1, torch.randint(0, 10, (batch,))


def model_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Logits, batch-norm beta gradients and packed 1-bit dWs of one forward and backward."""
    logits = model(x).float()
    F.cross_entropy(logits, y).backward()
    blocks = [m for m in model.modules() if isinstance(m, BinaryBlock)]
    return (logits.detach(), [b.bn.beta.grad for b in blocks],
            [b.layer.weight.packed_grad.data for b in blocks])


def bit_count(t: torch.Tensor) -> int:
    bits = (t.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return int(bits.sum())


@pytest.mark.parametrize("shape,grad_scale", [((512,), 1e-4), ((64, 32), 1.0), ((7, 3), 5.0)])
def test_fused_adam_matches_reference_within_float16_rounding(shape, grad_scale):
    """Two steps (the second with non-zero moments); over more, an ulp of difference in a
    tiny float16 moment can compound into a visibly different update."""
    results = []
    for fused in (False, True):
        native.set_fused(fused)
        torch.manual_seed(1)
        p = torch.nn.Parameter(torch.randn(shape).half())
        optimizer = LowMemAdam([p])
        for _ in range(2):
            g = torch.randn(shape)
            p.grad = (g.sign() * g.abs().clamp(min=0.5) * grad_scale).half()
            optimizer.step()
        state = optimizer.state[p]
        results.append([p.detach().float(), state["exp_avg"].float(), state["exp_avg_sq"].float()])
    for ref, fused in zip(*results):
        torch.testing.assert_close(ref, fused, rtol=2 * FP16_EPS, atol=2**-24)


def test_fused_adam_consumes_packed_one_bit_gradients():
    from trainers.bits import pack_bits

    results = []
    for fused in (False, True):
        native.set_fused(fused)
        torch.manual_seed(2)
        p = torch.nn.Parameter(torch.randn(16, 12).half())
        optimizer = LowMemAdam([p])
        for _ in range(2):
            p.packed_grad = pack_bits(torch.randn(16, 12) >= 0, 1 / 12)
            optimizer.step()
            assert p.packed_grad is None
        results.append(p.detach().float())
    torch.testing.assert_close(results[0], results[1], rtol=2 * FP16_EPS, atol=2**-24)


def test_po2_rounding_is_exact_in_the_log_domain():
    """Python's po2_quantize against float64 log2; the C++ kernels share its definition
    (the block tests run with po2 gradients on)."""
    g = torch.cat([torch.randn(20000) * 10.0 ** torch.randint(-6, 2, (20000,)),
                   torch.tensor([0.0, 2**-0.5, -(2**0.5), 1.0, -3.0, 1e-30])])
    exp_max = 1.0
    q = po2_quantize(g, exp_max).double()
    e = torch.log2(g.abs().double()).round().clamp(max=exp_max)
    expected = torch.where((g == 0) | (e < exp_max - 15), 0.0, torch.exp2(e) * g.sign())
    assert torch.equal(q, expected)


@pytest.mark.parametrize("name", ["mlp", "cnv"])
def test_gradients_between_blocks_are_held_as_int8_power_of_two_codes(name, monkeypatch):
    """Every block hands the block below its output gradient as int8 codes (autograd carries
    a 2-byte placeholder), across the flatten between conv and dense blocks too."""
    from trainers import lowmem_fused

    handed = []
    put = lowmem_fused.GradientMailbox.put

    def spy(self, codes, exp_max):
        handed.append(codes.dtype)
        put(self, codes, exp_max)

    monkeypatch.setattr(lowmem_fused.GradientMailbox, "put", spy)
    torch.manual_seed(0)
    model = build_model(name, make_recipe("lowmem"))
    x = torch.rand(4, *model.in_shape) * 2 - 1
    F.cross_entropy(model(x).float(), torch.randint(0, 10, (4,))).backward()
    blocks = [m for m in model.modules() if isinstance(m, BinaryBlock)]
    assert handed == [torch.int8] * (len(blocks) - 1)


@pytest.mark.parametrize("name", ["cnv", "binarynet"])
def test_conv_blocks_hand_their_output_over_as_sign_bits(name, monkeypatch):
    """Between two conv blocks the +-1 activation exists only as packed sign bits (autograd
    carries a stride-0 placeholder); the step equals one with the values handed over."""
    from trainers import lowmem_fused

    base, x, y = lowmem_model_and_batch(name, 3)
    runs = []
    for hand_over in (True, False):
        if not hand_over:
            monkeypatch.setattr(lowmem_fused, "hands_sign_bits", lambda block: False)
        model = copy.deepcopy(base)
        blocks = [m for m in model.modules() if isinstance(m, BinaryBlock)]
        inputs = []
        for block in blocks:
            block.register_forward_pre_hook(lambda _m, args, seen=inputs: seen.append(
                (lowmem_fused.take_sign_bits(args[0]) is not None, args[0].stride())))
        runs.append((inputs, *model_step(model, x, y)))
    (inputs, logits, beta, dw), (inputs_ref, logits_ref, beta_ref, dw_ref) = runs
    convs = sum(not isinstance(b.layer, nn.Linear) for b in blocks)
    assert [bits for bits, _ in inputs] == [False] + [True] * (convs - 1) + [False] * (
        len(blocks) - convs)
    assert all(not any(stride) for bits, stride in inputs if bits)  # placeholders
    assert not any(bits for bits, _ in inputs_ref)
    assert torch.equal(logits, logits_ref)
    assert all(torch.equal(a, b) for a, b in zip(beta, beta_ref))
    assert all(torch.equal(a, b) for a, b in zip(dw, dw_ref))


def test_coded_gradient_rebased_by_chunks_equals_one_encoding():
    from trainers.lowmem import PO2_LEVELS, max_exponent
    from trainers.lowmem_fused import CodedGradient, GradientMailbox, as_rows

    torch.manual_seed(5)
    dx = (torch.randn(6, 8, 5, 5) * torch.logspace(-4, 1, 6).view(6, 1, 1, 1)).to(
        torch.bfloat16).contiguous(memory_format=torch.channels_last)
    coded = CodedGradient(6 * 25, 8, 25)
    for s, e in [(0, 1), (1, 4), (4, 6)]:  # chunks with very different largest exponents
        coded.add(s, e, as_rows(dx[s:e]))
    mailbox = GradientMailbox()
    coded.hand_down(mailbox)
    codes, exp_max = mailbox.take()
    whole = native.kernels().po2_encode(as_rows(dx), float(max_exponent(dx)), PO2_LEVELS)
    assert exp_max == max_exponent(dx)
    assert torch.equal(codes, whole)
    assert mailbox.take() is None


def test_a_stack_cut_from_a_model_ends_in_a_block_that_hands_over_nothing():
    """The last block of a slice (continual learning's frozen lower part) returns values."""
    from trainers.lowmem_fused import take_sign_bits
    from trainers.models import BlockStack

    model, x, _ = lowmem_model_and_batch("cnv", 2)
    lower = BlockStack(*list(model)[:2])
    assert not lower[-1].feeds_block and not lower[-1].feeds_conv_block
    out = lower(x)
    assert take_sign_bits(out) is None and any(out.stride())
    assert set(out.detach().float().unique().tolist()) <= {-1.0, 1.0}
