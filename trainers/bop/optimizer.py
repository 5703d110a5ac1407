"""Bop (Helwegen et al. 2019): flip binary weights when their gradient momentum is strong enough.

No latent weights: the parameters hold +-1 and the only state is one momentum per weight,
stored in a `FloatFormat` (Yayla & Chen) when one is given, else in float32. A float32 copy of the
momentum exists only inside the update of one chunk of one parameter tensor. Gradients come from
`.grad` or, with the lowmem `binary_dw` switch, from the 1-bit `packed_grad` a layer leaves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain

import torch

from trainers import native
from trainers.bits import PackedBits, pack_rows, signs_from_bits, unpack_rows, unpack_sign_rows
from trainers.bop.fpformat import FloatFormat
from trainers.bop.lost_updates import LayerLostUpdates, LostUpdates, count_lost_updates
from trainers.layers import sign
from trainers.methods import BOP_DEFAULT_GAMMA, BOP_DEFAULT_TAU

DEFAULT_GAMMA = BOP_DEFAULT_GAMMA  # Larq's defaults (trainers.methods)
DEFAULT_TAU = BOP_DEFAULT_TAU
# Elements of one parameter updated at a time: bounds the temporaries of the update and of the
# encoding (float64/int64 while rounding: 128 KiB each), so low-bit momentum saves memory.
CHUNK_ELEMENTS = 1 << 14


@dataclass(frozen=True)
class BopUpdate:
    """Result of one Bop update of a block of weights (all float32)."""

    weight: torch.Tensor
    momentum: torch.Tensor  # as stored (rounded into the format)
    step: torch.Tensor  # gamma * (g - m), the intended change of the momentum
    flipped: torch.Tensor  # bool


def bop_update(
    weight: torch.Tensor,
    momentum: torch.Tensor,
    grad: torch.Tensor,
    gamma: float,
    tau: float,
    momentum_format: FloatFormat | None = None,
) -> BopUpdate:
    """m <- round(m + gamma (g - m)); flip w <- -w where w * m > tau (the rounded m)."""
    step = gamma * (grad - momentum)
    exact = momentum + step
    stored = momentum_format.quantize(exact) if momentum_format else exact
    flipped = weight * stored > tau
    return BopUpdate(torch.where(flipped, -weight, weight), stored, step, flipped)


def kernel_format(fmt: FloatFormat | None) -> tuple[int, int, int, bool, bool]:
    """The format as the compiled `bop_update` takes it (exponent bits 0: float32 momentum)."""
    if fmt is None:
        return 0, 0, 0, True, True
    return fmt.exponent_bits, fmt.mantissa_bits, fmt.bias, fmt.saturate, fmt.subnormals


def parse_momentum_format(value: FloatFormat | str | None) -> FloatFormat | None:
    if value is None or isinstance(value, FloatFormat):
        return value
    return FloatFormat.parse(value)


def format_tag(fmt: FloatFormat | None) -> torch.Tensor:
    """The stored momentum's format as a small integer tensor ((0, 0, 0) for float32).

    A tensor, because torch's `load_state_dict` casts state values (a string would not survive).
    """
    return torch.tensor([fmt.exponent_bits, fmt.mantissa_bits, fmt.bias] if fmt else [0, 0, 0])


def format_of_tag(tag: torch.Tensor) -> FloatFormat | None:
    e_bits, m_bits, bias = (int(v) for v in tag.tolist())
    return FloatFormat(e_bits, m_bits, bias) if e_bits else None


def gradient_of(param: torch.Tensor) -> torch.Tensor | PackedBits | None:
    """The binary weight's gradient: `.grad`, or the 1-bit `packed_grad` of the lowmem layers."""
    if param.grad is not None:
        return param.grad
    return getattr(param, "packed_grad", None)


