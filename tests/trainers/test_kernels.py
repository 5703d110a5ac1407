"""The int8 kernels against fp32: bit-for-bit on +-1 inputs, for every layer type.

Exactness is the point of the int8 path (trainers.kernels): a sum of +-1 products is an
integer, which fp32 also holds exactly, so the two paths must agree in every bit, for
the raw products, for a whole low-memory block's output and saved state, and through a
model's forward pass. The backward's 16-bit products are checked to keep the signs of
dW (all that the 1-bit gradient keeps) wherever dW is not within bf16 rounding of zero.
"""

import copy
import time

import pytest
import torch
import torch.nn.functional as F

from trainers import kernels
from trainers.bits import pack_bits, pack_rows, unpack_rows, unpack_sign_rows, unpack_signs
from trainers.blocks import BinaryBlock, BlockSpec
from trainers.layers import BinaryConv2d, BinaryLinear, sign
from trainers.methods import LowMemSwitches, make_recipe
from trainers.models import build_model

pytestmark = pytest.mark.compiler


@pytest.fixture
def compute():
    """Switch the compute path for one test and restore the default afterwards."""
    before = kernels.get_compute()
    yield kernels.set_compute
    kernels.set_compute(before)


def pm1(*shape, generator=None):
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1


@pytest.mark.parametrize("n,k,out", [(1, 1, 1), (1, 784, 256), (3, 7, 5), (100, 256, 10),
                                     (17, 4096, 33)])
def test_linear_int8_equals_fp32(n, k, out):
    torch.manual_seed(n * k + out)
    x, w = pm1(n, k), pm1(out, k)
    got = kernels.linear_int8(x.to(torch.int8), kernels.weight_matrix_int8(w))
    assert got.dtype == torch.int32
    assert torch.equal(got.float(), F.linear(x, w))


