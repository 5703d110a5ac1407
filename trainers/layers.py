"""Binary layers of the `standard` method (Courbariaux & Bengio): the pieces
`trainers.blocks.BinaryBlock` is made of.

Every quantiser is one `torch.autograd.Function` with an explicit backward and a
thin module around it. `sign` maps 0 to +1 everywhere. What the standard method's
functions save for backward is fp32, as docs/methods.md section 1 says: the layer input,
the batch norm's normalised output and the STE mask as a float tensor.

A `BinaryBlock` (`trainers.blocks`) is one binary conv/dense layer with its batch
norm, optional max-pool and sign activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainers.bits import pack_rows, unpack_sign_rows


def sign(x: torch.Tensor) -> torch.Tensor:
    """sgn with sgn(0) = +1 (-0 too: -0 + 0 = +0), in x's dtype. For floats as
    copysign(1, x + 0): two vectorised passes, where `torch.where(x >= 0, 1.0, -1.0)` ran
    element by element (20x slower) and a bool-to-float conversion 8x slower."""
    if x.is_floating_point():
        return torch.copysign(torch.ones((), dtype=x.dtype), x + 0.0)
    return torch.where(x >= 0, 1, -1).to(x.dtype)


class SignSTE(torch.autograd.Function):
    """sgn(x) forward; straight-through gradient where |x| <= 1 (float mask saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward((x.abs() <= 1).to(x.dtype))
        return sign(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (mask,) = ctx.saved_tensors
        return grad_out * mask


class BinarizeWeight(torch.autograd.Function):
    """sgn(W) forward; gradient to the latent weight W where |W| <= 1 (clip)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        from trainers import native

        ctx.save_for_backward(w)
        ext = native.kernels() if w.dtype == torch.float32 and w.device.type == "cpu" else None
        return ext.signs(w.contiguous(), torch.float32) if ext is not None else sign(w)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        from trainers import native

        (w,) = ctx.saved_tensors
        ext = (native.kernels() if grad_out.dtype == w.dtype == torch.float32
               and w.device.type == "cpu" else None)
        if ext is not None:  # one pass, no weight-sized mask temporaries
            return ext.ste_weight_grad(grad_out, w)
        return grad_out * (w.abs() <= 1).to(grad_out.dtype)


def glorot_uniform_(weight: torch.Tensor) -> None:
    """Small latent weights (Glorot), so that Adam's steps can flip signs early in training."""
    fan_out = weight.shape[0] * weight[0, 0].numel()
    fan_in = weight[0].numel()
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    nn.init.uniform_(weight, -bound, bound)


class SignActivation(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SignSTE.apply(x)


class BinaryLinear(nn.Linear):
    """Dense layer with binary weights sgn(W) over latent real weights W; no bias."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        glorot_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, BinarizeWeight.apply(weight_values(self)).to(x.dtype))


class BinaryConv2d(nn.Conv2d):
    """2-D convolution with binary weights sgn(W) over latent real weights W; no bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         bias=False)
        glorot_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, BinarizeWeight.apply(weight_values(self)).to(x.dtype), None, self.stride,
                        self.padding)


def channel_dims(x: torch.Tensor) -> tuple[int, ...]:
    """Dimensions a per-channel statistic reduces over: batch (and H x W for conv)."""
    return (0,) if x.dim() == 2 else (0, 2, 3)


def per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a (C,) vector so that it broadcasts against `like` (N, C[, H, W])."""
    return v.view(1, -1) if like.dim() == 2 else v.view(1, -1, 1, 1)


class L1BatchNormFunction(torch.autograd.Function):
    """y = (x - mu) / sigma1 + beta with sigma1 = mean|x - mu| (training statistics).

    Saves the fp32 normalised output; backward is the exact gradient of this forward:
    dX = (1/sigma1) [dY - mean(dY) - (sgn(xhat) - mean(sgn(xhat))) mean(dY xhat)].
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, beta: torch.Tensor, eps: float):
        dims = channel_dims(x)
        mu = x.mean(dim=dims)
        centred = x - per_channel(mu, x)
        sigma1 = centred.abs().mean(dim=dims) + eps
        xhat = centred / per_channel(sigma1, x)
        ctx.save_for_backward(xhat, sigma1)
        return xhat + per_channel(beta.to(x.dtype), x), mu.detach(), sigma1.detach()

    @staticmethod
    def backward(ctx, grad_y, _grad_mu, _grad_sigma):
        xhat, sigma1 = ctx.saved_tensors
        dims = channel_dims(xhat)
        s = sign(xhat)
        term = (s - s.mean(dim=dims, keepdim=True)) * (grad_y * xhat).mean(dim=dims, keepdim=True)
        grad_x = (grad_y - grad_y.mean(dim=dims, keepdim=True) - term) / per_channel(sigma1, xhat)
        return grad_x, grad_y.sum(dim=dims), None


