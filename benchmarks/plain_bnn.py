"""A plain PyTorch binary network, written the way a PyTorch user would (BinaryNet.pytorch
style), as the benchmarks' independent reference for `standard`: no engine code.

- activations: sign with a straight-through estimator (gradient passed where |x| <= 1),
  an `autograd.Function` that saves its input;
- binary layers: latent float32 weights, sign(W) in the forward (gradient passed where
  |W| <= 1), `F.linear` / `F.conv2d`; latent weights clipped to [-1, 1] after each step;
- torch's own `nn.BatchNorm1d/2d`, `nn.MaxPool2d`, `torch.optim.Adam`, float32 throughout,
  autograd for everything.

The layer shapes are docs/methods.md's models (mlp, cnv, binarynet), so step times and memory are
comparable with the engine's; the batch norm is torch's (mean/variance, affine), not the
engine's L1 batch norm. Usable options a user would reach for: bf16 autocast
(`torch.autocast("cpu", torch.bfloat16)`) and activation checkpointing
(`torch.utils.checkpoint`, one segment per block), see `plain_step`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

PLAIN_MODELS = ("mlp", "cnv", "binarynet")


class SignSTE(torch.autograd.Function):
    """sign(x) forward (torch.sign, as BinaryNet.pytorch); the gradient passes where |x| <= 1."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sign()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class Sign(nn.Module):
    def forward(self, x):
        return SignSTE.apply(x)


class BinarizedLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, SignSTE.apply(self.weight))


class BinarizedConv2d(nn.Conv2d):
    def __init__(self, cin: int, cout: int, padding: int) -> None:
        super().__init__(cin, cout, 3, padding=padding, bias=False)

    def forward(self, x):
        return F.conv2d(x, SignSTE.apply(self.weight), None, self.stride, self.padding)


def _dense(widths: list[int]) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for i in range(len(widths) - 1):
        parts = [BinarizedLinear(widths[i], widths[i + 1]), nn.BatchNorm1d(widths[i + 1])]
        if i < len(widths) - 2:
            parts.append(Sign())
        blocks.append(nn.Sequential(*parts))
    return blocks


def _conv(cin: int, cout: int, padding: int, pool: str | None) -> nn.Module:
    parts: list[nn.Module] = [BinarizedConv2d(cin, cout, padding)]
    if pool == "before_bn":
        parts.append(nn.MaxPool2d(2))
    parts += [nn.BatchNorm2d(cout), Sign()]
    if pool == "after_act":
        parts.append(nn.MaxPool2d(2))
    return nn.Sequential(*parts)


def build_plain(name: str, num_classes: int = 10) -> nn.Sequential:
    """docs/methods.md's model `name` as a plain `nn.Sequential` of blocks (one block per binary
    layer; the flatten is its own entry)."""
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), *_dense([784, 256, 256, 256, 256, num_classes]))
    if name == "cnv":
        convs = [_conv(3, 64, 0, None), _conv(64, 64, 0, "after_act"), _conv(64, 128, 0, None),
                 _conv(128, 128, 0, "after_act"), _conv(128, 256, 0, None),
                 _conv(256, 256, 0, None)]
        return nn.Sequential(*convs, nn.Flatten(), *_dense([256, 512, 512, num_classes]))
    if name == "binarynet":
        convs = [_conv(3, 128, 1, None), _conv(128, 128, 1, "before_bn"),
                 _conv(128, 256, 1, None), _conv(256, 256, 1, "before_bn"),
                 _conv(256, 512, 1, None), _conv(512, 512, 1, "before_bn")]
        return nn.Sequential(*convs, nn.Flatten(), *_dense([8192, 1024, 1024, num_classes]))
    raise ValueError(f"plain model must be one of {PLAIN_MODELS}, got {name!r}")


def binary_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules()
            if isinstance(m, (BinarizedLinear, BinarizedConv2d))]


def _forward(model: nn.Sequential, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    if not checkpointed:
        return model(x)
    for block in model:  # one checkpoint segment per block: only block inputs are kept
        x = checkpoint(block, x, use_reentrant=False) if any(
            p.requires_grad for p in block.parameters()) else block(x)
    return x


def plain_step(model: nn.Sequential, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, bf16: bool = False, checkpointed: bool = False) -> float:
    """One training step: forward (optionally under bf16 autocast and/or checkpointed),
    cross-entropy, backward, Adam, latent weights clipped to [-1, 1]."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = _forward(model, x, checkpointed)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        for w in binary_weights(model):
            w.clamp_(-1.0, 1.0)
    return loss.item()