CONVS = {
    "valid": dict(cin=3, cout=4, k=3, stride=1, padding=0, shape=(2, 3, 7, 7)),
    "same": dict(cin=5, cout=6, k=3, stride=1, padding=1, shape=(2, 5, 6, 6)),
    "stride-2": dict(cin=3, cout=4, k=3, stride=2, padding=1, shape=(2, 3, 9, 9)),
    "odd-non-square": dict(cin=7, cout=3, k=3, stride=1, padding=0, shape=(3, 7, 5, 11)),
    "kernel-1": dict(cin=4, cout=2, k=1, stride=1, padding=0, shape=(2, 4, 3, 3)),
    "kernel-5-stride-2": dict(cin=2, cout=3, k=5, stride=2, padding=2, shape=(2, 2, 10, 7)),
    "batch-1": dict(cin=64, cout=64, k=3, stride=1, padding=1, shape=(1, 64, 8, 8)),
    "wide-k": dict(cin=512, cout=8, k=3, stride=1, padding=1, shape=(2, 512, 4, 4)),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv2d_int8_equals_fp32(name):
    c = CONVS[name]
    torch.manual_seed(len(name))
    x, w = pm1(*c["shape"]), pm1(c["cout"], c["cin"], c["k"], c["k"])
    ks, st, pd = (c["k"], c["k"]), (c["stride"],) * 2, (c["padding"],) * 2
    got = kernels.conv2d_int8(x.to(torch.int8), kernels.weight_matrix_int8(w), ks, st, pd)
    want = F.conv2d(x, w, None, st, pd)
    assert got.shape == want.shape
    assert torch.equal(got.float(), want)


BLOCKS = {
    "dense": (lambda: BinaryLinear(37, 11), BlockSpec(), (6, 37)),
    "dense-batch-1": (lambda: BinaryLinear(20, 9), BlockSpec(), (1, 20)),
    "dense-last": (lambda: BinaryLinear(16, 10), BlockSpec(sign_output=False), (5, 16)),
    "conv-valid": (lambda: BinaryConv2d(3, 5, 3), BlockSpec(), (3, 3, 7, 7)),
    "conv-same-pool-before-bn": (
        lambda: BinaryConv2d(4, 6, 3, padding=1), BlockSpec(pool="before_bn"), (2, 4, 6, 6)),
    "conv-valid-pool-after-act": (
        lambda: BinaryConv2d(3, 4, 3), BlockSpec(pool="after_act"), (3, 3, 8, 8)),
    "conv-stride-2-sign-input": (
        lambda: BinaryConv2d(3, 4, 3, stride=2, padding=1),
        BlockSpec(sign_input=True, sign_output=False), (2, 3, 7, 7)),
    "conv-batch-1-odd": (lambda: BinaryConv2d(5, 3, 3, padding=1), BlockSpec(), (1, 5, 5, 9)),
}


def saved_state(block, x):
    """Forward once and return the output and every tensor the block saved."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = block(x)
    return out, saved


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_lowmem_block_int8_forward_equals_fp32(name, compute):
    """Whole block: output, running statistics and saved bits identical in both paths."""
    make, spec, shape = BLOCKS[name]
    torch.manual_seed(7)
    ref = BinaryBlock(make(), spec, LowMemSwitches.lowmem())
    fast = copy.deepcopy(ref)
    x = (torch.randn(*shape) if spec.sign_input else pm1(*shape)).requires_grad_(True)
    compute("fp32")
    out_ref, saved_ref = saved_state(ref, x)
    compute("int8")
    out_fast, saved_fast = saved_state(fast, x)
    assert torch.equal(out_ref, out_fast)
    assert torch.equal(ref.bn.running_mean, fast.bn.running_mean)
    assert torch.equal(ref.bn.running_sigma1, fast.bn.running_sigma1)
    assert len(saved_ref) == len(saved_fast)
    for a, b in zip(saved_ref, saved_fast):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("model", ["mlp", "cnv", "binarynet"])
def test_model_forward_int8_equals_fp32(model, compute):
    torch.manual_seed(0)
    net = build_model(model, make_recipe("lowmem"))
    x = torch.rand(2, *net.in_shape) * 2 - 1
    net.eval()
    with torch.no_grad():
        compute("fp32")
        want = net(x)
        compute("int8")
        got = net(x)
    assert torch.equal(want, got)


def test_fast_backward_keeps_dw_signs_and_dx(compute):
    """16-bit products in the backward: sgn(dW) as fp32 gives it, except where dW is
    within bf16 rounding of zero; dX within bf16 rounding."""
    torch.manual_seed(3)
    block = BinaryBlock(BinaryConv2d(16, 8, 3, padding=1), BlockSpec(pool="after_act"),
                        LowMemSwitches.lowmem().with_changes(disable=("binary_dw",)))
    x = pm1(4, 16, 8, 8).bfloat16()
    grads = {}
    for mode in ("fp32", "int8"):
        compute(mode)
        b = copy.deepcopy(block)
        xi = x.clone().requires_grad_(True)
        out = b(xi)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(
            out.dtype))
        grads[mode] = (b.layer.weight.grad.float(), xi.grad.float())
    (dw32, dx32), (dw16, dx16) = grads["fp32"], grads["int8"]
    resolvable = dw32.abs() > 2**-7 * dw32.abs().max()
    assert torch.equal(sign(dw32)[resolvable], sign(dw16)[resolvable])
    assert (dx32 - dx16).abs().max() <= 2**-6 * dx32.abs().max()


def test_dense_sign_dw_packed_blockwise_equals_full(compute):
    """The dense 1-bit dW, packed block by block of output rows, equals sgn of the full dW."""
    from trainers.lowmem import DW_BLOCK_ELEMENTS, dense_sign_dw

    torch.manual_seed(4)
    rows = 2 * DW_BLOCK_ELEMENTS // 4096 + 3  # several blocks and a ragged last one
    dz, x_in = torch.randn(10, rows), pm1(10, 4096)
    packed = dense_sign_dw(dz, x_in)
    assert torch.equal(unpack_rows(packed, torch.Size([rows, 4096])), dz.t() @ x_in >= 0)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16, torch.float32])
def test_unpack_sign_rows_straight_to_dtype(dtype):
    mask = torch.rand(5, 3, 7) > 0.5
    data = pack_rows(mask)
    got = unpack_sign_rows(data, mask.shape, dtype)
    assert got.dtype == dtype
    assert torch.equal(got.float(), mask.float() * 2 - 1)


def test_pack_rows_of_slices_at_odd_offsets():
    """The fast packer reads 8 bools as one int64: slices at any offset must still work."""
    mask = torch.rand(7, 13) > 0.5
    for s in range(7):
        assert torch.equal(unpack_rows(pack_rows(mask[s:]), mask[s:].shape), mask[s:])
    flat = torch.rand(101) > 0.5
    assert torch.equal(unpack_signs(pack_bits(flat)), flat.float() * 2 - 1)


def test_elementwise_threads_scope_restores_thread_count():
    full = torch.get_num_threads()
    seen = []
    kernels.set_elementwise_threads(1)
    with kernels.elementwise_threads():
        seen.append(torch.get_num_threads())
        with kernels.all_threads():
            seen.append(torch.get_num_threads())
        seen.append(torch.get_num_threads())
    assert seen == [1, full, 1] if full > 1 else seen == [full] * 3
    assert torch.get_num_threads() == full


def test_switches_refuse_unknown_names():
    with pytest.raises(ValueError, match="int4"):
        kernels.set_compute("int4")
    with pytest.raises(ValueError, match="fp8"):
        kernels.set_grad_dtype("fp8")


def test_describe_names_kernel_threads_and_capability(compute):
    compute("fp32")
    assert kernels.describe()["compute"] == "fp32"
    compute("int8")
    info = kernels.describe()
    assert info["compute"] == "int8" and "_int_mm" in info["forward_kernel"]
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert 1 <= info["elementwise_threads"] <= info["torch_threads"]


def test_profiling_times_every_block_and_the_lowmem_phases():
    from trainers.engine import train_step
    from trainers.optim import build_optimizer
    from trainers.profiling import format_profile, profile_training

    torch.manual_seed(0)
    recipe = make_recipe("lowmem")
    net = build_model("mlp", recipe, in_shape=(1, 8, 8))
    opt = build_optimizer(net, recipe)
    data = [(torch.rand(16, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (16,))) for _ in range(3)]
    prof = profile_training(net, opt, lambda x, y: train_step(net, opt, x, y), data)
    assert [layer.name for layer in prof.layers] == ["0", "1", "2", "3", "4"]
    assert prof.layers[0].kind == "dense 64->256 (real input)"
    assert all(layer.forward_s > 0 and layer.backward_s > 0 for layer in prof.layers)
    assert prof.optimizer_s > 0 and prof.steps == 2
    spent = sum(layer.forward_s + layer.backward_s for layer in prof.layers) + prof.optimizer_s
    assert spent <= prof.step_s * 1.05
    # dense blocks run whole in one fused call each (trainers.lowmem_fused.dense_forward)
    assert {"lowmem.forward.dense_block", "lowmem.backward.dense_block"} <= set(prof.phases_s)
    text = format_profile(prof)
    assert "dense 64->256 (real input)" in text and "lowmem.backward.dense_block" in text
    with pytest.raises(ValueError, match="at least 2 batches"):
        profile_training(net, opt, lambda x, y: None, data[:1])


def test_auto_keeps_the_faster_product(compute):
    """"auto" times the candidates and keeps the faster; either gives exact products."""
    assert kernels._fastest({"slow": lambda: time.sleep(0.002), "fast": lambda: None}) == "fast"
    compute("auto")
    assert kernels.get_compute() in ("int8", "fp32")
    assert kernels.describe()["compute"].startswith(kernels.get_compute() + " (auto")
