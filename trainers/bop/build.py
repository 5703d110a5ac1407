"""Bop for the binary weights, routed beside the recipe's Adam for the real-valued ones."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from contract.errors import UsageError
from trainers.bop.optimizer import Bop
from trainers.bop.routing import RoutedOptimizer, route_parameters
from trainers.layers import binary_layers, binary_weights, is_packed, weight_shape
from trainers.lowmem_optim import real_optimizer
from trainers.methods import Recipe


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
) -> RoutedOptimizer:
    """Bop for the binary weights, the recipe's Adam (lowmem-aware) for everything else.

    `gamma` and `tau` default to the recipe's (`bop_gamma`, `bop_tau`).

    `recipe.momentum_format == "auto"` is resolved first, on warm-up batches, by
    `trainers.bop.search.resolve_momentum_format`; here it is refused.
    """
    gamma = recipe.bop_gamma if gamma is None else gamma
    tau = recipe.bop_tau if tau is None else tau
    if recipe.momentum_format == "auto":
        raise UsageError(
            "--momentum-format auto needs warm-up batches: resolve it first with"
            " trainers.bop.resolve_momentum_format(recipe, model, batches)"
        )

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
        optimizers["adam"] = real_optimizer(_RealParameters(real), adam_recipe)
    return RoutedOptimizer(optimizers)
