"""The `lowmem` block of Wang et al.: what is kept between forward and backward is low-bit.

One `torch.autograd.Function` covers a whole `BinaryBlock` (binary conv/dense, optional
max-pool, L1 batch norm, sign), so that only these tensors survive the forward pass
(each behind its `LowMemSwitches` flag):

- the layer input for dW as packed sign bits (the first layer keeps its real input);
- the batch norm's output as packed sign bits plus per-channel 16-bit sigma1 and mean|y|;
- STE masks as packed bits; max-pool argmax positions as uint8 (0..3 within the window);
- the weight gradient as 1 bit, sgn(dW) / sqrt(N), left on `weight.packed_grad` for the
  optimizer (see `trainers.optim`), never as a full-precision `.grad`.

Activations between blocks are +-1, held as bfloat16 when `fp16_grads` is on, so autograd
hands each block 16-bit output gradients and expects 16-bit input gradients back.
Large tensors are processed in chunks of samples, so that fp32 temporaries stay small
beside what the standard method keeps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainers.bits import PackedBits, pack_rows, signs_from_bits, unpack_rows
from trainers.layers import BinaryBlock, channel_dims, per_channel, sign

# Elements per chunk of fp32 temporaries (4 MiB).
CHUNK_ELEMENTS = 1 << 20
# Power-of-two gradients: 4-bit exponent below the tensor's largest (5 bits with the sign).
PO2_LEVELS = 16


def chunks(rows: int, per_row: int) -> list[tuple[int, int]]:
    size = max(1, CHUNK_ELEMENTS // max(1, per_row))
    return [(s, min(rows, s + size)) for s in range(0, rows, size)]


def pool_positions(indices: torch.Tensor, in_width: int) -> torch.Tensor:
    """max_pool2d(2) flat argmax indices -> position inside the 2x2 window (uint8 0..3)."""
    row, col = indices // in_width, indices % in_width
    return ((row % 2) * 2 + (col % 2)).to(torch.uint8)


def unpool(grad: torch.Tensor, positions: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Route a pooled gradient back to the argmax of each 2x2 window."""
    _, _, ho, wo = grad.shape
    h, w = size
    pos = positions.to(torch.int64)
    rows = torch.arange(ho).view(1, 1, ho, 1) * 2 + pos // 2
    cols = torch.arange(wo).view(1, 1, 1, wo) * 2 + pos % 2
    return F.max_unpool2d(grad, rows * w + cols, kernel_size=2, output_size=(h, w))


def po2_quantize(grad: torch.Tensor, exp_max: float) -> torch.Tensor:
    """Round to sign * 2^e with e in [exp_max - 15, exp_max]; smaller magnitudes become 0."""
    exponent = torch.round(torch.log2(grad.abs())).clamp_(max=exp_max)
    keep = exponent >= exp_max - (PO2_LEVELS - 1)
    return torch.where(keep, torch.sign(grad) * torch.exp2(exponent), 0.0)


def max_exponent(grad: torch.Tensor) -> float:
    peak = max(grad.max().item(), -grad.min().item())
    return math.floor(math.log2(peak) + 0.5) if peak > 0 else 0.0


def layer_forward(layer: nn.Module, x: torch.Tensor, w_sign: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, w_sign)
    return F.conv2d(x, w_sign, None, layer.stride, layer.padding)


class LowMemBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor,
                block: BinaryBlock) -> torch.Tensor:
        spec, sw, layer, bn = block.spec, block.switches, block.layer, block.bn
        save = any(ctx.needs_input_grad)
        n = x.shape[0]
        w_sign = sign(weight).float()
        out_dtype = torch.bfloat16 if sw.fp16_grads and spec.sign_output else torch.float32
        x_rows = chunks(n, x[0].numel())

        # Pass 1: the layer (and a max-pool before batch norm), kept as float16.
        z16 = pool_bn = None
        sums = None
        for s, e in x_rows:
            xc = x[s:e].float()
            if spec.sign_input:
                xc = sign(xc)
            zc = layer_forward(layer, xc, w_sign)
            if spec.pool == "before_bn":
                ctx.bn_pre_size = (zc.shape[2], zc.shape[3])
                zc, idx = F.max_pool2d(zc, 2, return_indices=True)
                if pool_bn is None:
                    pool_bn = torch.empty((n, *zc.shape[1:]), dtype=torch.uint8)
                pool_bn[s:e] = pool_positions(idx, ctx.bn_pre_size[1])
            if z16 is None:
                z16 = torch.empty((n, *zc.shape[1:]), dtype=torch.float16)
                dims = channel_dims(zc)
                sums = torch.zeros(zc.shape[1], dtype=torch.float64)
            z16[s:e] = zc
            sums += zc.sum(dim=dims, dtype=torch.float64)
        count = z16.numel() // z16.shape[1]
        z_rows = chunks(n, z16[0].numel())

        # Pass 2: per-channel statistics (training) or the running ones (evaluation).
        if block.training:
            mu = (sums / count).float()
            dev = torch.zeros_like(sums)
            for s, e in z_rows:
                dev += (z16[s:e].float() - per_channel(mu, z16)).abs().sum(dim=dims,
                                                                             dtype=torch.float64)
            sigma1 = (dev / count).float() + bn.eps
            bn.update_running(mu, sigma1)
        else:
            mu, sigma1 = bn.running_mean.float(), bn.running_sigma1.float()

        # Pass 3: normalise, sign, pool; keep the low-bit state.
        beta32 = beta.float()
        y_bits = xhat = mask = pool_act = None
        abs_y = torch.zeros_like(sums)
        out = None
        for s, e in z_rows:
            yc = (z16[s:e].float() - per_channel(mu, z16)) / per_channel(sigma1, z16)
            yc += per_channel(beta32, yc)
            if save and sw.bn_sign_trick:
                if y_bits is None:
                    y_bits = torch.empty((n, math.ceil(yc[0].numel() / 8)), dtype=torch.uint8)
                y_bits[s:e] = pack_rows(yc >= 0)
                abs_y += yc.abs().sum(dim=dims, dtype=torch.float64)
            elif save:
                if xhat is None:
                    xhat = torch.empty((n, *yc.shape[1:]), dtype=torch.float32)
                xhat[s:e] = yc - per_channel(beta32, yc)
            a = yc
            if spec.sign_output:
                inside = yc.abs() <= 1
                if save:
                    if mask is None:
                        mask = (torch.empty((n, math.ceil(yc[0].numel() / 8)), dtype=torch.uint8)
                                if sw.packed_masks else torch.empty((n, *yc.shape[1:])))
                    mask[s:e] = pack_rows(inside) if sw.packed_masks else inside.float()
                a = sign(yc)
            if spec.pool == "after_act":
                act_width = a.shape[3]
                a, idx = F.max_pool2d(a, 2, return_indices=True)
                if save:
                    if pool_act is None:
                        pool_act = torch.empty((n, *a.shape[1:]), dtype=torch.uint8)
                    pool_act[s:e] = pool_positions(idx, act_width)
                ctx.act_size = (yc.shape[2], act_width)
            if out is None:
                out = torch.empty((n, *a.shape[1:]), dtype=out_dtype)
            out[s:e] = a
        if not save:
            return out

        # What dW needs from the input: the real input (first layer), its packed signs,
        # or the input itself (ablation).
        in_mask = None
        if spec.first:
            x_saved = x
        elif sw.binary_inputs or spec.sign_input:
            x_saved = torch.empty((n, math.ceil(x[0].numel() / 8)), dtype=torch.uint8)
            for s, e in x_rows:
                x_saved[s:e] = pack_rows(x[s:e] >= 0)
        else:
            x_saved = x
        if spec.sign_input:
            in_mask = torch.empty((n, math.ceil(x[0].numel() / 8)), dtype=torch.uint8)
            for s, e in x_rows:
                in_mask[s:e] = pack_rows(x[s:e].abs() <= 1)

        stats = torch.stack([sigma1, (abs_y / count).float()]).to(torch.float16)
        empty = torch.empty(0)
        ctx.save_for_backward(
            x_saved, weight, y_bits if y_bits is not None else empty,
            xhat if xhat is not None else empty, mask if mask is not None else empty,
            pool_bn if pool_bn is not None else empty,
            pool_act if pool_act is not None else empty,
            in_mask if in_mask is not None else empty, stats,
        )
        ctx.block = block
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.z_shape, ctx.y_shape = z16.shape, (n, *z16.shape[1:])
        ctx.x_packed = x_saved.dtype == torch.uint8 and not spec.first
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x_saved, weight, y_bits, xhat, mask, pool_bn, pool_act, in_mask,
         stats) = ctx.saved_tensors
        block = ctx.block
        spec, sw, layer = block.spec, block.switches, block.layer
        sigma1 = stats[0].float()
        mean_abs_y = stats[1].float()
        n = grad_out.shape[0]
        y_shape = ctx.y_shape
        dims = (0,) if len(y_shape) == 2 else (0, 2, 3)
        count = math.prod(y_shape) // y_shape[1]
        exp_max = max_exponent(grad_out) if sw.po2_grads else 0.0
        y_rows = chunks(n, math.prod(y_shape[1:]))

        def grad_y(s: int, e: int) -> torch.Tensor:
            """dL/dy for samples s:e (through po2 rounding, un-pooling and the STE mask)."""
            g = grad_out[s:e].float()
            if sw.po2_grads:
                g = po2_quantize(g, exp_max)
            if spec.pool == "after_act":
                g = unpool(g, pool_act[s:e], ctx.act_size)
            if spec.sign_output:
                m = unpack_rows(mask[s:e], y_shape) if sw.packed_masks else mask[s:e]
                g = g * m
            return g

        def y_sign(s: int, e: int) -> torch.Tensor:
            return signs_from_bits(unpack_rows(y_bits[s:e], y_shape), torch.float32)

        # Pass A: per-channel sums the batch-norm backward needs.
        d_beta = torch.zeros(y_shape[1], dtype=torch.float64)
        sum_g = torch.zeros_like(d_beta)
        sum_gy = torch.zeros_like(d_beta)
        sum_sgn = torch.zeros_like(d_beta)
        for s, e in y_rows:
            dy = grad_y(s, e)
            d_beta += dy.sum(dim=dims, dtype=torch.float64)
            g = dy / per_channel(sigma1, dy)
            sum_g += g.sum(dim=dims, dtype=torch.float64)
            if sw.bn_sign_trick:
                sum_gy += (g * y_sign(s, e)).sum(dim=dims, dtype=torch.float64)
            else:
                sum_gy += (g * xhat[s:e]).sum(dim=dims, dtype=torch.float64)
                sum_sgn += sign(xhat[s:e]).sum(dim=dims, dtype=torch.float64)
        mean_g = (sum_g / count).float()
        mean_gy = (sum_gy / count).float()
        mean_sgn = (sum_sgn / count).float()

        # Pass B: dz per chunk, then dX and dW of the binary layer.
        w_sign = sign(weight).float()
        need_x = ctx.needs_input_grad[0] and not spec.first
        grad_x = torch.empty(ctx.x_shape, dtype=ctx.x_dtype) if need_x else None
        linear = isinstance(layer, nn.Linear)
        d_w = torch.zeros(weight.shape, dtype=torch.float32)
        rows = [(0, n)] if linear else y_rows
        for s, e in rows:
            dy = grad_y(s, e)
            g = dy / per_channel(sigma1, dy)
            if sw.bn_sign_trick:
                dz = g - per_channel(mean_g, g) - y_sign(s, e) * per_channel(
                    mean_abs_y * mean_gy, g)
            else:
                dz = g - per_channel(mean_g, g) - (sign(xhat[s:e]) - per_channel(mean_sgn, g)) * (
                    per_channel(mean_gy, g))
            if spec.pool == "before_bn":
                dz = unpool(dz, pool_bn[s:e], ctx.bn_pre_size)
            x_in = input_chunk(ctx, x_saved, s, e)
            if linear:
                torch.mm(dz.t(), x_in, out=d_w)
            else:
                d_w += torch.nn.grad.conv2d_weight(x_in, weight.shape, dz, layer.stride,
                                                   layer.padding)
            if need_x:
                if linear:
                    dx = dz @ w_sign
                else:
                    dx = torch.nn.grad.conv2d_input((e - s, *ctx.x_shape[1:]), w_sign, dz,
                                                    layer.stride, layer.padding)
                if spec.sign_input:
                    dx = dx * unpack_rows(in_mask[s:e], ctx.x_shape)
                grad_x[s:e] = dx
        if sw.binary_dw:
            scale = 1.0 / math.sqrt(weight.numel())
            weight.packed_grad = PackedBits(pack_rows(d_w >= 0), weight.shape, scale)
            grad_w = None
        else:
            grad_w = d_w.to(weight.dtype)
        return grad_x, grad_w, d_beta.to(block.bn.beta.dtype), None


def input_chunk(ctx, x_saved: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """The layer's input for samples s:e, as fp32 (unpacked from sign bits where packed)."""
    if ctx.x_packed:
        return signs_from_bits(unpack_rows(x_saved[s:e], ctx.x_shape), torch.float32)
    return x_saved[s:e].float()


def low_memory_block(block: BinaryBlock, x: torch.Tensor) -> torch.Tensor:
    return LowMemBlockFunction.apply(x, block.layer.weight, block.bn.beta, block)
