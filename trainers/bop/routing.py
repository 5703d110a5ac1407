"""One rule routes every trainable parameter to exactly one optimizer.

Bop owns the binary weights (`trainers.layers.binary_weights`), Adam (the recipe's real-valued
optimizer) everything else. A parameter claimed by two optimizers, or by none, is refused with
its name. The result is one object that the training loop drives like any torch optimizer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from itertools import chain

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from contract.errors import UsageError


def route_parameters(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    claims: Mapping[str, Iterable[nn.Parameter]],
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split named parameters by the optimizers that claim them; each exactly once."""
    named = list(named_parameters)
    names = {id(p): name for name, p in named}
    owner: dict[int, str] = {}
    routes: dict[str, list[tuple[str, nn.Parameter]]] = {key: [] for key in claims}
    for optimizer, params in claims.items():
        for p in params:
            if id(p) not in names:
                raise UsageError(
                    f"optimizer {optimizer!r} claims a parameter of shape {tuple(p.shape)}"
                    " that is not a trainable parameter of the model"
                )
            if id(p) in owner:
                raise UsageError(
                    f"parameter {names[id(p)]!r} is claimed by both {owner[id(p)]!r} and"
                    f" {optimizer!r}; each parameter belongs to exactly one optimizer"
                )
            owner[id(p)] = optimizer
            routes[optimizer].append((names[id(p)], p))
    for name, p in named:
        if id(p) not in owner:
            raise UsageError(
                f"parameter {name!r} is claimed by no optimizer (claims: {', '.join(claims)})"
            )
    return routes


class RoutedOptimizer:
    """Several optimizers over disjoint parameters, driven as one.

    `param_groups` lists every sub-optimizer's groups (the same dicts, so schedules that edit
    them take effect); `state_dict` holds each sub-optimizer's under its name.
    """

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        self.optimizers = dict(optimizers)
        self._pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._post_hooks: OrderedDict[int, Callable] = OrderedDict()

    def register_step_pre_hook(self, hook: Callable) -> RemovableHandle:
        """`hook(optimizer, args, kwargs)` before each step, as torch optimizers offer."""
        handle = RemovableHandle(self._pre_hooks)
        self._pre_hooks[handle.id] = hook
        return handle

    def register_step_post_hook(self, hook: Callable) -> RemovableHandle:
        handle = RemovableHandle(self._post_hooks)
        self._post_hooks[handle.id] = hook
        return handle

    @property
    def param_groups(self) -> list[dict]:
        return list(chain.from_iterable(o.param_groups for o in self.optimizers.values()))

    @property
    def state(self) -> dict:
        return dict(chain.from_iterable(o.state.items() for o in self.optimizers.values()))

    @property
    def last_lost_updates(self):
        """The Bop part's lost-update metric of the latest step (None before the first)."""
        bop = self.optimizers.get("bop")
        return getattr(bop, "last_lost_updates", None)

    def step(self, closure=None):
        for hook in list(self._pre_hooks.values()):
            hook(self, (), {})
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers.values():
            optimizer.step()
        for hook in list(self._post_hooks.values()):
            hook(self, (), {})
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": {name: o.state_dict() for name, o in self.optimizers.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("optimizers", {})
        if set(saved) != set(self.optimizers):
            raise ValueError(
                f"optimizer state holds {sorted(saved)}, this optimizer has"
                f" {sorted(self.optimizers)}"
            )
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(saved[name])

    def state_bytes(self) -> int:
        """Bytes of all optimizer state tensors (Bop's encoded momentum, Adam's moments)."""
        return sum(
            value.numel() * value.element_size()
            for state in self.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        )
