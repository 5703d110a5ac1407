"""The models of docs/methods.md, built from one registry: `build_model(name, recipe, ...)`.

| name | layers | input |
| mlp | dense 784-256-256-256-256-10, L1 BN after each | 28x28x1 |
| cnv | conv3x3 valid 64-64-MP-128-128-MP-256-256, dense 512-512-10 | 32x32x3 |
| binarynet | conv3x3 same 128-128-MP-256-256-MP-512-512-MP, dense 1024-1024-10; MP before BN |
| resnete18 | 7x7/64 real first conv, 16 binary 3x3 convs in residual units, real 1x1
  downsampling convs, dense 512-classes | 224x224x3 (any size for measurement) |

Every binary layer sits in a `BinaryBlock`; the last block has no sign (its batch-norm
output is the logits).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from contract import vocabulary
from contract.errors import UsageError, unknown_choice
from trainers import native
from trainers.blocks import BinaryBlock, BlockSpec
from trainers.layers import (
    BinaryConv2d,
    BinaryLinear,
    L1BatchNorm,
    pack_binary_weights,
    weight_shape,
)
from trainers.methods import LowMemSwitches, Recipe
from trainers.real_blocks import RealConvBN

DEFAULT_INPUT_SHAPES = {
    "mlp": (1, 28, 28),
    "cnv": (3, 32, 32),
    "binarynet": (3, 32, 32),
    "resnete18": (3, 224, 224),
}
MODELS = vocabulary.MODELS  # the keys of DEFAULT_INPUT_SHAPES (a test holds it)


def default_input_shape(name: str) -> tuple[int, int, int]:
    if name not in DEFAULT_INPUT_SHAPES:
        raise unknown_choice("model", name, MODELS)
    return DEFAULT_INPUT_SHAPES[name]


class BlockStack(nn.Sequential):
    """A sequence of blocks, flattening before the first dense block."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__(*modules)
        for block in self:  # a block taken into a new stack (a slice) feeds what this one says
            if isinstance(block, BinaryBlock):
                block.feeds_block = block.feeds_conv_block = False
        for below, above in itertools.pairwise(self):  # each output feeds the next block alone
            if isinstance(below, BinaryBlock):
                below.feeds_block = True
                below.feeds_conv_block = (
                    isinstance(above, BinaryBlock) and not isinstance(above.layer, nn.Linear)
                    and not above.spec.first and not above.spec.sign_input
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self:
            if isinstance(module, BinaryBlock) and isinstance(module.layer, nn.Linear):
                mailbox = getattr(x, "_po2_mailbox", None)  # see trainers.lowmem_fused
                x = x.flatten(1)
                if mailbox is not None:
                    x._po2_mailbox = mailbox
            x = module(x)
        return x


def dense_blocks(widths: list[int], sw: LowMemSwitches, first: bool) -> list[BinaryBlock]:
    blocks = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        last = i == len(widths) - 2
        spec = BlockSpec(first=first and i == 0, sign_output=not last)
        blocks.append(BinaryBlock(BinaryLinear(a, b), spec, sw))
    return blocks


def conv_block(cin: int, cout: int, sw: LowMemSwitches, padding: int, pool: str | None = None,
               first: bool = False) -> BinaryBlock:
    return BinaryBlock(BinaryConv2d(cin, cout, 3, padding=padding), BlockSpec(pool, first=first),
                       sw)


def build_mlp(in_shape, num_classes, sw):
    features = in_shape[0] * in_shape[1] * in_shape[2]
    return BlockStack(*dense_blocks([features, 256, 256, 256, 256, num_classes], sw, first=True))


def conv_output_features(convs: nn.Sequential, in_shape) -> int:
    with torch.no_grad():
        convs.eval()
        out = convs(torch.zeros(1, *in_shape))
        convs.train()
    return out[0].numel()


def build_cnv(in_shape, num_classes, sw):
    c = in_shape[0]
    convs = [
        conv_block(c, 64, sw, 0, first=True),
        conv_block(64, 64, sw, 0, pool="after_act"),
        conv_block(64, 128, sw, 0),
        conv_block(128, 128, sw, 0, pool="after_act"),
        conv_block(128, 256, sw, 0),
        conv_block(256, 256, sw, 0),
    ]
    features = checked_features(BlockStack(*convs), in_shape, "cnv")
    return BlockStack(*convs, *dense_blocks([features, 512, 512, num_classes], sw, first=False))


def build_binarynet(in_shape, num_classes, sw):
    c = in_shape[0]
    convs = [
        conv_block(c, 128, sw, 1, first=True),
        conv_block(128, 128, sw, 1, pool="before_bn"),
        conv_block(128, 256, sw, 1),
        conv_block(256, 256, sw, 1, pool="before_bn"),
        conv_block(256, 512, sw, 1),
        conv_block(512, 512, sw, 1, pool="before_bn"),
    ]
    features = checked_features(BlockStack(*convs), in_shape, "binarynet")
    return BlockStack(*convs, *dense_blocks([features, 1024, 1024, num_classes], sw, first=False))


def checked_features(convs: nn.Sequential, in_shape, name: str) -> int:
    try:
        return conv_output_features(convs, in_shape)
    except RuntimeError as exc:
        raise UsageError(
            f"model {name!r} cannot take input shape {tuple(in_shape)} "
            f"(it needs about {DEFAULT_INPUT_SHAPES[name]})"
        ) from exc


class ResidualUnit(nn.Module):
    """ResNetE unit: y = BN(binconv3x3(sgn(x))) + shortcut(x); real 1x1 conv when downsampling."""

    def __init__(self, cin: int, cout: int, stride: int, sw: LowMemSwitches) -> None:
        super().__init__()
        conv = BinaryConv2d(cin, cout, 3, stride=stride, padding=1)
        self.block = BinaryBlock(conv, BlockSpec(sign_input=True, sign_output=False), sw)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = RealConvBN(
                nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                nn.Conv2d(cin, cout, 1, bias=False),
                L1BatchNorm(cout),
                low_memory=sw.bn_sign_trick,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + self.shortcut(x)


class ResNetE18(nn.Module):
    def __init__(self, in_shape, num_classes: int, sw: LowMemSwitches) -> None:
        super().__init__()
        self.stem = RealConvBN(
            nn.Conv2d(in_shape[0], 64, 7, stride=2, padding=3, bias=False),
            L1BatchNorm(64),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            low_memory=sw.bn_sign_trick,
        )
        units = []
        cin = 64
        for stage, cout in enumerate((64, 128, 256, 512)):
            for i in range(4):  # two basic blocks of two binary convs each
                stride = 2 if stage > 0 and i == 0 else 1
                units.append(ResidualUnit(cin, cout, stride, sw))
                cin = cout
        self.units = nn.Sequential(*units)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.units(self.stem(x)))


BUILDERS: dict[str, Callable] = {
    "mlp": build_mlp,
    "cnv": build_cnv,
    "binarynet": build_binarynet,
    "resnete18": lambda in_shape, k, sw: ResNetE18(in_shape, k, sw),
}


def build_model(name: str, recipe: Recipe, in_shape: tuple[int, int, int] | None = None,
                num_classes: int = 10) -> nn.Module:
    """The named model for a recipe; binary layers' state is float16 when `fp16_state` is on."""
    if name not in BUILDERS:
        raise unknown_choice("model", name, MODELS)
    in_shape = tuple(in_shape or default_input_shape(name))
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise UsageError(f"input shape must be C,H,W with positive sizes, got {in_shape}")
    if num_classes < 2:
        raise UsageError(f"number of classes must be at least 2, got {num_classes}")
    model = BUILDERS[name](in_shape, num_classes, recipe.switches)
    if recipe.switches.any:  # load (or build) the fused kernels now, not inside a measured step
        native.kernels()
    if recipe.switches.fp16_state:
        for block in model.modules():
            if isinstance(block, BinaryBlock):
                block.layer.weight.data = block.layer.weight.data.half()
                block.bn.beta.data = block.bn.beta.data.half()
    if recipe.optimizer == "bop" and recipe.switches.any and recipe.switches.binary_dw:
        pack_binary_weights(model)  # Bop keeps only signs: 1 bit a weight in low-memory mode
    model.in_shape = in_shape
    return model


@dataclass(frozen=True)
class LayerInfo:
    """One weight layer, in forward order, as the analytical memory model counts it."""

    name: str
    kind: str  # "binary_dense", "binary_conv", "real_conv" or "real_dense"
    input_elements: int  # per sample, at the layer's input (after any preceding pool)
    output_elements: int  # per sample, at the layer's output (before any pool)
    weights: int
    bn_channels: int


def layer_inventory(model: nn.Module, in_shape: tuple[int, int, int] | None = None
                    ) -> list[LayerInfo]:
    """Walk one sample through the model and record every weight layer's sizes."""
    in_shape = tuple(in_shape or model.in_shape)
    bn_of = {}
    for m in model.modules():
        if isinstance(m, BinaryBlock):
            bn_of[m.layer] = m.bn.channels
    for m in model.modules():
        if isinstance(m, nn.Sequential):
            children = list(m)
            for a, b in itertools.pairwise(children):
                if isinstance(a, nn.Conv2d) and isinstance(b, L1BatchNorm):
                    bn_of[a] = b.channels
    records: list[LayerInfo] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, inputs, output):
        binary = isinstance(module, (BinaryLinear, BinaryConv2d))
        dense = isinstance(module, nn.Linear)
        kind = ("binary_" if binary else "real_") + ("dense" if dense else "conv")
        records.append(LayerInfo(names[module], kind, inputs[0][0].numel(), output[0].numel(),
                                 weight_shape(module).numel(), bn_of.get(module, 0)))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), _standard_path(model):
            model(torch.zeros(1, *in_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return records


class _standard_path:
    """Run blocks through their per-layer modules so forward hooks see every layer."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = [m for m in model.modules() if isinstance(m, BinaryBlock)]

    def __enter__(self):
        self.saved = [b.switches for b in self.blocks]
        for b in self.blocks:
            b.switches = LowMemSwitches()

    def __exit__(self, *exc):
        for b, sw in zip(self.blocks, self.saved):
            b.switches = sw
