"""XNOR-popcount products on packed sign bits (`trainers/csrc/bit_kernels.cpp`): exact.

A product of +-1 values is an integer, so the bit kernel must give exactly what float32
F.conv2d / F.linear give on the same signs, at every shape the vector lanes and the
convolution's zero padding make awkward: channel counts that are not whole bytes or words,
output channels that are not whole lanes, taps outside the image, strides.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainers import kernels, native
from trainers.engine import train_step
from trainers.lowmem_fused import conv_weight_bits
from trainers.methods import LowMemSwitches, make_recipe
from trainers.models import build_model
from trainers.optim import build_optimizer

pytestmark = [pytest.mark.compiler, pytest.mark.usefixtures("compiled_kernels")]


def signs(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1.0, -1.0)


def sign_bit_rows(x: torch.Tensor) -> torch.Tensor:
    """(n, c, h, w) -> packed sign bits of its channels-last rows (n*h*w, ceil(c/8))."""
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).contiguous()
    return native.kernels().sign_pack(rows, True, False)[1]


@pytest.mark.parametrize("n,c,h,w,out,kernel,stride,padding", [
    (3, 64, 10, 10, 16, (3, 3), (1, 1), (0, 0)),      # one word a tap
    (2, 5, 7, 6, 7, (3, 3), (1, 1), (1, 1)),          # part of a byte, part of a lane, padding
    (2, 130, 9, 9, 17, (3, 3), (2, 2), (1, 1)),       # words + bits, stride 2
    (1, 63, 6, 5, 33, (3, 1), (1, 1), (2, 0)),        # non-square kernel, wide padding
    (4, 256, 3, 3, 40, (3, 3), (1, 1), (1, 1)),       # most taps outside at the border
    (2, 9, 4, 4, 3, (1, 1), (1, 1), (0, 0)),          # 1 x 1
])
def test_bit_conv_equals_the_float_convolution_of_the_signs(n, c, h, w, out, kernel, stride,
                                                            padding):
    generator = torch.Generator().manual_seed(c * 31 + out)
    x = torch.randn(n, c, h, w, generator=generator)
    weight = torch.randn(out, c, *kernel, generator=generator).half()
    expected = F.conv2d(signs(x), signs(weight.float()), None, stride, padding)
    got = kernels.bit_conv(sign_bit_rows(x), (n, c, h, w), conv_weight_bits(weight), kernel,
                           stride, padding)
    assert got.dtype == torch.int32 and got.shape == expected.shape
    assert torch.equal(got.float(), expected)


def test_bit_conv_refuses_rows_of_the_wrong_width():
    x = torch.randn(2, 16, 4, 4)
    weight_bits = conv_weight_bits(torch.randn(8, 16, 3, 3))
    with pytest.raises(RuntimeError, match="x_bits must be"):
        kernels.bit_conv(sign_bit_rows(x)[:, :1].contiguous(), (2, 16, 4, 4), weight_bits,
                         (3, 3), (1, 1), (0, 0))


def lowmem_step(model_name: str, shape: tuple[int, ...], bits: bool, optimizer: str
                ) -> tuple[float, list]:
    """One lowmem training step from the same start: loss and every parameter after it.
    With Bop the binary weights are packed bits, read as int8 +-1."""
    kernels.set_bit_forward(bits)
    torch.manual_seed(0)
    recipe = (make_recipe("bop", enable=LowMemSwitches.lowmem().enabled()) if optimizer == "bop"
              else make_recipe("lowmem", optimizer=optimizer))
    model = build_model(model_name, recipe, in_shape=shape)
    optimizer = build_optimizer(model, recipe)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(8, *shape, generator=generator) * 2 - 1
    y = torch.randint(0, 10, (8,), generator=generator)
    loss = train_step(model, optimizer, x, y)
    return loss, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("optimizer", ["adam", "bop"])
@pytest.mark.parametrize("model_name,shape", [("cnv", (3, 32, 32)), ("mlp", (1, 28, 28))])
def test_a_lowmem_step_is_the_same_with_and_without_the_bit_forward(model_name, shape,
                                                                     optimizer):
    loss_bits, params_bits = lowmem_step(model_name, shape, True, optimizer)
    assert "XNOR-popcount" in kernels.describe()["forward_kernel"]
    loss_float, params_float = lowmem_step(model_name, shape, False, optimizer)
    assert "XNOR-popcount" not in kernels.describe()["forward_kernel"]
    assert loss_bits == loss_float
    assert all(torch.equal(a, b) for a, b in zip(params_bits, params_float))
