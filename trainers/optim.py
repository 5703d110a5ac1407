"""The recipe's optimizer: `build_optimizer(model, recipe)`, the one entry point.

Bop (`trainers.bop`) for `optimizer="bop"`, which routes the real-valued parameters to
`trainers.lowmem_optim.real_optimizer`; that one (torch's Adam or SGD, or `LowMemAdam` /
`LowMemSGD` with the lowmem switches) for everything else.
"""

from __future__ import annotations

import torch
from torch import nn

from trainers.bop import build_bop_optimizer
from trainers.lowmem_optim import real_optimizer
from trainers.methods import Recipe


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over all of the model's parameters."""
    if recipe.optimizer == "bop":
        return build_bop_optimizer(model, recipe)
    return real_optimizer(model, recipe)
