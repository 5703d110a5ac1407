"""The low-memory block on fused C++ kernels (`trainers.native`): same state, fewer passes.

`trainers.lowmem.LowMemBlockFunction` is the reference: readable PyTorch, chunk by chunk,
three element-wise passes per batch-norm forward and two per backward, each a chain of
ops that write full-size temporaries. This Function keeps exactly the same low-bit state
(packed input signs, packed batch-norm signs and STE masks, uint8 pool positions, 16-bit
sigma1 and mean|y|, 1-bit dW) and the same arithmetic, but each pass is one loop in C++
that writes only what is kept. The products are the reference's (`trainers.kernels`).

Layout: inside the block a tensor is "rows x channels" - a dense layer's (N, C) or a conv
layer's channels-last (N*H*W, C) - so a channel's statistics run along contiguous rows and
the packed bits of a row are that position's channels. A conv block's output is an NCHW
view of channels-last memory, which the next block's int8 im2col reads without a copy.

It runs when the recipe keeps batch-norm signs and packed masks (`bn_sign_trick`,
`packed_masks`, the defaults) and the kernels are built; other ablations use the reference.
Wang et al.'s variants (`wang_bn_trick`, `wang_po2`, `wang_fp16`) run here too, on the same
kernels driven differently from Python (step by step, never the whole-dense C++ block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from trainers import kernels, native
from trainers.bits import PackedBits, pack_rows
from trainers.layers import sign, weight_shape, weight_values
from trainers.lowmem import (
    BACKWARD_CHUNK_ELEMENTS,
    DW_BLOCK_ELEMENTS,
    DW_BLOCK_MIN_ROWS,
    LAYER_CHUNK_ELEMENTS,
    PO2_LEVELS,
    LowMemBlockFunction,
    activation_grad_dtype,
    chunks,
    conv_weight_sign,
    int8_layer_forward,
    layer_elements_per_sample,
    layer_forward,
    max_exponent,
    packed_rows,
    peak_exponent,
    peak_magnitude,
    po2_quantize_clamped,
    pool_positions,
    product_dtype,
)
from trainers.methods import LowMemSwitches
from trainers.phases import phase

if TYPE_CHECKING:  # the block is only named in annotations: no import at run time
    from trainers.blocks import BinaryBlock

# A conv block's backward runs in at most this many chunks of samples (and in chunks of at
# least BACKWARD_CHUNK_ELEMENTS elements): the chunk's dz, unpacked input and dx stay a small
# fraction of the block's full-batch gradients, while each product still sees several
# samples (oneDNN is slow on batches of one or two, and small layers need no chunks).
BACKWARD_CHUNKS = 20
# A hidden dense layer's dW is a 16-bit product: blocks of this many elements (128 KiB), so
# a 256x256 layer is one product while a large one (binarynet's 8192x1024) stays blocked.
HIDDEN_DW_BLOCK_ELEMENTS = 1 << 16
# A dense block's dX = dz sgn(W) makes sgn(W) this many values at a time (2 MiB in bfloat16):
# binarynet's first dense layer (1024 x 8192) in 8 column blocks, the other layers whole.
DX_BLOCK_ELEMENTS = 1 << 20
# A conv layer's 1-bit dW is summed over the batch in float32 blocks of output channels at
# most about this large (4 MiB): binarynet's two largest layers in 2 and 3 blocks, the others
# (and all of cnv's) in one.
CONV_DW_BLOCK_ELEMENTS = 1 << 20
# A conv block's dW from its input's sign bits (`sign_conv_dw`) makes im2col columns this
# many float32 values (2 MiB) at a time: a few hundred rows a product on cnv and binarynet.
SIGN_COLUMNS_ELEMENTS = 1 << 19
EMPTY = torch.empty(0, dtype=torch.uint8)
EMPTY_FLOAT = torch.empty(0)


def runs_fused(sw: LowMemSwitches) -> bool:
    """Whether low-memory blocks with these switches run here (else the reference path)."""
    return sw.bn_sign_trick and sw.packed_masks and native.kernels() is not None


def wang_variant(sw: LowMemSwitches) -> bool:
    return sw.wang_bn_trick or sw.wang_po2 or sw.wang_fp16


def codes_gradients(sw: LowMemSwitches) -> bool:
    """Whether output gradients are rounded to powers of two (ours), so they may pass
    between blocks as int8 codes; `wang_po2` rounds dz inside the block instead."""
    return sw.po2_grads and not sw.wang_po2


def applies(block: BinaryBlock) -> bool:
    return runs_fused(block.switches)


def low_memory_block(block: BinaryBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's low-memory forward: fused where it applies, else the reference."""
    function = FusedBlockFunction if applies(block) else LowMemBlockFunction
    return function.apply(x, block.layer.weight, block.bn.beta, block)


