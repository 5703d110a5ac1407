"""The analytical training-memory model of docs/methods.md, and an extended one.

`published_model` is the model exactly as docs/methods.md (and the paper's sheet) states it:

    Total       = Model + Optimiser + Activations                (bits / 8 / 2^20 MiB)
    Model       = sum over weights of b_w + sum over BN channels of b_beta
    Optimiser   = sum over weights of (b_dW + b_m1 [+ b_m2 for Adam]);
                  Bop: no latent weights (their b_w term is 0) and only m1
    Activations = sum over layers of input_elements * batch * b_x
                  + max over layers of input_elements * batch * (b_dA + b_dB)

It counts each layer's input only. `extended_model` counts what the engine really keeps
between forward and backward (docs/methods.md section 1 for `standard`: layer input, batch
norm's normalised output, float STE mask, max-pool input and int64 indices, the fp32 copy
of sgn(W) that the layer's matmul saves; the packed and 16-bit tensors of `lowmem`), at
the parameters' real dtypes, so that a measurement can be compared with both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from trainers.blocks import BinaryBlock
from trainers.layers import L1BatchNorm, weight_shape
from trainers.lowmem import BACKWARD_CHUNK_ELEMENTS, DW_BLOCK_ELEMENTS, product_dtype
from trainers.lowmem_fused import (
    BACKWARD_CHUNKS,
    codes_gradients,
    hands_sign_bits,
    runs_fused,
    sign_columns_rows,
)
from trainers.methods import LowMemSwitches, Recipe
from trainers.models import LayerInfo, layer_inventory
from trainers.real_blocks import RealConvBN

BITS_PER_MIB = 8 * 2**20
PACKED_BITS = 8  # a packed bit row is padded to whole bytes


@dataclass(frozen=True)
class BitWidths:
    """Storage bits per element as the recipe keeps them (docs/methods.md's b_* symbols)."""

    weight: int  # b_w, latent weights (0 with Bop: no latent weights)
    beta: int  # b_beta
    weight_grad: int  # b_dW
    moment: int  # b_m1 (and b_m2)
    moments: int  # 2 for Adam, 1 for SGD with momentum and for Bop
    activation: int  # b_x
    grad_a: int  # b_dA
    grad_b: int  # b_dB


def bit_widths(recipe: Recipe) -> BitWidths:
    """docs/methods.md's bit widths for a recipe: 32 everywhere for `standard`, each lowmem
    switch lowering its own row; Bop keeps one momentum at 32 bits or at its format's width."""
    sw = recipe.switches
    state_bits = 16 if sw.fp16_state else 32
    grad_a = 16 if sw.fp16_grads else 32
    bop = recipe.optimizer == "bop"
    moment = state_bits
    if bop and recipe.momentum_format not in (None, "auto"):
        from trainers.bop.fpformat import FloatFormat

        moment = FloatFormat.parse(recipe.momentum_format).bits
    return BitWidths(
        weight=0 if bop else state_bits,
        beta=state_bits,
        weight_grad=1 if sw.binary_dw else 32,
        moment=moment,
        moments=2 if recipe.optimizer == "adam" else 1,
        activation=1 if sw.binary_inputs else 32,
        grad_a=grad_a,
        grad_b=5 if sw.po2_grads else grad_a,
    )


@dataclass
class LayerRow:
    """One weight layer's share of the published model, in bits."""

    name: str
    kind: str
    input_elements: int
    weights: int
    bn_channels: int
    weight_bits: int
    beta_bits: int
    weight_gradient_bits: int
    moment_bits: int
    saved_activation_bits: int


@dataclass
class MemoryEstimate:
    """Modeled training memory in MiB, with the sub-terms it is made of."""

    label: str  # "published" (docs/methods.md as stated) or "extended" (what the engine keeps)
    model_mib: float
    optimizer_mib: float
    activations_mib: float
    total_mib: float
    terms_mib: dict[str, float]
    layers: list[LayerRow] = field(default_factory=list)
    bits: BitWidths | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        if not self.layers:
            out.pop("layers")
        if self.bits is None:
            out.pop("bits")
        return out


def _mib(bits: float) -> float:
    return bits / BITS_PER_MIB


def _estimate(label: str, terms_bits: dict[str, float], groups: dict[str, tuple[str, ...]],
              **extra) -> MemoryEstimate:
    sums = {key: _mib(sum(terms_bits[t] for t in names)) for key, names in groups.items()}
    return MemoryEstimate(
        label=label,
        model_mib=sums["model"],
        optimizer_mib=sums["optimizer"],
        activations_mib=sums["activations"],
        total_mib=sum(sums.values()),
        terms_mib={name: _mib(bits) for name, bits in terms_bits.items()},
        **extra,
    )


def published_model(inventory: list[LayerInfo], recipe: Recipe, batch_size: int
                    ) -> MemoryEstimate:
    """docs/methods.md's analytical model from a layer inventory (see the module docstring).

    With Bop, real-valued layers (ResNetE-18's first conv, 1x1 shortcuts, dense head)
    keep latent weights under Adam at the method's widths; every other model here has
    binary weights only.
    """
    b = bit_widths(recipe)
    real = replace(b, weight=b.beta, moment=b.beta, moments=2)  # Adam on a real layer
    rows = []
    for layer in inventory:
        w = real if recipe.optimizer == "bop" and not layer.kind.startswith("binary") else b
        rows.append(LayerRow(
            name=layer.name,
            kind=layer.kind,
            input_elements=layer.input_elements,
            weights=layer.weights,
            bn_channels=layer.bn_channels,
            weight_bits=layer.weights * w.weight,
            beta_bits=layer.bn_channels * w.beta,
            weight_gradient_bits=layer.weights * w.weight_grad,
            moment_bits=layer.weights * w.moments * w.moment,
            saved_activation_bits=layer.input_elements * batch_size * w.activation,
        ))
    largest_input = max((layer.input_elements for layer in inventory), default=0)
    terms = {
        "weights": sum(r.weight_bits for r in rows),
        "beta": sum(r.beta_bits for r in rows),
        "weight_gradients": sum(r.weight_gradient_bits for r in rows),
        "moments": sum(r.moment_bits for r in rows),
        "saved_activations": sum(r.saved_activation_bits for r in rows),
        "gradient_buffers": largest_input * batch_size * (b.grad_a + b.grad_b),
    }
    groups = {
        "model": ("weights", "beta"),
        "optimizer": ("weight_gradients", "moments"),
        "activations": ("saved_activations", "gradient_buffers"),
    }
    return _estimate("published", terms, groups, layers=rows, bits=b)


# -- the extended model: what the engine really keeps -------------------------------------
@dataclass
class BlockShape:
    """Per-sample sizes of one `BinaryBlock`, seen by running one sample through it."""

    block: BinaryBlock
    input_elements: int
    layer_output_elements: int  # the conv/dense output, before any pool
    bn_elements: int  # at the batch norm (after a pool before it)
    output_elements: int  # the block's output (after a pool after it)


def block_shapes(model: nn.Module, in_shape: tuple[int, ...]) -> list[BlockShape]:
    """Every binary block's per-sample sizes, in forward order."""
    found: dict[BinaryBlock, dict[str, int]] = {}
    handles = []

    def recorder(block: BinaryBlock, key: str):
        def hook(_module, inputs, output):
            sizes = found.setdefault(block, {})
            if key == "block":
                sizes["input"] = inputs[0][0].numel()
                sizes["output"] = output[0].numel()
            else:
                sizes[key] = (output if key == "layer" else inputs[0])[0].numel()
        return hook

    blocks = [m for m in model.modules() if isinstance(m, BinaryBlock)]
    for block in blocks:
        handles.append(block.register_forward_hook(recorder(block, "block")))
        handles.append(block.layer.register_forward_hook(recorder(block, "layer")))
        handles.append(block.bn.register_forward_hook(recorder(block, "bn")))
    saved = [(block, block.switches) for block in blocks]
    was_training = model.training
    try:
        for block in blocks:  # the per-module path, so that the hooks see every part
            block.switches = LowMemSwitches()
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *in_shape))
    finally:
        model.train(was_training)
        for block, switches in saved:
            block.switches = switches
        for handle in handles:
            handle.remove()
    return [  # `found` fills in forward order
        BlockShape(b, sizes["input"], sizes["layer"], sizes["bn"], sizes["output"])
        for b, sizes in found.items()
    ]