class L1BatchNormSignFunction(torch.autograd.Function):
    """`L1BatchNormFunction` followed by `SignSTE` (or by nothing: `sign_output` False) in the
    compiled kernels' two passes each way (`trainers/csrc/standard_kernels.cpp`): the same
    state (the fp32 normalised output and the fp32 STE mask) and the same formulas, without
    autograd's dozen full-size temporaries; float64 sums."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, beta: torch.Tensor, bn: L1BatchNorm, sign_output: bool):
        from trainers import native

        xhat, out, mask, mu, sigma1 = native.kernels().l1bn_forward(
            x.contiguous(), beta.detach(), bn.eps, sign_output, bn.running_mean,
            bn.running_sigma1, 1 - bn.momentum)  # running statistics updated in place
        ctx.save_for_backward(xhat, mask, sigma1)  # mask: empty without a sign
        ctx.mark_non_differentiable(mu, sigma1)
        return out, mu, sigma1

    @staticmethod
    def backward(ctx, grad_out, _grad_mu, _grad_sigma):
        from trainers import native

        xhat, mask, sigma1 = ctx.saved_tensors
        grad_x, grad_beta = native.kernels().l1bn_backward(
            grad_out.contiguous(), xhat, mask, sigma1)
        return grad_x, grad_beta, None, None


def fused_standard_bn(x: torch.Tensor, bn: L1BatchNorm) -> bool:
    """Whether `standard`'s batch norm (+ sign) runs on the compiled kernels for input x."""
    from trainers import native

    return (x.dtype == torch.float32 and x.device.type == "cpu"
            and bn.running_mean.dtype == torch.float32 and native.kernels() is not None)


class L1BatchNorm(nn.Module):
    """The L1 batch norm of Wang et al.: only beta is learned, running stats with momentum 0.9."""

    def __init__(self, channels: int, momentum: float = 0.9, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels = channels
        self.momentum = momentum
        self.eps = eps
        self.beta = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_sigma1", torch.ones(channels))

    def update_running(self, mu: torch.Tensor, sigma1: torch.Tensor) -> None:
        with torch.no_grad():
            weight = 1 - self.momentum  # running <- momentum * running + (1 - momentum) * new
            self.running_mean.lerp_(mu.to(self.running_mean.dtype), weight)
            self.running_sigma1.lerp_(sigma1.to(self.running_sigma1.dtype), weight)

    def forward(self, x: torch.Tensor, sign_output: bool = False) -> torch.Tensor:
        """y, or sgn(y) through the STE when `sign_output` (one fused step when compiled)."""
        if self.training and fused_standard_bn(x, self):
            return L1BatchNormSignFunction.apply(x, self.beta, self, sign_output)[0]
        if self.training:
            y, mu, sigma1 = L1BatchNormFunction.apply(x, self.beta, self.eps)
            self.update_running(mu, sigma1)
            return SignSTE.apply(y) if sign_output else y
        if sign_output:
            return SignSTE.apply(self.forward(x))
        mean = per_channel(self.running_mean.to(x.dtype), x)
        sigma1 = per_channel(self.running_sigma1.to(x.dtype), x)
        return (x - mean) / sigma1 + per_channel(self.beta.to(x.dtype), x)


def binary_layers(model: nn.Module) -> list[BinaryLinear | BinaryConv2d]:
    return [m for m in model.modules() if isinstance(m, (BinaryLinear, BinaryConv2d))]


def binary_weights(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that are binary weights (Bop's); every other parameter is real-valued."""
    return [m.weight for m in binary_layers(model)]


def weight_shape(layer: BinaryLinear | BinaryConv2d) -> torch.Size:
    """The binary weight's logical shape, also when it is held bit-packed."""
    if isinstance(layer, nn.Linear):
        return torch.Size([layer.out_features, layer.in_features])
    return torch.Size([layer.out_channels, layer.in_channels // layer.groups,
                       *layer.kernel_size])


def is_packed(weight: torch.Tensor) -> bool:
    """A binary weight held as packed sign bits (Bop in low-memory mode)."""
    return weight.dtype == torch.uint8


def weight_values(layer: BinaryLinear | BinaryConv2d) -> torch.Tensor:
    """The layer's weight as values: itself, or its packed signs unpacked to int8 +-1 (one
    byte a weight, for the one layer that runs)."""
    if not is_packed(layer.weight):
        return layer.weight
    shape = weight_shape(layer)
    return unpack_sign_rows(layer.weight.detach(), shape, torch.int8).reshape(shape)


@torch.no_grad()
def pack_binary_weights(model: nn.Module) -> None:
    """Hold every binary weight as packed sign bits (1 bit a weight, rows of output units):
    Bop in low-memory mode keeps no latent weights, only the signs it flips."""
    for layer in binary_layers(model):
        if not is_packed(layer.weight):
            packed = pack_rows(layer.weight.reshape(layer.weight.shape[0], -1) >= 0)
            layer.weight = nn.Parameter(packed, requires_grad=False)


@torch.no_grad()
def clip_binary_weights(model: nn.Module) -> None:
    """Keep latent weights in [-1, 1] after each update (Courbariaux & Bengio)."""
    for w in binary_weights(model):
        if not is_packed(w):  # packed signs are +-1 already
            w.clamp_(-1.0, 1.0)
