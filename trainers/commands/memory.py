"""`python -m trainers memory`: the analytical training-memory model of docs/methods.md.

Prints the published model (Model + Optimiser + Activations, MiB) for one model, method,
optimizer and batch size, its per-layer table, and the extended model that counts what
the engine really keeps. The recipe options here are shared with `measure`.
"""

from __future__ import annotations

import argparse
import json

from contract.errors import UsageError, unknown_choice
from trainers.memory_model import model_memory
from trainers.methods import OPTIMIZERS, Recipe, make_recipe

MEMORY_METHODS = ("standard", "lowmem", "bop")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that pick model, batch size and recipe (shared by `memory` and `measure`)."""
    parser.add_argument("--model", required=True, help="mlp, cnv, binarynet, resnete18")
    parser.add_argument("--batch-size", type=int, default=100, help="samples per step (100)")
    parser.add_argument("--method", required=True, help=", ".join(MEMORY_METHODS))
    parser.add_argument("--optimizer", help=f"{', '.join(OPTIMIZERS)} (default: the method's)")
    parser.add_argument("--momentum-format", metavar="E,M[,BIAS]",
                        help="Bop's low-bit momentum format (default: 32-bit)")
    parser.add_argument("--in-shape", metavar="C,H,W", help="input shape (default: the model's)")
    parser.add_argument("--enable", action="append", default=[], metavar="SWITCH",
                        help="turn a lowmem switch on (repeatable)")
    parser.add_argument("--disable", action="append", default=[], metavar="SWITCH",
                        help="turn a lowmem switch off (repeatable)")
    parser.add_argument("--format", choices=("table", "json"), default="table")


def parse_in_shape(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(f"--in-shape must be C,H,W with positive integers, got {text!r}")
    return shape  # type: ignore[return-value]


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe the options describe; one-line errors for unknown names and bad sizes."""
    if args.method not in MEMORY_METHODS:
        raise unknown_choice("method", args.method, MEMORY_METHODS)
    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    recipe = make_recipe(args.method, optimizer=args.optimizer, enable=tuple(args.enable),
                         disable=tuple(args.disable), momentum_format=args.momentum_format)
    if recipe.momentum_format not in (None, "auto"):
        from trainers.bop.fpformat import FloatFormat

        FloatFormat.parse(recipe.momentum_format)  # refuses a bad format with one line
    return recipe


def build_for_args(args: argparse.Namespace, recipe: Recipe):
    """The model the options name, built for the recipe."""
    from trainers.models import MODELS, build_model

    if args.model not in MODELS:
        raise unknown_choice("model", args.model, MODELS)
    return build_model(args.model, recipe, parse_in_shape(args.in_shape))


def configuration(args: argparse.Namespace, recipe: Recipe, model) -> dict:
    return {
        "model": args.model,
        "method": recipe.method,
        "optimizer": recipe.optimizer,
        "momentum_format": recipe.momentum_format,
        "batch_size": args.batch_size,
        "in_shape": list(model.in_shape),
        "switches": [name for name in recipe.switches.names()
                     if getattr(recipe.switches, name)],
    }


def memory_report(args: argparse.Namespace) -> dict:
    """The JSON object `memory --format json` prints: published figures at the top level."""
    recipe = recipe_from_args(args)
    model = build_for_args(args, recipe)
    estimates = model_memory(model, recipe, args.batch_size)
    published, extended = estimates["published"].to_dict(), estimates["extended"].to_dict()
    terms = published.pop("terms_mib")
    return {
        **configuration(args, recipe, model),
        **published,
        **{f"{name}_mib": value for name, value in terms.items()},
        "extended": extended,
    }


def format_table(report: dict) -> str:
    """The report as text: the per-layer table, then both models side by side."""
    lines = [
        f"{report['model']}  method {report['method']}  optimizer {report['optimizer']}"
        f"  batch {report['batch_size']}  input {'x'.join(map(str, report['in_shape']))}",
        "",
        f"{'layer':<20} {'kind':<13} {'input el.':>10} {'weights':>10} {'BN ch.':>7}"
        f" {'model KiB':>10} {'optim. KiB':>11} {'saved KiB':>10}",
    ]
    for row in report["layers"]:
        lines.append(
            f"{row['name']:<20} {row['kind']:<13} {row['input_elements']:>10} {row['weights']:>10}"
            f" {row['bn_channels']:>7}"
            f" {(row['weight_bits'] + row['beta_bits']) / 8192:>10.1f}"
            f" {(row['weight_gradient_bits'] + row['moment_bits']) / 8192:>11.1f}"
            f" {row['saved_activation_bits'] / 8192:>10.1f}"
        )
    extended = report["extended"]
    lines += ["", f"{'MiB':<14} {'published':>10} {'extended':>10}"]
    for key in ("model_mib", "optimizer_mib", "activations_mib", "total_mib"):
        lines.append(f"{key.removesuffix('_mib'):<14} {report[key]:>10.3f} {extended[key]:>10.3f}")
    lines.append("published: docs/methods.md's model as stated (each layer's input at b_x);"
                 " extended: what the engine really keeps")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = memory_report(args)
    print(json.dumps(report) if args.format == "json" else format_table(report))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("memory", help="the analytical training-memory model",
                                   description=__doc__)
    add_recipe_arguments(parser)
    parser.set_defaults(handler=run)

