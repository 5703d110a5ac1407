"""Bop with low-bit floating-point momentum, routed beside Adam for the real-valued parameters."""

from __future__ import annotations

from trainers.bop.build import build_bop_optimizer
from trainers.bop.fpformat import FloatFormat
from trainers.bop.lost_updates import LayerLostUpdates, LostUpdates
from trainers.bop.optimizer import DEFAULT_GAMMA, DEFAULT_TAU, Bop, bop_update
from trainers.bop.routing import RoutedOptimizer, route_parameters
from trainers.bop.search import resolve_momentum_format

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
