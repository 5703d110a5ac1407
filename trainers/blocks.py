"""The binary block every model is built of: [sign ->] binary conv/dense -> [pool ->] L1 batch
norm [-> sign] [-> pool], on the standard (autograd) path or the low-memory one.

With any lowmem switch on, the block runs `trainers.lowmem_fused.low_memory_block` (fused
kernels, or the readable reference `trainers.lowmem`); those modules see the block only
through its attributes, so they import nothing from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainers.layers import BinaryConv2d, BinaryLinear, L1BatchNorm, SignSTE
from trainers.lowmem_fused import low_memory_block
from trainers.methods import LowMemSwitches


@dataclass(frozen=True)
class BlockSpec:
    """Where a block's optional parts go (see the model table in docs/methods.md)."""

    pool: str | None = None  # None, "before_bn" (BinaryNet) or "after_act" (CNV)
    sign_input: bool = False  # sign (+STE) applied to the block's input (ResNetE units)
    sign_output: bool = True  # sign (+STE) applied to the batch-norm output
    first: bool = False  # input is real-valued data: kept as is, never binarised


class BinaryBlock(nn.Module):
    """[sign ->] binary conv/dense -> [pool ->] L1 batch norm [-> sign] [-> pool]."""

    def __init__(self, layer: BinaryLinear | BinaryConv2d, spec: BlockSpec,
                 switches: LowMemSwitches) -> None:
        super().__init__()
        self.layer = layer
        self.bn = L1BatchNorm(layer.out_features if isinstance(layer, nn.Linear)
                              else layer.out_channels)
        self.spec = spec
        self.switches = switches
        # True when the output goes to the next block alone (set by models.BlockStack): the
        # fused low-memory path may then hand it its gradient as int8 power-of-two codes.
        self.feeds_block = False
        # ... and that next block is a conv block keeping its +-1 input as packed bits: the
        # fused path may then hand it the output itself as those bits.
        self.feeds_conv_block = False

    def extra_repr(self) -> str:
        return f"spec={self.spec}, lowmem={self.switches.any}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.switches.any:
            return low_memory_block(self, x)
        return self.standard_forward(x)

    def standard_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.sign_input:
            x = SignSTE.apply(x)
        z = self.layer(x)
        if self.spec.pool == "before_bn":
            z = F.max_pool2d(z, 2)
        y = self.bn(z, sign_output=self.spec.sign_output)
        if self.spec.pool == "after_act":
            y = F.max_pool2d(y, 2)
        return y
