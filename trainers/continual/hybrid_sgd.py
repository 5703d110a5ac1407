"""SGD over parameters held for real at q_b bits (Vorabbi et al.'s hybrid quantisation).

The paper's on-device phase trains the part above the latent layer with plain SGD (the
authors' code: `tf.keras.optimizers.SGD`, no momentum, after the first experience) and
writes every updated tensor back onto its q_b-bit grid (`my_quantize(W - lr * dW, q_b)`).
Here the optimizer owns that storage: each parameter lives in its state as a
`qstore.QuantisedTensor` (codes, scale, zero point), and the module's parameter holds no
data between steps (an empty tensor). A forward pre-hook dequantises it for the forward
(where the layers quantise again at q_f), `step` applies the update to those values,
quantises the result at q_b and frees the float32 copy. `bits >= 32` is the unquantised
reference: plain float32 SGD, the same update without a grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from trainers.continual.qstore import ROUNDINGS, QuantisedTensor, quantise
from trainers.continual.quant import FULL_PRECISION_BITS, quantise_minmax_


class HybridSGD(torch.optim.Optimizer):
    """SGD without momentum; parameters of groups with `bits` < 32 are held at `bits` bits.

    Group options: `lr`, `bits`, `rounding` ("nearest", the authors' `tf.round`, or
    "stochastic") and `clip` (latent binary weights are kept in [-clip, clip] before they
    are quantised; None for real-valued parameters).
    """

    def __init__(self, params: Iterable[Any], lr: float, bits: int = FULL_PRECISION_BITS,
                 rounding: str = "nearest", seed: int = 0) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
        super().__init__(params, dict(lr=lr, bits=bits, rounding=rounding, clip=None))
        self._generator = torch.Generator().manual_seed(seed)
        for group, p in self._group_params():
            if self._held(group):
                self._store(group, p, p.detach())
                _release(p)

    def _group_params(self) -> Iterator[tuple[dict, nn.Parameter]]:
        for group in self.param_groups:
            for p in group["params"]:
                yield group, p

    @staticmethod
    def _held(group: dict) -> bool:
        return group["bits"] < FULL_PRECISION_BITS

    def _store(self, group: dict, p: nn.Parameter, values: torch.Tensor) -> None:
        q = quantise(values, group["bits"], group["rounding"], self._generator)
        self.state[p].update(codes=q.codes, scale=q.scale, zero_point=q.zero_point,
                             shape=tuple(q.shape), bits=q.bits)

    def stored(self, p: nn.Parameter) -> QuantisedTensor:
        """The q_b-bit tensor that holds parameter `p`."""
        s = self.state[p]
        return QuantisedTensor(s["codes"], torch.Size(s["shape"]), s["bits"], s["scale"],
                               s["zero_point"])

    @property
    def stored_bytes(self) -> int:
        """Bytes of every parameter as held between steps: q_b-bit codes with their scale
        and zero point, or float32 for the reference path (SGD keeps no other state)."""
        return sum(self.stored(p).nbytes if self._held(group) else p.numel() * p.element_size()
                   for group, p in self._group_params())

    def materialise(self, params: Iterable[nn.Parameter] | None = None) -> None:
        """Give held parameters (all, or those in `params`) their float32 values."""
        wanted = None if params is None else {id(p) for p in params}
        for group, p in self._group_params():
            if self._held(group) and (wanted is None or id(p) in wanted):
                p.data = self.stored(p).dequantise()

    def release(self) -> None:
        """Drop the float32 values (and gradients) of held parameters: only codes remain."""
        for group, p in self._group_params():
            if self._held(group):
                _release(p)

    def attach(self, root: nn.Module) -> list:
        """Hooks on every module under `root` that owns a held parameter: dequantise before
        its forward; after a forward without autograd (evaluation) drop the values again.
        Returns the hook handles."""
        held = {id(p) for group, p in self._group_params() if self._held(group)}
        handles = []
        for module in root.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in held]
            if not own:
                continue

            def before(_module, _inputs, own=own):
                self.materialise(own)

            def after(_module, _inputs, _output, own=own):
                if not torch.is_grad_enabled():
                    for p in own:
                        _release(p)

            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
        return handles

    @contextmanager
    def editing(self, p: nn.Parameter) -> Iterator[torch.Tensor]:
        """`p`'s float32 values to change in place outside a step (CWR* zeroes, loads and
        consolidates head rows); a held parameter is quantised again afterwards."""
        group = next(g for g, q in self._group_params() if q is p)
        if not self._held(group):
            yield p.data
            return
        self.materialise([p])
        try:
            yield p.data
        finally:
            self._store(group, p, p.data)
            _release(p)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """w <- w - lr * g, with g quantised at q_b bits and the result held at q_b bits."""
        if closure is not None:
            raise ValueError("HybridSGD.step takes no closure")
        for group, p in self._group_params():
            if p.grad is None:
                continue
            held = self._held(group)
            if held and p.numel() == 0:
                self.materialise([p])
            if held:  # the gradient at q_b bits, in place (it is consumed here)
                quantise_minmax_(p.grad, group["bits"])
            p.sub_(p.grad, alpha=group["lr"])
            if group["clip"] is not None:
                p.clamp_(-group["clip"], group["clip"])
            if held:
                p.grad = None  # before quantising: its scratch takes the gradient's place
                self._store(group, p, p.data)
                _release(p)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader casts every state tensor to the parameter's dtype (float32); the
        integer codes are put back as they were saved."""
        codes = {i: s["codes"].clone() for i, s in state_dict["state"].items() if "codes" in s}
        super().load_state_dict(state_dict)
        params = [p for _, p in self._group_params()]
        for i, c in codes.items():
            self.state[params[int(i)]]["codes"] = c
        self.release()


def _release(p: nn.Parameter) -> None:
    p.data = torch.empty(0)
    p.grad = None