def dw_block_rows(in_features: int, elements: int = DW_BLOCK_ELEMENTS) -> int:
    """Output rows per block of a dense layer's dW or first-layer sgn(W) (see lowmem)."""
    return max(DW_BLOCK_MIN_ROWS, elements // in_features)


def sign_columns_rows(columns: int) -> int:
    """Rows of `sign_conv_dw`'s im2col block for a layer with this many columns."""
    return max(1, SIGN_COLUMNS_ELEMENTS // columns)


def weight_matrix(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sgn(W) in dtype as an (out, K) matrix, K in the channels-last order of the block's
    rows (`kernels.weight_matrix_int8`'s layout, untransposed)."""
    w = weight if weight.dim() == 2 else weight.permute(0, 2, 3, 1)
    return native.kernels().signs(w.contiguous(), dtype).view(w.shape[0], -1)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C) or (N, C, H, W) -> contiguous (rows, C), channels-last for 4-d (a view when the
    tensor is channels-last already)."""
    if t.dim() == 2:
        return t.contiguous()
    return t.permute(0, 2, 3, 1).contiguous().view(-1, t.shape[1])


def nchw(rows: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(n*h*w, C) rows -> the (n, C, h, w) view of the same channels-last memory."""
    return rows.view(n, h, w, rows.shape[1]).permute(0, 3, 1, 2)


def empty_like_map(n: int, c: int, hw: tuple[int, int] | None, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows storage for an (n, c[, h, w]) map and its (n, c[, h, w]) view."""
    if hw is None:
        rows = torch.empty((n, c), dtype=dtype)
        return rows, rows
    rows = torch.empty((n * hw[0] * hw[1], c), dtype=dtype)
    return rows, nchw(rows, n, *hw)


@dataclass
class GradientMailbox:
    """Where the block above leaves this block's output gradient as power-of-two int8 codes
    (with the exponent they count down from), so that between two blocks the activation
    gradient is held in 8 bits, not 16: autograd itself only carries a 2-byte placeholder.
    Only blocks whose output feeds the next block alone (`BinaryBlock.feeds_block`, set by
    `BlockStack`) get one."""

    codes: torch.Tensor | None = None
    exp_max: float = 0.0

    def put(self, codes: torch.Tensor, exp_max: float) -> None:
        self.codes, self.exp_max = codes, exp_max

    def take(self) -> tuple[torch.Tensor, float] | None:
        codes, self.codes = self.codes, None
        return None if codes is None else (codes, self.exp_max)


class FusedBlockFunction(torch.autograd.Function):
    """The fused kernels are single loops, whatever torch's thread count: unlike the reference
    path, this Function leaves the thread count alone (no `elementwise_threads`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor,
                block: BinaryBlock) -> torch.Tensor:
        ctx.whole_dense = (isinstance(block.layer, nn.Linear) and not block.spec.sign_input
                           and not wang_variant(block.switches))
        if ctx.whole_dense:
            out = dense_forward(ctx, x, weight, beta, block)
        else:
            out = fused_forward(ctx, x, weight, beta, block)
        po2 = codes_gradients(block.switches) and any(ctx.needs_input_grad)
        ctx.below = getattr(x, "_po2_mailbox", None) if po2 and ctx.needs_input_grad[0] else None
        ctx.mailbox = None
        if po2 and block.feeds_block:
            ctx.mailbox = out._po2_mailbox = GradientMailbox()
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        codes = ctx.mailbox.take() if ctx.mailbox is not None else None
        if codes is None and ctx.mailbox is not None and grad_out.numel() > 1 and not any(
                grad_out.stride()):
            raise RuntimeError("a low-memory block's gradient was handed down as power-of-two "
                               "codes once already: backward through it twice is not supported")
        if ctx.whole_dense:
            grads = dense_backward(ctx, grad_out, codes)
            return (hand_down(ctx, grads[0]), *grads[1:])
        return fused_backward(ctx, grad_out, codes)  # hands down chunk by chunk itself


def hand_down(ctx, grad_x: torch.Tensor | None) -> torch.Tensor | None:
    """With power-of-two gradients, give the block below its output gradient as int8 codes
    through its mailbox, and autograd a stride-0 placeholder of the right shape and dtype."""
    if ctx.below is None or grad_x is None:
        return grad_x
    exp_max = float(max_exponent(grad_x))
    ctx.below.put(native.kernels().po2_encode(as_rows(grad_x), exp_max, PO2_LEVELS), exp_max)
    return placeholder(grad_x.shape, grad_x.dtype)


def placeholder(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """What autograd carries when the real gradient went through a mailbox: 2 bytes."""
    return torch.zeros((), dtype=dtype).expand(shape)


def conv_dw_blocks(shape: torch.Size) -> list[tuple[int, int]]:
    """Output-channel ranges a conv's 1-bit dW is summed in, so that its float32 sum over the
    batch never exceeds CONV_DW_BLOCK_ELEMENTS (each block recomputes dz: a few blocks only
    for the largest layers)."""
    blocks = math.ceil(shape.numel() / CONV_DW_BLOCK_ELEMENTS)
    size = math.ceil(shape[0] / blocks / 8) * 8
    return [(o, min(o + size, shape[0])) for o in range(0, shape[0], size)]


def hands_sign_bits(block: BinaryBlock) -> bool:
    """Whether the block gives its +-1 output to the next block as packed sign bits (rows x
    channels, as the next block keeps its input) with a stride-0 placeholder for autograd:
    only where the next block is a fused conv block that keeps its input as those bits
    (`BinaryBlock.feeds_conv_block`, set by `BlockStack`) and no hook could read the
    output's values. Between two conv blocks the activation then exists in 1 bit only."""
    return (block.feeds_conv_block and block.spec.sign_output and block.switches.binary_inputs
            and not block._forward_hooks)


def take_sign_bits(x: torch.Tensor) -> torch.Tensor | None:
    """The sign bits the block below handed over with its output placeholder, if any."""
    return getattr(x, "_sign_bits", None)


class CodedGradient:
    """A conv block's dX assembled chunk by chunk straight into int8 power-of-two codes: each
    chunk is coded against its own largest exponent, then all are re-based to the largest of
    all (`po2_rebase`, exact), so no 16-bit dX of the whole batch ever exists."""

    def __init__(self, rows: int, channels: int, rows_per_sample: int) -> None:
        self.codes = torch.empty((rows, channels), dtype=torch.int8)
        self.rows_per_sample = rows_per_sample
        self.chunk_exponents: list[tuple[int, int, float]] = []

    def add(self, s: int, e: int, dx_rows: torch.Tensor) -> None:
        """Codes samples s:e's dX, given as channels-last rows."""
        exp_max = float(max_exponent(dx_rows))
        r0, r1 = s * self.rows_per_sample, e * self.rows_per_sample
        with kernels.all_threads():
            self.codes[r0:r1] = native.kernels().po2_encode(dx_rows, exp_max, PO2_LEVELS)
        self.chunk_exponents.append((r0, r1, exp_max))

    def hand_down(self, mailbox: GradientMailbox) -> None:
        top = max(exp for _, _, exp in self.chunk_exponents)
        for r0, r1, exp_max in self.chunk_exponents:
            if exp_max < top:
                chunk = self.codes[r0:r1]
                native.kernels().po2_rebase(chunk, int(top - exp_max), PO2_LEVELS)
        mailbox.put(self.codes, top)


def dense_forward(ctx, x: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor,
                  block: BinaryBlock) -> torch.Tensor:
    """A dense block in one C++ call (`dense_forward` in the kernels): on a small model the
    per-op overhead of the step-by-step path below costs more than the arithmetic."""
    spec, sw, bn = block.spec, block.switches, block.bn
    save = any(ctx.needs_input_grad)
    pack_input = save and not spec.first and sw.binary_inputs
    x = x.reshape(x.shape[0], -1)
    with phase("lowmem.forward.dense_block"):
        out, x_bits, y_bits, mask, stats = native.kernels().dense_forward(
            x, weight_values(block.layer), beta, bn.running_mean, bn.running_sigma1,
            bn.momentum, bn.eps,
            block.training, save, spec.first, pack_input, spec.sign_output, sw.fp16_grads,
            kernels.int8_enabled(), kernels.bit_forward_enabled() and not spec.first,
            dw_block_rows(x.shape[1]))
    if save:
        ctx.save_for_backward(x_bits if pack_input else x, y_bits, mask, stats)
        ctx.block = block
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.x_packed = pack_input
    return out


def dense_backward(ctx, grad_out: torch.Tensor, codes: tuple[torch.Tensor, float] | None):
    x_saved, y_bits, mask, stats = ctx.saved_tensors
    block = ctx.block
    weight = weight_values(block.layer)
    spec, sw = block.spec, block.switches
    fast = kernels.int8_enabled() and sw.fp16_grads
    cd = kernels.grad_dtype() if fast else torch.float32
    need_x = ctx.needs_input_grad[0] and not spec.first
    with phase("lowmem.backward.dense_block"), kernels.all_threads():
        grad, coded_exp_max = codes if codes is not None else (grad_out, math.nan)
        grad_x, dw, d_beta = native.kernels().dense_backward(
            grad, x_saved, ctx.x_packed, ctx.x_shape[1], weight, y_bits, mask, stats,
            spec.first, need_x, sw.po2_grads, PO2_LEVELS, sw.binary_dw,
            dw_block_rows(ctx.x_shape[1], HIDDEN_DW_BLOCK_ELEMENTS if not spec.first
                          else DW_BLOCK_ELEMENTS), cd, coded_exp_max, DX_BLOCK_ELEMENTS)
    return finish_backward(ctx, grad_x.to(ctx.x_dtype) if need_x else None,
                           dw if sw.binary_dw else None, None if sw.binary_dw else dw, d_beta)


def finish_backward(ctx, grad_x: torch.Tensor | None, packed_dw: torch.Tensor | None,
                    d_w: torch.Tensor | None, d_beta: torch.Tensor):
    """Leave the 1-bit dW on the weight for the optimizer (or return the full one)."""
    # The module's parameter, not a saved tensor: under saved-tensor hooks (trainers.measure's
    # ledger) a saved tensor may come back as another object, and the 1-bit dW would be lost.
    parameter = ctx.block.layer.weight
    if packed_dw is not None:
        shape = weight_shape(ctx.block.layer)  # also when the parameter is packed bits
        parameter.packed_grad = PackedBits(packed_dw, shape, 1.0 / math.sqrt(shape.numel()))
        grad_w = None
    else:
        grad_w = d_w.to(parameter.dtype)
    return grad_x, grad_w, d_beta.to(ctx.block.bn.beta.dtype), None


def conv_weight_bits(weight: torch.Tensor) -> torch.Tensor:
    """sgn(W) of a conv layer as packed bits per tap, (out, kh*kw*ceil(C/8)) in (kh, kw)
    order: `kernels.bit_conv`'s right operand."""
    o, c, kh, kw = weight.shape
    w = weight.permute(0, 2, 3, 1).reshape(o * kh * kw, c)
    _, bits, _ = native.kernels().sign_pack(w.contiguous(), True, False)
    return bits.view(o, kh * kw * bits.shape[1])


def layer_rows(ctx, x: torch.Tensor, weight: torch.Tensor, block: BinaryBlock, save: bool):
    """The binary layer (and a max-pool before batch norm) into float16 rows, with the
    per-channel sums; packs the input's sign bits (and STE mask) on the way. A hidden conv
    layer runs XNOR-popcount on those bits (`kernels.bit_conv`) where it is switched on."""
    ext = native.kernels()
    spec, sw, layer = block.spec, block.switches, block.layer
    conv = not isinstance(layer, nn.Linear)
    n = x.shape[0]
    on_bits = conv and not spec.first and kernels.bit_forward_enabled()
    fast = kernels.int8_enabled() and not spec.first and not on_bits
    signed = fast or on_bits  # the input is read as signs (int8 or bits)
    pack_input = save and not spec.first and (sw.binary_inputs or spec.sign_input)
    want_mask = save and spec.sign_input
    handed = take_sign_bits(x)  # the input exists only as these bits (see hands_sign_bits)
    x_rows = as_rows(x) if (signed or want_mask) and handed is None else None
    in_rows_per_sample = (math.prod(x.shape[2:]) if handed is not None
                          else x_rows.shape[0] // n if x_rows is not None else 1)
    per_sample = layer_elements_per_sample(layer, tuple(x.shape[1:]), fast)
    if fast:
        w_mat = weight_matrix(weight, torch.int8).t()
    w_bits = conv_weight_bits(weight) if on_bits else None
    conv_sign = conv_weight_sign(layer, weight) if conv and not signed else None
    x_bits = (handed if handed is not None and pack_input
              else packed_rows(x_rows.shape[0], x_rows.shape[1]) if pack_input and signed
              else None)
    in_mask = packed_rows(x_rows.shape[0], x_rows.shape[1]) if want_mask else None
    z_rows = z_map = pool_bn = pool_map = sums = None
    z_per_sample = 1
    for s, e in chunks(n, per_sample, LAYER_CHUNK_ELEMENTS):
        r0, r1 = s * in_rows_per_sample, e * in_rows_per_sample
        bits = None
        if handed is not None:
            if on_bits:
                bits = handed[r0:r1]
            else:
                x8 = ext.unpack_signs(handed[r0:r1], x.shape[1],
                                      torch.int8 if fast else torch.float32)
        elif signed or want_mask:
            x8, bits, mask = ext.sign_pack(x_rows[r0:r1], x_bits is not None or on_bits,
                                           want_mask)
            if x_bits is not None:
                x_bits[r0:r1] = bits
            if in_mask is not None:
                in_mask[r0:r1] = mask
        if on_bits:
            zc = kernels.bit_conv(bits, (e - s, *x.shape[1:]), w_bits, layer.kernel_size,
                                  layer.stride, layer.padding)
        elif fast:
            x8 = nchw(x8, e - s, *x.shape[2:]) if conv else x8
            zc = int8_layer_forward(layer, x8, w_mat)
        elif conv:  # channels-last in, channels-last out: rows without a transpose
            xc = (nchw(x8, e - s, *x.shape[2:]) if handed is not None
                  else x[s:e].float().contiguous(memory_format=torch.channels_last))
            zc = layer_forward(layer, sign(xc) if spec.sign_input else xc, weight, conv_sign)
        else:
            xc = x[s:e].float()
            with kernels.all_threads():
                zc = ext.dense_sign_forward(sign(xc) if spec.sign_input else xc,
                                            weight.contiguous(), dw_block_rows(xc.shape[1]))
        if spec.pool == "before_bn":
            ctx.pre_pool_hw = tuple(zc.shape[2:])
            zc, idx = F.max_pool2d(zc.float(), 2, return_indices=True)
            if pool_bn is None:
                pool_bn, pool_map = empty_like_map(n, zc.shape[1], zc.shape[2:], torch.uint8)
            pool_map[s:e] = pool_positions(idx, ctx.pre_pool_hw[1])
        if z_rows is None:
            hw = tuple(zc.shape[2:]) if conv else None
            z_rows, z_map = empty_like_map(n, zc.shape[1], hw, torch.float16)
            z_per_sample = z_rows.shape[0] // n
            sums = torch.zeros(zc.shape[1], dtype=torch.float64)
        ext.store_rows(as_rows(zc), z_rows[s * z_per_sample:e * z_per_sample], sums)
    if pack_input and not signed and handed is None:  # first layer never packs; fp32 ablation
        x_rows = as_rows(x)
        _, x_bits, _ = ext.sign_pack(x_rows, True, False)
    return z_rows, z_map, sums, x_bits, in_mask, pool_bn


def fused_forward(ctx, x: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor,
                  block: BinaryBlock) -> torch.Tensor:
    ext = native.kernels()
    spec, sw, bn = block.spec, block.switches, block.bn
    save = any(ctx.needs_input_grad)
    n = x.shape[0]
    out_dtype = activation_grad_dtype(sw) if spec.sign_output else torch.float32
    # the kernels write +-1 as bfloat16 or float32: a float16 output is converted after
    kernel_dtype = torch.bfloat16 if out_dtype == torch.float16 else out_dtype
    with phase("lowmem.forward.layer"):
        z_rows, z_map, sums, x_bits, in_mask, pool_bn = layer_rows(
            ctx, x, weight_values(block.layer), block, save)
    rows, channels = z_rows.shape
    hw = tuple(z_map.shape[2:]) if z_map.dim() == 4 else None

    with phase("lowmem.forward.bn_stats"), kernels.all_threads():
        if block.training:
            mu, sigma1 = ext.bn_statistics(z_rows, sums, bn.eps)
            bn.update_running(mu, sigma1)
        else:
            mu, sigma1 = bn.running_mean.float(), bn.running_sigma1.float()

    with phase("lowmem.forward.bn_apply"), kernels.all_threads():
        y_bits = packed_rows(rows, channels) if save else EMPTY
        mask = packed_rows(rows, channels) if save and spec.sign_output else EMPTY
        stats = (mu.contiguous(), sigma1.contiguous(), beta.float().contiguous())
        hand_over = save and hands_sign_bits(block)
        handed, pool_act = None, EMPTY
        if spec.pool == "after_act":  # pooled from the kept signs: no un-pooled output
            y_bits = y_bits if save else packed_rows(rows, channels)
            abs_y = ext.bn_forward(z_rows, *stats, EMPTY_FLOAT, y_bits, mask, True)
            pooled_hw = (hw[0] // 2, hw[1] // 2)
            out_rows, out = empty_like_map(n, channels, pooled_hw, kernel_dtype)
            if save:
                pool_act, _ = empty_like_map(n, channels, pooled_hw, torch.uint8)
            ext.pool_signs(y_bits, n, *hw, out_rows, pool_act)
            if hand_over:
                _, handed, _ = ext.sign_pack(out_rows, True, False)
                del out_rows
                out = placeholder(out.shape, out_dtype)
            elif kernel_dtype != out_dtype:
                out = out.to(out_dtype)
        elif hand_over:  # the output's sign bits are y_bits: no output values at all
            abs_y = ext.bn_forward(z_rows, *stats, EMPTY_FLOAT, y_bits, mask, True)
            handed, out = y_bits, placeholder(torch.Size([n, channels, *hw]), out_dtype)
        else:
            out_rows, out = empty_like_map(n, channels, hw, kernel_dtype)
            abs_y = ext.bn_forward(z_rows, *stats, out_rows, y_bits, mask, spec.sign_output)
            if kernel_dtype != out_dtype:
                out = out.to(out_dtype)
        if save and sw.wang_bn_trick:  # keep sgn(x_hat) and sum|x_hat| instead (beta = 0)
            y_bits = packed_rows(rows, channels)
            abs_y = ext.bn_forward(z_rows, stats[0], stats[1], torch.zeros(channels),
                                   EMPTY_FLOAT, y_bits, EMPTY, True)
        if handed is not None:
            out._sign_bits = handed
        del z_rows, z_map
    if not save:
        return out

    if spec.first or not (sw.binary_inputs or spec.sign_input):
        x_saved = x
    else:
        x_saved = x_bits
    stats = torch.stack([sigma1, (abs_y / rows).float()]).to(torch.float16)
    ctx.save_for_backward(x_saved, y_bits, mask,
                          pool_bn if pool_bn is not None else EMPTY, pool_act,
                          in_mask if in_mask is not None else EMPTY, stats)
    ctx.block = block
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    ctx.y_hw = hw or (1, 1)
    ctx.out_shape = out.shape
    ctx.x_packed = x_saved is x_bits
    return out


def input_chunk(ctx, x_saved: torch.Tensor, s: int, e: int, dtype: torch.dtype
                ) -> torch.Tensor:
    """The layer's input for samples s:e in dtype, unpacked from sign-bit rows if packed."""
    if not ctx.x_packed:  # channels-last like dz (a first layer's dW: half the time)
        x = x_saved[s:e].to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    if len(ctx.x_shape) == 2:
        return native.kernels().unpack_signs(x_saved[s:e], ctx.x_shape[1], dtype)
    _, c, h, w = ctx.x_shape
    rows = native.kernels().unpack_signs(x_saved[s * h * w:e * h * w], c, dtype)
    return nchw(rows, e - s, h, w)


def fused_backward(ctx, grad_out: torch.Tensor, codes: tuple[torch.Tensor, float] | None):
    ext = native.kernels()
    x_saved, y_bits, mask, pool_bn, pool_act, in_mask, stats = ctx.saved_tensors
    weight = weight_values(ctx.block.layer)
    block = ctx.block
    spec, sw, layer = block.spec, block.switches, block.layer
    sigma1 = stats[0].float().contiguous()
    mean_abs_y = stats[1].float()
    n = grad_out.shape[0]
    rows, channels = y_bits.shape[0], sigma1.shape[0]
    h, w = ctx.y_hw
    po2 = codes_gradients(sw)
    if codes is not None:  # int8 power-of-two codes from the block above
        g_rows, exp_max = codes
        if len(ctx.out_shape) == 4 and g_rows.shape[0] == n:  # a dense block's (n, C*H*W)
            g_rows = as_rows(g_rows.view(ctx.out_shape))
    else:
        exp_max = float(max_exponent(grad_out)) if po2 else 0.0
        g_rows = as_rows(grad_out)
        if g_rows.dtype not in (torch.bfloat16, torch.float32):
            g_rows = g_rows.float()
    cd = product_dtype(sw)
    wd = torch.float32 if spec.first else cd

    with phase("lowmem.backward.bn_sums"), kernels.all_threads():
        d_beta, sum_g, sum_gy, sum_sgn = ext.bn_backward_sums(
            g_rows, pool_act, mask, y_bits, sigma1, h, w, po2, exp_max, PO2_LEVELS)
        slope = (mean_abs_y * (sum_gy / rows).float()).contiguous()
        mean_g = (sum_g / rows).float()
        shift = (mean_g if sw.wang_bn_trick  # Wang et al.'s code: no centring term
                 else mean_g - (sum_sgn / rows).float() * slope).contiguous()
    po2_dz = sw.po2_grads and sw.wang_po2
    dz_exp = 0.0

    def grad_z(s: int, e: int, dtype: torch.dtype, quantize: bool = True) -> torch.Tensor:
        """dL/dz for samples s:e: (e-s, C) rows, or an NCHW view of channels-last rows;
        rounded in float32 to Wang et al.'s powers of two with `wang_po2`."""
        z_hw = ctx.pre_pool_hw if pool_bn.numel() else (h, w)
        rows_dtype = torch.float32 if po2_dz else dtype
        dz_rows = torch.empty(((e - s) * z_hw[0] * z_hw[1], channels), dtype=rows_dtype)
        with kernels.all_threads():  # rows split over the pool (fixed blocks: same result)
            ext.bn_backward_dz(g_rows, pool_act, mask, y_bits, sigma1, shift, slope, h, w,
                               po2, exp_max, PO2_LEVELS, s * h * w, e * h * w, pool_bn, *z_hw,
                               dz_rows)
        if po2_dz and quantize:
            dz_rows = po2_quantize_clamped(dz_rows, dz_exp).to(dtype)
        return dz_rows if len(ctx.x_shape) == 2 else nchw(dz_rows, e - s, *z_hw)

    need_x = ctx.needs_input_grad[0] and not spec.first
    grad_x = None
    packed_dw = d_w = None

    def top_exponent(spans: list[tuple[int, int]]) -> float:
        """Wang's window top: the whole batch's largest |dz| (one more pass over dz)."""
        with phase("lowmem.backward.po2_dz_max"):
            return peak_exponent(max(peak_magnitude(grad_z(s, e, torch.float32, False))
                                     for s, e in spans))

    if isinstance(layer, nn.Linear):
        if po2_dz:
            dz_exp = top_exponent([(0, n)])
        with phase("lowmem.backward.bn_grad"):
            dz = grad_z(0, n, wd)
        with phase("lowmem.backward.dw"):
            x_in = input_chunk(ctx, x_saved, 0, n, wd)
            if sw.binary_dw:
                with kernels.all_threads():
                    packed_dw = ext.dense_sign_dw(dz, x_in, dw_block_rows(x_in.shape[1]))
            else:
                d_w = kernels.matmul(dz.t(), x_in).float()
            del x_in
        if need_x:
            with phase("lowmem.backward.dx"):
                grad_x = kernels.matmul(dz.to(cd), weight_matrix(weight, cd)).to(ctx.x_dtype)
    else:
        _, c_in, h_in, w_in = ctx.x_shape
        coded = CodedGradient(n * h_in * w_in, c_in, h_in * w_in) if (
            need_x and ctx.below is not None) else None
        grad_x = (torch.empty(ctx.x_shape, dtype=ctx.x_dtype,
                              memory_format=torch.channels_last)
                  if need_x and coded is None else None)
        # channels-last like dz: the dX product then converts neither, and dX comes out as
        # channels-last rows that are masked and coded in place (no NCHW copies)
        w_sign = (native.kernels().signs(weight.contiguous(), cd)
                  .contiguous(memory_format=torch.channels_last) if need_x else None)
        per_sample = max(channels * math.prod(ctx.pre_pool_hw if pool_bn.numel() else (h, w)),
                         c_in * h_in * w_in)
        samples = max(math.ceil(n / BACKWARD_CHUNKS), BACKWARD_CHUNK_ELEMENTS // per_sample)
        spans = chunks(n, 1, samples)
        if po2_dz:
            dz_exp = top_exponent(spans)
        out_blocks = conv_dw_blocks(weight.shape) if sw.binary_dw else [(0, weight.shape[0])]
        if sw.binary_dw:
            packed_dw = packed_rows(weight.shape[0], math.prod(weight.shape[1:]))
        on_bits = ctx.x_packed and wd == torch.float32  # dW from the sign bits
        _, kh, kw = weight.shape[1:]
        for o0, o1 in out_blocks:  # dz is recomputed for each block of output channels
            d_w = torch.zeros((o1 - o0, kh * kw * c_in) if on_bits
                              else (o1 - o0, *weight.shape[1:]), dtype=torch.float32)
            for s, e in spans:
                with phase("lowmem.backward.bn_grad"):
                    dz = grad_z(s, e, wd)
                with phase("lowmem.backward.dw"):
                    if on_bits:
                        with kernels.all_threads():
                            ext.sign_conv_dw(x_saved, n, h_in, w_in, c_in, kh, kw,
                                             *layer.stride, *layer.padding,
                                             s * math.prod(dz.shape[2:]), as_rows(dz)[:, o0:o1],
                                             d_w, sign_columns_rows(d_w.shape[1]))
                    else:
                        x_in = input_chunk(ctx, x_saved, s, e, wd)
                        d_w += kernels.conv2d_weight(x_in, d_w.shape, dz[:, o0:o1],
                                                     layer.stride, layer.padding)
                        del x_in
                if need_x and o0 == 0:
                    with phase("lowmem.backward.dx"):
                        dx = as_rows(kernels.conv2d_input((e - s, c_in, h_in, w_in), w_sign,
                                                          dz.to(cd), layer.stride,
                                                          layer.padding))
                        if spec.sign_input:
                            with kernels.all_threads():
                                ext.mask_rows(dx, in_mask[s * h_in * w_in:e * h_in * w_in])
                        if coded is not None:
                            if ctx.x_dtype == torch.float16:  # code what autograd would carry
                                dx = dx.to(torch.float16).float()
                            coded.add(s, e, dx)
                        else:
                            grad_x[s:e] = nchw(dx, e - s, h_in, w_in)
            if on_bits:  # taps-major (o, kh, kw, c) -> the weight's (o, c, kh, kw)
                d_w = d_w.view(o1 - o0, kh, kw, c_in).permute(0, 3, 1, 2).contiguous()
            if sw.binary_dw:
                packed_dw[o0:o1] = pack_rows(d_w >= 0)
        if coded is not None:
            coded.hand_down(ctx.below)
            grad_x = placeholder(ctx.x_shape, ctx.x_dtype)
    return finish_backward(ctx, grad_x, packed_dw, d_w, d_beta)