def _packed(elements: int) -> int:
    """Bits per sample of a row of packed bits (padded to whole bytes)."""
    return math.ceil(elements / 8) * PACKED_BITS


def _block_saved_bits(shape: BlockShape, recipe: Recipe, input_bits: int) -> dict[str, int]:
    """Per-sample bits a block keeps for backward (and its per-layer extras, as `per_layer_*`)."""
    block, sw = shape.block, recipe.switches
    spec = block.spec
    lowmem = sw.any
    weights = block.layer.weight.numel()
    channels = block.bn.channels
    kept: dict[str, int] = {}
    if not lowmem:  # docs/methods.md section 1, as autograd keeps it (all fp32)
        kept["layer_inputs"] = shape.input_elements * 32
        if spec.sign_input:
            kept["ste_masks"] = shape.input_elements * 32
        if not spec.first:  # sgn(W), saved by the matmul for dX (the first layer needs no dX)
            kept["per_layer_binarised_weights"] = weights * 32
        if spec.pool == "before_bn":
            kept["pool_state"] = shape.layer_output_elements * 32 + shape.bn_elements * 64
        kept["bn_outputs"] = shape.bn_elements * 32
        kept["per_layer_bn_stats"] = channels * 32
        if spec.sign_output:
            kept["ste_masks"] = kept.get("ste_masks", 0) + shape.bn_elements * 32
        if spec.pool == "after_act":
            kept["pool_state"] = shape.bn_elements * 32 + shape.output_elements * 64
        return kept
    # lowmem (trainers.lowmem.LowMemBlockFunction), switch by switch
    if spec.first:
        kept["layer_inputs"] = shape.input_elements * input_bits
    elif sw.binary_inputs or spec.sign_input:
        kept["layer_inputs"] = _packed(shape.input_elements)
    else:
        kept["layer_inputs"] = shape.input_elements * input_bits
    if spec.sign_input:
        kept["ste_masks"] = _packed(shape.input_elements)
    kept["bn_outputs"] = (_packed(shape.bn_elements) if sw.bn_sign_trick
                          else shape.bn_elements * 32)
    if spec.sign_output:
        masks = _packed(shape.bn_elements) if sw.packed_masks else shape.bn_elements * 32
        kept["ste_masks"] = kept.get("ste_masks", 0) + masks
    if spec.pool == "before_bn":
        kept["pool_state"] = shape.bn_elements * 8  # uint8 argmax position
    if spec.pool == "after_act":
        kept["pool_state"] = shape.output_elements * 8
    kept["per_layer_bn_stats"] = 2 * channels * 16
    return kept


