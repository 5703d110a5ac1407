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

Speed (`trainers.kernels`): on +-1 inputs the layer runs in int8 with int32 accumulation,
exactly; with 16-bit gradients (`fp16_grads`) the backward's products run in
`kernels.grad_dtype()` (bfloat16), with the saved sign bits unpacked straight into that
dtype, and a dense layer's 1-bit dW is packed block by block of output rows without a
full-size dW. `trainers.phases.phase` ranges name each phase for `trainers.profiling`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from trainers import kernels
from trainers.bits import PackedBits, pack_rows, unpack_rows, unpack_sign_rows
from trainers.layers import channel_dims, per_channel, sign, weight_values
from trainers.phases import phase

if TYPE_CHECKING:  # the block is only named in annotations: no import at run time
    from trainers.blocks import BinaryBlock
    from trainers.methods import LowMemSwitches

# Elements per chunk of fp32 temporaries (4 MiB).
CHUNK_ELEMENTS = 1 << 20
# The backward keeps several chunk temporaries at once beside the 16-bit dX: smaller chunks.
BACKWARD_CHUNK_ELEMENTS = 1 << 18
# The forward's layer pass holds a chunk's output (fp32/int32, twice while it is stored) and
# its int8 im2col columns beside the next block's input and its own float16 z: small chunks
# (1 MiB of output) keep that below the activations, and products of a few thousand rows
# stay efficient.
LAYER_CHUNK_ELEMENTS = 1 << 18
# int8 im2col columns may take this many bytes per chunk element (2 MiB per chunk).
UNFOLD_BYTES_PER_CHUNK_ELEMENT = 8
# Elements per block of a dense layer's dW (or first-layer sgn(W)) before it is packed to
# 1 bit (256 KiB fp32); at least DW_BLOCK_MIN_ROWS output rows per block. 64 KiB blocks made
# the mlp's first layer 13 products of 20 rows each way, ~1 ms of a 6 ms step; at 256 KiB
# (4 products) the tensor peak is unchanged, at 1 MiB it grows 16 %.
DW_BLOCK_ELEMENTS = 1 << 16
DW_BLOCK_MIN_ROWS = 8
# Power-of-two gradients: 4-bit exponent below the tensor's largest (5 bits with the sign).
PO2_LEVELS = 16
# The smallest float32 mantissa field m with 1 + m / 2^23 >= sqrt(2).
SQRT2_MANTISSA = 3474676


