"""Real-valued conv -> L1 batch norm [-> ReLU] [-> max-pool] stacks (ResNetE-18's stem and
downsampling shortcuts), with a low-memory training path.

Through autograd, such a stack saves the conv output, the normalised output, the ReLU output
and the pool's indices in float32 and builds several full-size float32 temporaries in
backward: at ResNetE-18's stem (64 x 112 x 112 a sample) that is most of the training peak.
The low-memory path keeps only the batch norm's input at float16, and recomputes the rest
from it (ReLU mask and pool argmax included) chunk by chunk in backward. It is the
`bn_sign_trick` switch's counterpart for real-valued layers: batch norm keeps 16-bit state.
Numerics: everything derives from the float16 conv output, so the path equals autograd through
the same stack with z rounded to float16 (straight through) to float32 rounding, and differs
from the float32 stack by that rounding: where it moves an activation across the ReLU's zero
or changes a pool's argmax (tests/trainers/test_real_blocks.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainers.layers import L1BatchNorm, sign
from trainers.lowmem import LAYER_CHUNK_ELEMENTS, chunks, layer_elements_per_sample

DIMS = (0, 2, 3)


class RealConvBN(nn.Sequential):
    """[pool ->] conv -> L1 batch norm [-> ReLU] [-> max-pool], indexable like the
    `nn.Sequential` it is (so parameter names stay those of the plain stack).

    `low_memory`: training with gradients runs `ConvBNFunction` (a leading pool still runs
    through autograd: an average pool saves nothing)."""

    def __init__(self, *modules: nn.Module, low_memory: bool = False) -> None:
        super().__init__(*modules)
        kinds = [type(m) for m in modules]
        self.conv_at = kinds.index(nn.Conv2d)
        if kinds[self.conv_at + 1] is not L1BatchNorm:
            raise ValueError("RealConvBN: the conv must be followed by an L1BatchNorm")
        tail = kinds[self.conv_at + 2:]
        if tail not in ([], [nn.ReLU], [nn.ReLU, nn.MaxPool2d]):
            raise ValueError(f"RealConvBN: unsupported layers after the batch norm: {tail}")
        self.low_memory = low_memory

    def __getitem__(self, index):
        """A slice is a plain `nn.Sequential` (it need not hold a conv and batch norm)."""
        if isinstance(index, slice):
            return nn.Sequential(*list(self)[index])
        return super().__getitem__(index)

    @property
    def conv(self) -> nn.Conv2d:
        return self[self.conv_at]

    @property
    def bn(self) -> L1BatchNorm:
        return self[self.conv_at + 1]

    @property
    def relu(self) -> bool:
        return len(self) > self.conv_at + 2

    @property
    def pool(self) -> nn.MaxPool2d | None:
        return self[self.conv_at + 3] if len(self) > self.conv_at + 3 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.low_memory and self.training and torch.is_grad_enabled()):
            return super().forward(x)
        for module in list(self)[:self.conv_at]:
            x = module(x)
        return ConvBNFunction.apply(x, self.conv.weight, self.bn.beta, self)


class ConvBNFunction(torch.autograd.Function):
    """The stack's training forward keeping z = conv(x) at float16; backward recomputes the
    normalised output, the ReLU mask and the pool's argmax from it, chunk by chunk, in two
    passes (the batch norm's per-channel sums, then dZ and the conv's gradients)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor,
                stack: RealConvBN) -> torch.Tensor:
        conv, bn = stack.conv, stack.bn
        geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)
        n = x.shape[0]
        spans = chunks(n, layer_elements_per_sample(conv, tuple(x.shape[1:]), int8=False),
                       LAYER_CHUNK_ELEMENTS)
        z16 = sums = None
        with torch.no_grad():
            w = weight.to(x.dtype)
            for s, e in spans:
                zc = F.conv2d(x[s:e], w, None, *geometry)
                if z16 is None:
                    z16 = torch.empty((n, *zc.shape[1:]), dtype=torch.float16)
                    sums = torch.zeros(zc.shape[1], dtype=torch.float64)
                z16[s:e] = zc
                sums += z16[s:e].sum(DIMS, dtype=torch.float64)  # statistics of what is kept
            count = z16.numel() // z16.shape[1]
            mu = (sums / count).float()
            abs_sum = torch.zeros_like(sums)
            for s, e in spans:
                abs_sum += (z16[s:e].float() - mu.view(1, -1, 1, 1)).abs().sum(
                    DIMS, dtype=torch.float64)
            sigma1 = (abs_sum / count).float() + bn.eps
            bn.update_running(mu, sigma1)
            out = None
            for s, e in spans:
                yc = _activation(stack, _normalised(z16[s:e], mu, sigma1), beta)[0]
                if out is None:
                    out = torch.empty((n, *yc.shape[1:]), dtype=x.dtype)
                out[s:e] = yc
        ctx.save_for_backward(x, weight, beta, z16, mu, sigma1)
        ctx.stack, ctx.geometry, ctx.spans = stack, geometry, spans
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, beta, z16, mu, sigma1 = ctx.saved_tensors
        stack, geometry, spans = ctx.stack, ctx.geometry, ctx.spans
        channels = z16.shape[1]
        count = z16.numel() // channels
        sums = torch.zeros(3, channels, dtype=torch.float64)  # dY, dY * xhat, sgn(xhat)
        for s, e in spans:
            dy, xhat = _grad_y(stack, z16[s:e], mu, sigma1, beta, grad_out[s:e])
            sums[0] += dy.sum(DIMS, dtype=torch.float64)
            sums[1] += (dy * xhat).sum(DIMS, dtype=torch.float64)
            sums[2] += sign(xhat).sum(DIMS, dtype=torch.float64)
        mean_dy, mean_dy_xhat, mean_s = (v.float().view(1, -1, 1, 1) for v in sums / count)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        w = weight.to(x.dtype)
        for s, e in spans:
            dy, xhat = _grad_y(stack, z16[s:e], mu, sigma1, beta, grad_out[s:e])
            dz = (dy - mean_dy - (sign(xhat) - mean_s) * mean_dy_xhat) / sigma1.view(1, -1, 1, 1)
            if grad_w is not None:
                grad_w += torch.nn.grad.conv2d_weight(x[s:e].float(), weight.shape, dz,
                                                      *geometry)
            if grad_x is not None:
                grad_x[s:e] = torch.nn.grad.conv2d_input(x[s:e].shape, w.float(), dz, *geometry)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_beta = sums[0].to(beta.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_beta, None


def _normalised(z16: torch.Tensor, mu: torch.Tensor, sigma1: torch.Tensor) -> torch.Tensor:
    """xhat of a chunk, from its float16 z."""
    return (z16.float() - mu.view(1, -1, 1, 1)) / sigma1.view(1, -1, 1, 1)


def _activation(stack: RealConvBN, xhat: torch.Tensor, beta: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(output, pre-pool activation, pool argmax) of a chunk, from its xhat."""
    y = xhat + beta.detach().float().view(1, -1, 1, 1)
    if stack.relu:
        y = y.clamp_(min=0)
    pool = stack.pool
    if pool is None:
        return y, y, None
    out, index = F.max_pool2d(y, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                              pool.ceil_mode, return_indices=True)
    return out, y, index


def _grad_y(stack: RealConvBN, z16: torch.Tensor, mu: torch.Tensor, sigma1: torch.Tensor,
            beta: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dy at the batch norm's output, xhat) of a chunk, recomputed from its float16 z."""
    xhat = _normalised(z16, mu, sigma1)
    _, y, index = _activation(stack, xhat, beta)
    grad = grad_out.float()
    pool = stack.pool
    if pool is not None:
        grad = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, y, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
            index)
    if stack.relu:
        grad = grad * (y > 0)
    return grad, xhat