def _output_bits(block: BinaryBlock, recipe: Recipe) -> int:
    lowmem = recipe.switches.any
    return 16 if lowmem and recipe.switches.fp16_grads and block.spec.sign_output else 32


def _dense(shape: BlockShape) -> bool:
    return isinstance(shape.block.layer, nn.Linear)


def _coded_gradients(recipe: Recipe) -> bool:
    """Whether gradients pass between blocks as int8 power-of-two codes."""
    return runs_fused(recipe.switches) and codes_gradients(recipe.switches)


def _standard_pair_bits(shape: BlockShape) -> int:
    """The largest two fp32 gradients a standard block's autograd backward holds at once, per
    sample: each backward step holds its output's gradient and makes its input's (sign and a
    pool after it: block output and layer output; the batch norm: two of its size; a pool
    before it: its size and the layer output; the layer: the layer output and, but for the
    first layer, its input)."""
    spec = shape.block.spec
    pairs = [2 * shape.bn_elements, shape.layer_output_elements + (
        0 if spec.first else shape.input_elements)]
    if spec.pool == "after_act":
        pairs.append(shape.output_elements + shape.layer_output_elements)
    if spec.pool == "before_bn":
        pairs.append(shape.bn_elements + shape.layer_output_elements)
    return max(pairs) * 32