def chunks(rows: int, per_row: int, elements: int = CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    size = max(1, elements // max(1, per_row))
    return [(s, min(rows, s + size)) for s in range(0, rows, size)]


def layer_elements_per_sample(layer: nn.Module, in_shape: tuple[int, ...], int8: bool) -> int:
    """What one sample costs in a forward chunk, in elements: the larger of its input, its
    float32 output (a first layer with few input channels has a far larger output) and,
    on the int8 path, its unfolded im2col columns."""
    if isinstance(layer, nn.Linear):
        return max(math.prod(in_shape), layer.out_features)
    ho, wo = kernels.conv_geometry(in_shape[1:], layer.kernel_size, layer.stride, layer.padding)
    out = layer.out_channels * ho * wo
    elements = max(math.prod(in_shape), out)
    if int8:
        elements = max(elements, kernels.unfold_bytes_per_sample(
            in_shape, layer.kernel_size, layer.stride, layer.padding)
            // UNFOLD_BYTES_PER_CHUNK_ELEMENT)
    return elements


def pool_positions(indices: torch.Tensor, in_width: int) -> torch.Tensor:
    """max_pool2d(2) flat argmax indices -> position inside the 2x2 window (uint8 0..3)."""
    row = torch.div(indices, in_width, rounding_mode="floor")
    col = indices.sub_(row * in_width)  # the indices are not needed any more
    return row.remainder_(2).mul_(2).add_(col.remainder_(2)).to(torch.uint8)


def unpool(grad: torch.Tensor, positions: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Route a pooled gradient back to the argmax of each 2x2 window."""
    _, _, ho, wo = grad.shape
    h, w = size
    pos = positions.to(torch.int64)
    rows = torch.arange(ho).view(1, 1, ho, 1) * 2 + pos // 2
    cols = torch.arange(wo).view(1, 1, 1, wo) * 2 + pos % 2
    return F.max_unpool2d(grad, rows * w + cols, kernel_size=2, output_size=(h, w))


def po2_quantize(grad: torch.Tensor, exp_max: float) -> torch.Tensor:
    """Round to sign * 2^e with e = round(log2|g|) in [exp_max - 15, exp_max]; smaller
    magnitudes become 0. Exact, on the float32 bits: |g| = 1.m * 2^E rounds to 2^(E+1) when
    m is at least sqrt(2)'s mantissa (`SQRT2_MANTISSA`), else to 2^E; one float32 copy and
    one int32 scratch at a time, like the float kernels it mirrors."""
    out = torch.empty(grad.shape, dtype=torch.float32).copy_(grad)
    bits = out.view(torch.int32)
    doubling = bits.bitwise_and(0x7FFFFF).ge_(SQRT2_MANTISSA).add_(1)  # 1 or 2
    bits.bitwise_and_(-0x800000)  # clear the mantissa: sign * 2^E
    out.mul_(doubling)
    del doubling
    out.clamp_(-(2.0**exp_max), 2.0**exp_max)
    floor_field = max(0, int(exp_max) - (PO2_LEVELS - 1) + 127) << 23
    drop = bits.bitwise_and(0x7F800000).lt_(floor_field)
    return out.masked_fill_(drop.bool(), 0.0)


def po2_quantize_clamped(grad: torch.Tensor, exp_max: float) -> torch.Tensor:
    """Wang et al.'s rounding of dZ: sign * 2^e with e = round(log2|g|) clamped to
    [exp_max - 16, exp_max - 1] (their 4-bit exponent biased by 8 - R), so nothing below the
    window is lost and the largest magnitudes are halved; exact zeros stay zero (their code
    has no zero code and yields +2^(exp_max - 16) there). Float32 out."""
    out = torch.empty(grad.shape, dtype=torch.float32).copy_(grad)
    zero = out == 0
    bits = out.view(torch.int32)
    doubling = bits.bitwise_and(0x7FFFFF).ge_(SQRT2_MANTISSA).add_(1)  # 1 or 2
    bits.bitwise_and_(-0x800000)  # clear the mantissa: sign * 2^E
    magnitude = out.abs().mul_(doubling).clamp_(2.0 ** (exp_max - PO2_LEVELS),
                                                2.0 ** (exp_max - 1))
    return out.copy_(magnitude.copysign_(out)).masked_fill_(zero, 0.0)


def activation_grad_dtype(sw: LowMemSwitches) -> torch.dtype:
    """The dtype of a sign output and so of the activation gradients between blocks."""
    if not sw.fp16_grads:
        return torch.float32
    return torch.float16 if sw.wang_fp16 else torch.bfloat16


def product_dtype(sw: LowMemSwitches) -> torch.dtype:
    """The backward's products: 16-bit with bfloat16 gradients on the int8 path; float32 on
    float16 gradients, as Wang et al.'s code computes (float16 holds them, float32 sums)."""
    if kernels.int8_enabled() and sw.fp16_grads and not sw.wang_fp16:
        return kernels.grad_dtype()
    return torch.float32


def max_exponent(grad: torch.Tensor) -> float:
    return peak_exponent(peak_magnitude(grad))


def peak_magnitude(grad: torch.Tensor) -> float:
    low, high = torch.stack(torch.aminmax(grad)).tolist() if grad.numel() else (0.0, 0.0)
    return max(high, -low)


def peak_exponent(peak: float) -> float:
    """R = round(log2(peak)), the top of a power-of-two window (0 for an all-zero tensor)."""
    return math.floor(math.log2(peak) + 0.5) if peak > 0 else 0.0


def sign_as(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sgn(W) made in place in a floating dtype wide enough for W (no bool or other copy)."""
    return torch.empty(weight.shape, dtype=dtype).copy_(weight).ge_(0).mul_(2).sub_(1)


def conv_weight_sign(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
    """sgn(W) in fp32 for a conv layer's forward, made once per pass (not per chunk); None
    for a dense layer, whose sgn(W) `layer_forward` makes block by block."""
    return None if isinstance(layer, nn.Linear) else sign_as(weight, torch.float32)


def layer_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                  conv_sign: torch.Tensor | None = None) -> torch.Tensor:
    """The binary layer in fp32 on (real or +-1) input x, with all threads (a product, run
    inside the block's elementwise thread count). A conv layer uses `conv_sign` when given
    (`conv_weight_sign`); a dense layer's sgn(W) is made block by block of output rows, so
    no full-size fp32 copy of W exists."""
    if not isinstance(layer, nn.Linear):
        w_sign = sign_as(weight, torch.float32) if conv_sign is None else conv_sign
        return kernels.conv2d(x, w_sign, layer.stride, layer.padding)
    rows = max(DW_BLOCK_MIN_ROWS, DW_BLOCK_ELEMENTS // weight.shape[1])
    if rows >= weight.shape[0]:
        return kernels.linear(x, sign_as(weight, torch.float32))
    z = torch.empty((x.shape[0], weight.shape[0]), dtype=torch.float32)
    for o in range(0, weight.shape[0], rows):
        z[:, o:o + rows] = kernels.linear(x, sign_as(weight[o:o + rows], torch.float32))
    return z


def int8_layer_forward(layer: nn.Module, x_int8: torch.Tensor, w_mat: torch.Tensor
                       ) -> torch.Tensor:
    """The binary layer on int8 +-1 input, exact, as int32."""
    if isinstance(layer, nn.Linear):
        return kernels.linear_int8(x_int8, w_mat)
    return kernels.conv2d_int8(x_int8, w_mat, layer.kernel_size, layer.stride, layer.padding)


def signs_of(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """True -> +1, False -> -1 in dtype."""
    return mask.to(dtype).mul_(2).sub_(1)


def packed_rows(rows: int, features: int) -> torch.Tensor:
    """Uninitialised packed-bit storage: `rows` rows of `features` bits each."""
    return torch.empty((rows, math.ceil(features / 8)), dtype=torch.uint8)


def packed_rows_like(n: int, t: torch.Tensor) -> torch.Tensor:
    """Uninitialised packed-bit storage for n rows shaped like t's rows."""
    return packed_rows(n, t[0].numel())


def layer_pass(ctx, x: torch.Tensor, weight: torch.Tensor, block: BinaryBlock, fast: bool,
               pack_input: bool):
    """Pass 1: the layer (and a max-pool before batch norm), kept as float16, with the
    per-channel sums; packs the input's sign bits on the way when the int8 path runs."""
    spec, layer = block.spec, block.layer
    n = x.shape[0]
    per_row = layer_elements_per_sample(layer, tuple(x.shape[1:]), fast)
    if fast:
        w_mat = kernels.weight_matrix_int8(weight)
    x_bits = packed_rows_like(n, x) if fast and pack_input else None
    conv_sign = None if fast else conv_weight_sign(layer, weight)
    z16 = pool_bn = sums = dims = None
    for s, e in chunks(n, per_row, LAYER_CHUNK_ELEMENTS):
        if fast:
            positive = x[s:e] >= 0
            if x_bits is not None:
                x_bits[s:e] = pack_rows(positive)
            zc = int8_layer_forward(layer, signs_of(positive, torch.int8), w_mat)
        else:
            xc = x[s:e].float()
            zc = layer_forward(layer, sign(xc) if spec.sign_input else xc, weight, conv_sign)
        if spec.pool == "before_bn":
            ctx.bn_pre_size = (zc.shape[2], zc.shape[3])
            zc, idx = F.max_pool2d(zc.float(), 2, return_indices=True)
            if pool_bn is None:
                pool_bn = torch.empty((n, *zc.shape[1:]), dtype=torch.uint8)
            pool_bn[s:e] = pool_positions(idx, ctx.bn_pre_size[1])
        if z16 is None:
            z16 = torch.empty((n, *zc.shape[1:]), dtype=torch.float16)
            dims = channel_dims(zc)
            sums = torch.zeros(zc.shape[1], dtype=torch.float64)
        z16[s:e] = zc
        sums += zc.sum(dim=dims, dtype=torch.float64)
    return z16, pool_bn, sums, x_bits


class LowMemBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor,
                block: BinaryBlock) -> torch.Tensor:
        with kernels.elementwise_threads():
            return LowMemBlockFunction.run_forward(ctx, x, weight, beta, block)

    @staticmethod
    def run_forward(ctx, x: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor,
                    block: BinaryBlock) -> torch.Tensor:
        spec, sw, bn = block.spec, block.switches, block.bn
        save = any(ctx.needs_input_grad)
        n = x.shape[0]
        out_dtype = activation_grad_dtype(sw) if spec.sign_output else torch.float32
        fast = kernels.int8_enabled() and not spec.first
        pack_input = save and not spec.first and (sw.binary_inputs or spec.sign_input)
        with phase("lowmem.forward.layer"):
            z16, pool_bn, sums, x_bits = layer_pass(ctx, x, weight_values(block.layer), block,
                                                    fast, pack_input)
        count = z16.numel() // z16.shape[1]
        dims = channel_dims(z16)
        z_rows = chunks(n, z16[0].numel())

        # Pass 2: per-channel statistics (training) or the running ones (evaluation).
        with phase("lowmem.forward.bn_stats"):
            if block.training:
                mu = (sums / count).float()
                dev = torch.zeros_like(sums)
                for s, e in z_rows:
                    dev += (z16[s:e].float() - per_channel(mu, z16)).abs().sum(
                        dim=dims, dtype=torch.float64)
                sigma1 = (dev / count).float() + bn.eps
                bn.update_running(mu, sigma1)
            else:
                mu, sigma1 = bn.running_mean.float(), bn.running_sigma1.float()

        # Pass 3: normalise, sign, pool; keep the low-bit state: sgn(y) and mean|y|, or with
        # `wang_bn_trick` sgn(x_hat) and mean|x_hat| (beta added outside).
        beta32 = beta.float()
        keep_y = save and sw.bn_sign_trick and not sw.wang_bn_trick
        keep_xhat = save and sw.bn_sign_trick and sw.wang_bn_trick
        y_bits = xhat = mask = pool_act = None
        abs_y = torch.zeros_like(sums)
        out = None
        with phase("lowmem.forward.bn_apply"):
            for s, e in z_rows:
                yc = z16[s:e].float().sub_(per_channel(mu, z16)).div_(per_channel(sigma1, z16))
                if keep_xhat:
                    if y_bits is None:
                        y_bits = packed_rows_like(n, yc)
                    y_bits[s:e] = pack_rows(yc >= 0)
                    abs_y += yc.abs().sum(dim=dims, dtype=torch.float64)
                yc += per_channel(beta32, yc)
                positive = yc >= 0
                if keep_y:
                    if y_bits is None:
                        y_bits = packed_rows_like(n, yc)
                    y_bits[s:e] = pack_rows(positive)
                elif save and not sw.bn_sign_trick:
                    if xhat is None:
                        xhat = torch.empty((n, *yc.shape[1:]), dtype=torch.float32)
                    xhat[s:e] = yc - per_channel(beta32, yc)
                a = None
                if spec.sign_output:
                    magnitude = yc.abs_()  # y itself is not needed any more
                    if keep_y:
                        abs_y += magnitude.sum(dim=dims, dtype=torch.float64)
                    if save:
                        inside = magnitude <= 1
                        if mask is None:
                            mask = (packed_rows_like(n, yc) if sw.packed_masks
                                    else torch.empty((n, *yc.shape[1:])))
                        mask[s:e] = pack_rows(inside) if sw.packed_masks else inside.float()
                    if spec.pool != "after_act":  # the signs go straight into the output
                        if out is None:
                            out = torch.empty((n, *yc.shape[1:]), dtype=out_dtype)
                        out[s:e].copy_(positive).mul_(2).sub_(1)
                        continue
                    a = signs_of(positive, out_dtype)
                else:
                    if keep_y:
                        abs_y += yc.abs().sum(dim=dims, dtype=torch.float64)
                    a = yc
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
        with phase("lowmem.forward.pack_input"):
            if spec.first or not pack_input:
                x_saved = x
            elif x_bits is not None:
                x_saved = x_bits
            else:
                x_saved = packed_rows_like(n, x)
                for s, e in chunks(n, x[0].numel()):
                    x_saved[s:e] = pack_rows(x[s:e] >= 0)
            if spec.sign_input:
                in_mask = packed_rows_like(n, x)
                for s, e in chunks(n, x[0].numel()):
                    in_mask[s:e] = pack_rows(x[s:e].abs() <= 1)

        stats = torch.stack([sigma1, (abs_y / count).float()]).to(torch.float16)
        empty = torch.empty(0)
        ctx.save_for_backward(
            x_saved, y_bits if y_bits is not None else empty,
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
        with kernels.elementwise_threads():
            return LowMemBlockFunction.run_backward(ctx, grad_out)

    @staticmethod
    def run_backward(ctx, grad_out: torch.Tensor):
        (x_saved, y_bits, xhat, mask, pool_bn, pool_act, in_mask,
         stats) = ctx.saved_tensors
        block = ctx.block
        weight = weight_values(block.layer)  # int8 +-1 when the parameter is packed bits
        spec, sw, layer = block.spec, block.switches, block.layer
        sigma1 = stats[0].float()
        mean_abs_y = stats[1].float()
        n = grad_out.shape[0]
        y_shape = ctx.y_shape
        dims = (0,) if len(y_shape) == 2 else (0, 2, 3)
        count = math.prod(y_shape) // y_shape[1]
        po2_dy = sw.po2_grads and not sw.wang_po2  # ours: dY; Wang's: dZ (see po2_dz below)
        exp_max = max_exponent(grad_out) if po2_dy else 0.0
        # Chunks sized by the largest per-sample tensor a chunk makes: the batch-norm output,
        # its un-pooled gradient (4x when pooling precedes batch norm), or the layer's input.
        unpooled = math.prod(y_shape[1:]) * (4 if spec.pool == "before_bn" else 1)
        y_rows = chunks(n, max(unpooled, math.prod(ctx.x_shape[1:])), BACKWARD_CHUNK_ELEMENTS)
        # Products of the backward: 16-bit when the gradients are 16-bit anyway; dW of the
        # first layer (real input) stays fp32.
        cd = product_dtype(sw)
        wd = torch.float32 if spec.first else cd

        def grad_y(s: int, e: int) -> torch.Tensor:
            """dL/dy for samples s:e (through po2 rounding, un-pooling and the STE mask)."""
            g = grad_out[s:e]
            g = po2_quantize(g, exp_max) if po2_dy else g.to(torch.float32, copy=True)
            if spec.pool == "after_act":
                g = unpool(g, pool_act[s:e], ctx.act_size)
            if spec.sign_output:
                m = unpack_rows(mask[s:e], y_shape) if sw.packed_masks else mask[s:e]
                g.mul_(m)
            return g

        def y_sign(s: int, e: int) -> torch.Tensor:
            return unpack_sign_rows(y_bits[s:e], y_shape, torch.float32)

        # Pass A: per-channel sums the batch-norm backward needs.
        d_beta = torch.zeros(y_shape[1], dtype=torch.float64)
        sum_g = torch.zeros_like(d_beta)
        sum_gy = torch.zeros_like(d_beta)
        sum_sgn = torch.zeros_like(d_beta)
        with phase("lowmem.backward.bn_sums"):
            for s, e in y_rows:
                g = grad_y(s, e)
                d_beta += g.sum(dim=dims, dtype=torch.float64)
                g.div_(per_channel(sigma1, g))
                sum_g += g.sum(dim=dims, dtype=torch.float64)
                if sw.bn_sign_trick:
                    signs = y_sign(s, e)
                    sum_sgn += signs.sum(dim=dims, dtype=torch.float64)
                    sum_gy += signs.mul_(g).sum(dim=dims, dtype=torch.float64)
                else:
                    sum_gy += (g * xhat[s:e]).sum(dim=dims, dtype=torch.float64)
                    sum_sgn += sign(xhat[s:e]).sum(dim=dims, dtype=torch.float64)
        del g  # the last chunk's temporaries must not outlive the pass
        mean_g = (sum_g / count).float()
        mean_gy = (sum_gy / count).float()
        mean_sgn = (sum_sgn / count).float()

        po2_dz = sw.po2_grads and sw.wang_po2
        dz_exp = 0.0

        def grad_z(s: int, e: int, quantize: bool = True) -> torch.Tensor:
            """dL/dz (the binary layer's output) for samples s:e, rounded to Wang et al.'s
            powers of two with `wang_po2`."""
            g = grad_y(s, e)
            g.div_(per_channel(sigma1, g))
            if sw.bn_sign_trick:
                # xhat ~ sgn(y) mean|y| in the exact L1 gradient; the mean(sgn) term keeps
                # sum(dz) = 0 per channel, as the exact gradient has it (sum(xhat) = 0 per
                # channel, while sum(sgn(y)) is not). `wang_bn_trick` (Wang et al.'s code)
                # keeps sgn(xhat) and mean|xhat| instead and has no such term: see
                # docs/methods.md, "Variants".
                scale = mean_abs_y * mean_gy
                shift = mean_g if sw.wang_bn_trick else mean_g - mean_sgn * scale
                dz = g.sub_(per_channel(shift, g)).sub_(y_sign(s, e).mul_(per_channel(scale, g)))
            else:
                dz = g - per_channel(mean_g, g) - (sign(xhat[s:e]) - per_channel(mean_sgn, g)) * (
                    per_channel(mean_gy, g))
            if spec.pool == "before_bn":
                dz = unpool(dz, pool_bn[s:e], ctx.bn_pre_size)
            return po2_quantize_clamped(dz, dz_exp) if po2_dz and quantize else dz

        if po2_dz:  # the window's top is the whole batch's largest |dz|: one more pass
            with phase("lowmem.backward.po2_dz_max"):
                dz_exp = peak_exponent(max(peak_magnitude(grad_z(s, e, quantize=False))
                                           for s, e in y_rows))

        # Pass B: dz per chunk, then dX and dW of the binary layer.
        need_x = ctx.needs_input_grad[0] and not spec.first
        grad_x = torch.empty(ctx.x_shape, dtype=ctx.x_dtype) if need_x else None
        packed_dw = d_w = None
        if isinstance(layer, nn.Linear):
            with phase("lowmem.backward.bn_grad"):
                dz = grad_z(0, n)
            with phase("lowmem.backward.dw"):
                x_in = input_chunk(ctx, x_saved, 0, n, wd)
                dz_w = dz.to(wd)
                dz = dz_w if wd == cd else dz.to(cd)
                if sw.binary_dw:
                    packed_dw = dense_sign_dw(dz_w, x_in)
                else:
                    d_w = kernels.matmul(dz_w.t(), x_in).float()
                del dz_w, x_in
            if need_x:
                with phase("lowmem.backward.dx"):
                    grad_x.copy_(kernels.matmul(dz, sign_as(weight, cd)))
        else:
            d_w = torch.zeros(weight.shape, dtype=torch.float32)
            # channels-last, as the fused path has it (trainers.lowmem_fused): the product
            # then sums in the same order, and the two paths' dX agree to the bit
            w_sign = (sign_as(weight, cd).contiguous(memory_format=torch.channels_last)
                      if need_x else None)
            for s, e in y_rows:
                with phase("lowmem.backward.bn_grad"):
                    dz = grad_z(s, e)
                with phase("lowmem.backward.dw"):
                    x_in = input_chunk(ctx, x_saved, s, e, wd)
                    d_w += kernels.conv2d_weight(x_in, weight.shape, dz.to(wd),
                                                 layer.stride, layer.padding)
                if need_x:
                    with phase("lowmem.backward.dx"):
                        dx = kernels.conv2d_input((e - s, *ctx.x_shape[1:]), w_sign,
                                                  dz.to(cd), layer.stride, layer.padding)
                        if spec.sign_input:
                            dx = dx * unpack_rows(in_mask[s:e], ctx.x_shape)
                        grad_x[s:e] = dx
            if sw.binary_dw:
                packed_dw = pack_rows(d_w >= 0)
        if sw.binary_dw:
            scale = 1.0 / math.sqrt(weight.numel())
            # on the module's parameter: a saved tensor may come back as another object
            # (under saved-tensor hooks such as trainers.measure's ledger)
            block.layer.weight.packed_grad = PackedBits(packed_dw, weight.shape, scale)
            grad_w = None
        else:
            grad_w = d_w.to(weight.dtype)
        return grad_x, grad_w, d_beta.to(block.bn.beta.dtype), None


def dense_sign_dw(dz: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """Packed sgn(dz^T x) computed block by block of output rows: no full-size dW exists.
    The blocks are small products, run with the elementwise thread count (one fork/join
    per block would cost more than it saves)."""
    out_features = dz.shape[1]
    packed = torch.empty((out_features, math.ceil(x_in.shape[1] / 8)), dtype=torch.uint8)
    rows = max(DW_BLOCK_MIN_ROWS, DW_BLOCK_ELEMENTS // x_in.shape[1])
    for o in range(0, out_features, rows):
        o2 = min(out_features, o + rows)
        packed[o:o2] = pack_rows(dz[:, o:o2].t().mm(x_in) >= 0)
    return packed


def input_chunk(ctx, x_saved: torch.Tensor, s: int, e: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The layer's input for samples s:e in dtype (unpacked from sign bits where packed)."""
    if ctx.x_packed:
        return unpack_sign_rows(x_saved[s:e], ctx.x_shape, dtype)
    return x_saved[s:e].to(dtype)