def grad_rows(grad: torch.Tensor | PackedBits, shape: torch.Size, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 (first dimension) of the gradient, flat float32."""
    if isinstance(grad, PackedBits):
        rows = unpack_rows(grad.data[r0:r1], torch.Size([r1 - r0, *shape[1:]]))
        return signs_from_bits(rows, torch.float32, grad.scale).reshape(-1)
    return grad.reshape(shape[0], -1)[r0:r1].reshape(-1).float()


class Bop(torch.optim.Optimizer):
    """Bop over binary weights; binarises its parameters to +-1 in place when constructed.

    Param-group keys `gamma` and `tau` may be changed between steps (schedules); the key
    `momentum_format` ("E,M,bias" or None for float32) may too: the stored momentum is
    re-encoded at the next step. `last_lost_updates` holds the metric of the latest step.
    """

    def __init__(
        self,
        params: Iterable,
        gamma: float = DEFAULT_GAMMA,
        tau: float = DEFAULT_TAU,
        momentum_format: FloatFormat | str | None = None,
        check_tau: bool = True,
        packed_shapes: dict[int, torch.Size] | None = None,
    ) -> None:
        if not (isinstance(gamma, (int, float)) and 0.0 < gamma <= 1.0):
            raise ValueError(f"Bop gamma must be in (0, 1], got {gamma!r}")
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0.0):
            raise ValueError(f"Bop tau must be finite and >= 0, got {tau!r}")
        fmt = parse_momentum_format(momentum_format)
        if fmt is not None and check_tau and tau > 0:
            fmt.check_threshold(tau)
        defaults = {"gamma": float(gamma), "tau": float(tau),
                    "momentum_format": fmt.spec if fmt else None}
        super().__init__(params, defaults)
        self.last_lost_updates: LostUpdates | None = None
        self._steps = 0
        # id(param) -> logical shape of the weights held as packed sign bits (uint8 rows)
        self._packed_shapes = dict(packed_shapes or {})
        with torch.no_grad():
            for p in self._params():
                if id(p) not in self._packed_shapes:
                    p.copy_(sign(p))

    def _shape(self, param: torch.Tensor) -> torch.Size:
        """The binary weights' logical shape (packed parameters hold rows of bits)."""
        return self._packed_shapes.get(id(param), param.shape)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def momentum(self, param: torch.Tensor) -> torch.Tensor:
        """The momentum of `param`, decoded to float32 (for inspection and tests)."""
        state = self.state[param]
        shape = self._shape(param)
        if "momentum" not in state:
            return torch.zeros(shape, dtype=torch.float32)
        fmt = format_of_tag(state["momentum_format"])
        flat = fmt.decode(state["momentum"], shape.numel()) if fmt else state["momentum"]
        return flat.reshape(shape).clone()

    def state_bytes(self) -> int:
        """Bytes of the stored momentum of all parameters."""
        return sum(
            s["momentum"].numel() * s["momentum"].element_size()
            for s in self.state.values() if "momentum" in s
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._steps += 1
        layers = []
        for index, group in enumerate(self.param_groups):
            fmt = parse_momentum_format(group["momentum_format"])
            names = group.get("param_names") or [
                f"group{index}.{j}" for j in range(len(group["params"]))
            ]
            for name, param in zip(names, group["params"]):
                grad = gradient_of(param)
                if grad is None:
                    continue
                state = self._state_in_format(param, fmt)
                layers.append(
                    self._update(name, param, grad, state, fmt, group["gamma"], group["tau"])
                )
                if isinstance(grad, PackedBits):
                    param.packed_grad = None  # consumed, like a gradient zeroed after the step
        self.last_lost_updates = LostUpdates(self._steps, tuple(layers))
        return loss

    def _state_in_format(self, param: torch.Tensor, fmt: FloatFormat | None) -> dict:
        """The parameter's state, created lazily, re-encoded if the group's format changed."""
        state = self.state[param]
        numel = self._shape(param).numel()
        if "momentum" not in state:
            state["step"] = 0
            state["momentum_format"] = format_tag(fmt)
            state["momentum"] = (
                fmt.empty_storage(numel, param.device) if fmt
                else torch.zeros(numel, dtype=torch.float32, device=param.device)
            )
        elif format_of_tag(state["momentum_format"]) != fmt:
            values = self.momentum(param).reshape(-1)
            state["momentum"] = fmt.encode(values) if fmt else values
            state["momentum_format"] = format_tag(fmt)
        return state

    def _update(self, name, param, grad, state, fmt, gamma, tau) -> LayerLostUpdates:
        """Update one parameter tensor chunk by chunk (chunks of whole rows, 8 rows at a time).

        With the compiled kernels each chunk's momentum is decoded, updated and re-encoded in
        place in one pass (`bop_kernels.cpp`); without them, by `bop_update` and the format's
        vectorised encode/decode (the reference; the two agree bit for bit).
        """
        packed = id(param) in self._packed_shapes
        shape = self._shape(param)
        shape = shape if len(shape) > 1 else torch.Size([1, shape.numel()])
        rows, per_row = shape[0], shape.numel() // shape[0]
        rows_per_chunk = max(8, (CHUNK_ELEMENTS // max(per_row, 1)) // 8 * 8)
        storage, flat = state["momentum"], param.view(-1)
        kernels = native.kernels() if param.device.type == "cpu" else None
        attempted = lost = flips = 0
        for r0 in range(0, rows, rows_per_chunk):
            r1 = min(r0 + rows_per_chunk, rows)
            s, e = r0 * per_row, r1 * per_row
            where = fmt.storage_range(s, e) if fmt else slice(s, e)
            weights = (unpack_sign_rows(param.data[r0:r1], shape, torch.float32).reshape(-1)
                       if packed else flat[s:e].float()).contiguous()
            grads = grad_rows(grad, shape, r0, r1)
            if kernels is not None:
                counts = kernels.bop_update(
                    weights, grads.contiguous(), storage[where],
                    *kernel_format(fmt), gamma, tau,
                )
                new_weights = weights
            else:
                old = fmt.decode(storage[where], e - s) if fmt else storage[where]
                update = bop_update(weights, old, grads, gamma, tau, fmt)
                counts = (*count_lost_updates(old, update.step, update.momentum),
                          int(update.flipped.sum()))
                storage[where] = fmt.encode(update.momentum) if fmt else update.momentum
                new_weights = update.weight
            attempted, lost, flips = attempted + counts[0], lost + counts[1], flips + counts[2]
            if packed:
                param.data[r0:r1] = pack_rows(new_weights.view(r1 - r0, -1) >= 0)
            else:
                flat[s:e] = new_weights.to(param.dtype)
        state["step"] += 1
        return LayerLostUpdates(name, shape.numel(), attempted, lost, flips)

    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, but the encoded momentum keeps its integer container (never cast)."""
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        momenta = {}
        stripped = {}
        for key, value in state_dict["state"].items():
            value = dict(value)
            momenta[key] = value.pop("momentum", None)
            stripped[key] = value
        super().load_state_dict({**state_dict, "state": stripped})
        for key, param in zip(saved_ids, self._params()):
            momentum = momenta.get(key)
            if momentum is None:
                continue
            fmt = format_of_tag(self.state[param]["momentum_format"])
            numel = self._shape(param).numel()
            expected = fmt.empty_storage(numel) if fmt else torch.empty(numel)
            if momentum.numel() != expected.numel() or (fmt and momentum.dtype != expected.dtype):
                raise ValueError(
                    f"Bop state for parameter {key}: momentum of {momentum.numel()} "
                    f"{momentum.dtype} values does not fit format {fmt.spec if fmt else 'fp32'}"
                )
            self.state[param]["momentum"] = momentum.detach().to(param.device).clone()