def _backward_scratch_bits(shape: BlockShape, recipe: Recipe, in_grad_bits: int,
                           batch_size: int) -> int:
    """Beside its output gradient, what a block's backward holds: a buffer of its input's
    size (the input gradient, at in_grad_bits; for a standard first block, autograd's scratch
    of that size). A low-memory first block computes no input gradient; a dense one keeps its
    float32 dz for the real-input dW, plus one block of that dW and its signs. A fused conv
    block adds one chunk of samples' dz, unpacked input and dX (16-bit; dz float32 on a
    first layer); with float32 products (`kernels`' "auto" on a CPU without fast int8), dz
    and dX are float32 and dW comes from the input's sign bits through one block of im2col
    columns (`sign_conv_dw`) instead of an unpacked input."""
    first = shape.block.spec.first and recipe.switches.any
    buffer = 0 if first else shape.input_elements * in_grad_bits * batch_size
    if first and _dense(shape):
        return shape.layer_output_elements * 32 * batch_size + DW_BLOCK_ELEMENTS * (32 + 8)
    if runs_fused(recipe.switches) and not _dense(shape):
        per_sample = max(shape.layer_output_elements, shape.input_elements)
        samples = min(batch_size, max(math.ceil(batch_size / BACKWARD_CHUNKS),
                                      BACKWARD_CHUNK_ELEMENTS // per_sample))
        float_products = product_dtype(recipe.switches) == torch.float32
        per_chunk_sample = shape.layer_output_elements * (32 if first or float_products else 16)
        if not first and float_products:
            per_chunk_sample += shape.input_elements * 32
            layer = shape.block.layer
            columns = layer.in_channels * math.prod(layer.kernel_size)
            buffer += sign_columns_rows(columns) * columns * 32
        elif not first:
            per_chunk_sample += shape.input_elements * 16 * 2
        buffer += samples * per_chunk_sample
    return buffer


def _dtype_bits(tensor: torch.Tensor) -> int:
    return tensor.element_size() * 8


def extended_model(model: nn.Module, recipe: Recipe, batch_size: int,
                   in_shape: tuple[int, ...] | None = None) -> MemoryEstimate:
    """What the engine really keeps during a step, at the dtypes it really uses.

    Model: every parameter and buffer (running statistics included) at its dtype.
    Optimiser: weight gradients (fp32/fp16 `.grad`, or packed 1-bit rows) and the
    optimizer's moments for every parameter (batch-norm beta included).
    Activations: per binary block what its backward needs (see `_block_saved_bits`),
    plus real layers' saved inputs and batch norms' outputs (ResNetE-18), plus the
    largest pair of gradient buffers (a block's output and input gradient).
    Chunked fp32 temporaries of the lowmem functions are not modeled; the measurement
    shows them under `temporaries`.
    """
    in_shape = tuple(in_shape or model.in_shape)
    sw = recipe.switches
    lowmem = sw.any
    bop = recipe.optimizer == "bop"
    binary_ids = {id(m.layer.weight) for m in model.modules() if isinstance(m, BinaryBlock)}
    terms: dict[str, float] = dict.fromkeys((
        "parameters", "buffers", "gradients", "moments", "layer_inputs", "bn_outputs",
        "ste_masks", "pool_state", "bn_stats", "binarised_weights", "real_layers",
        "gradient_buffers"), 0)
    terms["parameters"] = sum(p.numel() * _dtype_bits(p) for p in model.parameters())
    terms["buffers"] = sum(t.numel() * _dtype_bits(t) for t in model.buffers())
    shapes_of = {id(m.layer.weight): weight_shape(m.layer) for m in model.modules()
                 if isinstance(m, BinaryBlock)}  # logical, also for packed sign bits
    for p in model.parameters():
        binary = id(p) in binary_ids
        shape = shapes_of.get(id(p), p.shape)
        if binary and sw.binary_dw:
            terms["gradients"] += shape[0] * _packed(shape.numel() // shape[0])
        else:
            terms["gradients"] += p.numel() * (32 if binary and not lowmem else _dtype_bits(p))
        if bop and binary:
            terms["moments"] += shape.numel() * bit_widths(recipe).moment
        else:
            moment_bits = 16 if sw.fp16_state else 32
            moments = 1 if recipe.optimizer == "sgd" else 2
            terms["moments"] += p.numel() * moments * moment_bits
    shapes = block_shapes(model, in_shape)
    in_bits = 32  # the model's input is fp32
    in_grad_bits = 32
    coded = _coded_gradients(recipe)
    largest_pair = 0
    shares_bits = False  # the block below handed over its kept sign bits as this input
    for i, shape in enumerate(shapes):
        kept = _block_saved_bits(shape, recipe, in_bits)
        if shares_bits:
            kept.pop("layer_inputs", None)
        for name, bits in kept.items():
            if name.startswith("per_layer_"):
                terms[name.removeprefix("per_layer_")] += bits
            else:
                terms[name] += bits * batch_size
        out_bits = out_grad_bits = _output_bits(shape.block, recipe)
        above = shapes[i + 1] if i + 1 < len(shapes) else None
        if coded and above is not None and shape.block.feeds_block:
            out_grad_bits = 8  # int8 power-of-two codes between blocks (trainers.lowmem_fused)
        if sw.any:
            pair = (shape.output_elements * out_grad_bits * batch_size
                    + _backward_scratch_bits(shape, recipe, in_grad_bits, batch_size))
        else:
            pair = _standard_pair_bits(shape) * batch_size
        largest_pair = max(largest_pair, pair)
        in_bits, in_grad_bits = out_bits, out_grad_bits
        shares_bits = (runs_fused(sw) and hands_sign_bits(shape.block)
                       and shape.block.spec.pool != "after_act")  # pooled bits are new
    terms["real_layers"] = _real_layer_bits(model, in_shape) * batch_size
    terms["gradient_buffers"] = largest_pair
    groups = {
        "model": ("parameters", "buffers"),
        "optimizer": ("gradients", "moments"),
        "activations": ("layer_inputs", "bn_outputs", "ste_masks", "pool_state", "bn_stats",
                        "binarised_weights", "real_layers", "gradient_buffers"),
    }
    return _estimate("extended", terms, groups)


def _real_layer_bits(model: nn.Module, in_shape: tuple[int, ...]) -> int:
    """Per-sample bits that real-valued layers outside binary blocks save (ResNetE-18): fp32
    conv/dense inputs, L1 batch-norm outputs, ReLU outputs, max-pool input and indices; in a
    low-memory `RealConvBN` stack only the conv's input and its output at 16 bits."""
    inside = {m for b in model.modules() if isinstance(b, BinaryBlock) for m in b.modules()}
    low_stacks = [s for s in model.modules() if isinstance(s, RealConvBN) and s.low_memory]
    recomputed = {m for s in low_stacks for m in list(s)[s.conv_at + 1:]}
    stack_convs = {s.conv for s in low_stacks}
    total = 0
    handles = []

    def hook(module, inputs, output):
        nonlocal total
        x, y = inputs[0][0].numel(), output[0].numel()
        if module in recomputed:
            return
        if module in stack_convs:
            total += x * 32 + y * 16
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            total += x * 32
        elif isinstance(module, (L1BatchNorm, nn.ReLU)):
            total += y * 32
        elif isinstance(module, nn.MaxPool2d):
            total += x * 32 + y * 64

    for m in model.modules():
        if m not in inside and isinstance(m, (nn.Conv2d, nn.Linear, L1BatchNorm, nn.ReLU,
                                               nn.MaxPool2d)):
            handles.append(m.register_forward_hook(hook))
    if not handles:
        return 0
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *in_shape))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def model_memory(model: nn.Module, recipe: Recipe, batch_size: int,
                 in_shape: tuple[int, ...] | None = None) -> dict[str, MemoryEstimate]:
    """Both models for one configuration: {"published": ..., "extended": ...}."""
    in_shape = tuple(in_shape or model.in_shape)
    return {
        "published": published_model(layer_inventory(model, in_shape), recipe, batch_size),
        "extended": extended_model(model, recipe, batch_size, in_shape),
    }


# -- measured against modeled ---------------------------------------------------------------
TOLERANCE = 0.25


@dataclass
class ComparisonRow:
    """One category: measured bytes beside both models, and whether each is within 25 %."""

    category: str
    measured_from: str  # which measured categories make up `measured_mib`
    measured_mib: float
    published_mib: float
    extended_mib: float
    published_within_25pct: bool
    extended_within_25pct: bool


def _within(measured: float, modeled: float) -> bool:
    if modeled == 0:
        return measured == 0
    return abs(measured - modeled) <= TOLERANCE * modeled


def compare_measured(category_max_bytes: dict[str, int], backward_temporaries_max_bytes: int,
                     peak_tensor_bytes: int, estimates: dict[str, MemoryEstimate]
                     ) -> list[ComparisonRow]:
    """Measured per category (maximum over the steps) against both models.

    The models add up everything a step needs at once, so each measured category is taken
    at its own maximum: parameters <-> model; optimizer state + gradients <-> optimiser;
    saved activations <-> the saved part of activations; temporaries made during backward
    that are not in a parameter's shape (activation gradients dX/dY and their scratch) <->
    gradient buffers; the total peak <-> total. Weight-gradient scratch is in the total only.
    """
    published, extended = estimates["published"], estimates["extended"]
    mib = 1 / 2**20
    saved = category_max_bytes["saved_activations"] * mib
    backward = backward_temporaries_max_bytes * mib
    ext_buffers = extended.terms_mib["gradient_buffers"]
    rows = [
        ("model", "parameters", category_max_bytes["parameters"] * mib,
         published.model_mib, extended.model_mib),
        ("optimizer", "optimizer_state + gradients",
         (category_max_bytes["optimizer_state"] + category_max_bytes["gradients"]) * mib,
         published.optimizer_mib, extended.optimizer_mib),
        ("saved_activations", "saved_activations", saved,
         published.terms_mib["saved_activations"], extended.activations_mib - ext_buffers),
        ("gradient_buffers", "activation-gradient temporaries", backward,
         published.terms_mib["gradient_buffers"], ext_buffers),
        ("activations", "saved_activations + activation-gradient temporaries",
         saved + backward,
         published.activations_mib, extended.activations_mib),
        ("total", "peak_tensor_bytes", peak_tensor_bytes * mib,
         published.total_mib, extended.total_mib),
    ]
    return [
        ComparisonRow(name, source, measured, pub, ext, _within(measured, pub),
                      _within(measured, ext))
        for name, source, measured, pub, ext in rows
    ]
