"""The optimizers of real-valued training: torch's, and their low-memory variants.

`standard`: torch's Adam (or SGD with momentum), fp32 moments. With `fp16_state` or
`binary_dw` on, `LowMemAdam` / `LowMemSGD`: moments stored as float16, the 1-bit
weight gradients that low-memory blocks leave on `weight.packed_grad` consumed
directly, and every update done in chunks so that no full-size fp32 copy of a
parameter, its gradient or its state exists at any time.

Adam on a 1-bit gradient: Adam's update does not depend on the gradient's scale
(up to eps), so the moments are kept for the unscaled +-1 signs, which float16 holds
well; this equals Adam on sgn(dW)/sqrt(N) with eps scaled by sqrt(N). SGD uses the
scaled value sgn(dW)/sqrt(N) as docs/methods.md states it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainers import native
from trainers.bits import PackedBits, unpack_sign_rows
from trainers.kernels import elementwise_threads
from trainers.methods import Recipe

CHUNK = 1 << 14  # elements per update chunk: fp32 temporaries of 64 KiB each


def gradient_chunks(p: torch.Tensor, unit_signs: bool):
    """Yield (slice, fp32 gradient chunk) over the flattened parameter."""
    packed: PackedBits | None = getattr(p, "packed_grad", None)
    if packed is not None:
        rows = packed.shape[0]
        per_row = p[0].numel()
        step = max(1, CHUNK // per_row)
        scale = 1.0 if unit_signs else packed.scale
        for r in range(0, rows, step):
            r2 = min(rows, r + step)
            signs = unpack_sign_rows(packed.data[r:r2], packed.shape, torch.float32, scale)
            yield slice(r * per_row, r2 * per_row), signs.reshape(-1)
        return
    if p.grad is None:
        return
    flat = p.grad.reshape(-1)
    for s in range(0, flat.numel(), CHUNK):
        yield slice(s, min(flat.numel(), s + CHUNK)), flat[s:s + CHUNK].float()


def gradient_scale(p: torch.Tensor, state: dict) -> float:
    """A per-tensor power of two that the 16-bit moments are kept in units of.

    1-bit gradients are +-1 already (scale 1). Real gradients (the `binary_dw` ablation,
    batch-norm betas) can be far below float16's range, where (1 - beta2) * g^2 underflows;
    Adam's update is invariant to the scale, so the moments are held for g / scale, and
    rescaled (exactly, by a power of two) when the gradient's magnitude drifts by 16x.
    """
    if getattr(p, "packed_grad", None) is not None:
        return 1.0
    peak = max(p.grad.max().item(), -p.grad.min().item())
    old = state["grad_scale"].item()
    if peak <= 0 or not math.isfinite(peak):
        return old or 1.0
    if old and 1 / 16 <= peak / old <= 16:
        return old
    new = 2.0 ** round(math.log2(peak))
    if old:
        state["exp_avg"].mul_(old / new)
        state["exp_avg_sq"].mul_((old / new) ** 2)
    state["grad_scale"].fill_(new)
    return new


class LowMemAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 state_dtype: torch.dtype = torch.float16) -> None:
        if lr <= 0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid betas: {betas}")
        if eps <= 0:
            raise ValueError(f"invalid eps: {eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, state_dtype=state_dtype))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        if native.kernels() is not None:  # one C++ pass per parameter (fused_update)
            self._update()
        else:
            with elementwise_threads():  # short chunked passes: see trainers.kernels
                self._update()
        return loss

    def _update(self) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None and getattr(p, "packed_grad", None) is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros(p.shape, dtype=group["state_dtype"])
                    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=group["state_dtype"])
                    state["grad_scale"] = torch.tensor(0.0)
                scale = gradient_scale(p, state)
                state["step"] += 1
                t = state["step"].item()
                step_size = group["lr"] / (1 - b1**t)
                root_bc2 = math.sqrt(1 - b2**t)
                if fused_update(p, state, scale, b1, b2, step_size, root_bc2, group["eps"]):
                    continue
                flat_p = p.view(-1)
                m_flat, v_flat = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
                for sl, g in gradient_chunks(p, unit_signs=True):
                    if scale != 1.0:
                        g = g.div_(scale)
                    m = m_flat[sl].float().mul_(b1).add_(g, alpha=1 - b1)
                    v = v_flat[sl].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                    m_flat[sl] = m
                    v_flat[sl] = v
                    update = m.div_(v.sqrt_().div_(root_bc2).add_(group["eps"] / scale))
                    flat_p[sl] = flat_p[sl].float().sub_(update, alpha=step_size)
                p.packed_grad = None


def fused_update(p: torch.Tensor, state: dict, scale: float, b1: float, b2: float,
                 step_size: float, root_bc2: float, eps: float) -> bool:
    """LowMemAdam's update of one parameter in one C++ pass (`trainers.native`), the same
    arithmetic as the chunked loop; False when the kernels are unavailable."""
    ext = native.kernels()
    if ext is None or not p.is_contiguous():
        return False
    packed: PackedBits | None = getattr(p, "packed_grad", None)
    empty = torch.empty(0)
    if packed is not None:
        bits, per_row, grad = packed.data, p[0].numel() if p.dim() > 1 else p.numel(), empty
    else:
        bits, per_row, grad = empty.to(torch.uint8), 1, p.grad.contiguous()
    ext.adam_update(p.data, state["exp_avg"], state["exp_avg_sq"], bits, per_row, grad, scale,
                    b1, b2, step_size, root_bc2, eps / scale)
    p.packed_grad = None
    return True


class LowMemSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9,
                 state_dtype: torch.dtype = torch.float16) -> None:
        if lr <= 0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"invalid momentum: {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, state_dtype=state_dtype))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None and getattr(p, "packed_grad", None) is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros(p.shape, dtype=group["state_dtype"])
                buf_flat, flat_p = state["momentum_buffer"].view(-1), p.view(-1)
                for sl, g in gradient_chunks(p, unit_signs=False):
                    buf = buf_flat[sl].float().mul_(group["momentum"]).add_(g)
                    buf_flat[sl] = buf
                    flat_p[sl] = flat_p[sl].float().sub_(buf, alpha=group["lr"])
                p.packed_grad = None
        return loss


def real_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's Adam or SGD (low-memory where the switches say) over all of the model's
    parameters: every optimizer but Bop, which uses it for its real-valued parameters."""
    if recipe.optimizer == "bop":
        raise ValueError("real_optimizer: Bop is built by trainers.optim.build_optimizer")
    sw = recipe.switches
    params = list(model.parameters())
    if sw.fp16_state or sw.binary_dw:
        dtype = torch.float16 if sw.fp16_state else torch.float32
        if recipe.optimizer == "sgd":
            return LowMemSGD(params, lr=recipe.lr, state_dtype=dtype)
        return LowMemAdam(params, lr=recipe.lr, state_dtype=dtype)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=0.9)
    return torch.optim.Adam(params, lr=recipe.lr)
