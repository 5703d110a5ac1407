"""Bop with low-bit floating-point momentum, routed beside Adam for the real-valued parameters."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn

from trainers.bop.fpformat import FloatFormat
from trainers.bop.lost_updates import LayerLostUpdates, LostUpdates
from trainers.bop.optimizer import DEFAULT_GAMMA, DEFAULT_TAU, Bop, bop_update
from trainers.bop.routing import RoutedOptimizer, route_parameters
from trainers.errors import UsageError
from trainers.layers import binary_layers, binary_weights, is_packed, weight_shape
from trainers.methods import Recipe

__all__ = [
    "DEFAULT_GAMMA",
    "DEFAULT_TAU",
    "Bop",
    "FloatFormat",
    "LayerLostUpdates",
    "LostUpdates",
    "RoutedOptimizer",
    "bop_update",
    "build_bop_optimizer",
    "resolve_momentum_format",
    "route_parameters",
]


class _RealParameters(nn.Module):
    """Holds the real-valued parameters so the engine's optimizer rule can be applied to them."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)


def build_bop_optimizer(
    model: nn.Module,
    recipe: Recipe,
    *,
    gamma: float | None = None,
    tau: float | None = None,
    warmup_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> RoutedOptimizer:
    """Bop for the binary weights, the recipe's Adam (lowmem-aware) for everything else.

    `gamma` and `tau` default to the recipe's (`bop_gamma`, `bop_tau`).

    With `recipe.momentum_format == "auto"` the encoding search runs first on `warmup_batches`
    (see `resolve_momentum_format`); without them "auto" is refused.
    """
    gamma = recipe.bop_gamma if gamma is None else gamma
    tau = recipe.bop_tau if tau is None else tau
    if recipe.momentum_format == "auto":
        if warmup_batches is None:
            raise UsageError(
                "--momentum-format auto needs warm-up batches: resolve it first with"
                " trainers.bop.resolve_momentum_format(recipe, model, batches)"
            )
        recipe = resolve_momentum_format(recipe, model, warmup_batches, gamma=gamma, tau=tau)
    from trainers.optim import build_optimizer

    # packed binary weights (low-memory mode) need no autograd gradient: Bop trains them
    packed_shapes = {id(layer.weight): weight_shape(layer) for layer in binary_layers(model)
                     if is_packed(layer.weight)}
    trainable = [(name, p) for name, p in model.named_parameters()
                 if p.requires_grad or id(p) in packed_shapes]
    binary = [p for p in binary_weights(model) if p.requires_grad or id(p) in packed_shapes]
    binary_ids = {id(p) for p in binary}
    real = [p for _, p in trainable if id(p) not in binary_ids]
    routes = route_parameters(trainable, {"bop": binary, "adam": real})
    optimizers: dict[str, torch.optim.Optimizer] = {
        "bop": Bop(routes["bop"], gamma=gamma, tau=tau, momentum_format=recipe.momentum_format,
                   packed_shapes=packed_shapes)
    }
    if real:
        adam_recipe = replace(recipe, optimizer="adam", momentum_format=None)
        optimizers["adam"] = build_optimizer(_RealParameters(real), adam_recipe)
    return RoutedOptimizer(optimizers)


def resolve_momentum_format(
    recipe: Recipe,
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    **search_options,
) -> Recipe:
    """The recipe with `momentum_format="auto"` replaced by the searched format (others as is).

    Runs the warm-up on a copy of `model`, so the model itself is left untouched.
    """
    if recipe.momentum_format != "auto":
        return recipe
    from trainers.bop.search import search_model_momentum_format

    search_options = {"gamma": recipe.bop_gamma, "tau": recipe.bop_tau} | search_options
    report = search_model_momentum_format(model, recipe, batches, **search_options)
    return replace(recipe, momentum_format=report.choice.spec if report.choice else None)
