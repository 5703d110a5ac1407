"""`python -m trainers measure`: measured training memory and step time on synthetic data.

Runs N training steps of the engine (`trainers.engine.train_step`) and prints the
tensor-level peak (bytes live at the peak, by category), the process-level peak (VmHWM
above the baseline) and the median step time, beside both analytical models
(`trainers.memory_model`) and a per-category comparison with them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch

from contract.errors import UsageError
from trainers.commands.memory import (
    add_recipe_arguments,
    build_for_args,
    configuration,
    recipe_from_args,
)
from trainers.measure import CATEGORIES, measure_training
from trainers.memory_model import compare_measured, model_memory

MIB = 2**20


def synthetic_batches(in_shape: tuple[int, ...], batch_size: int, num_classes: int = 10):
    """A function giving batch i of synthetic inputs in [-1, 1] and labels."""
    from datafiles import synthetic, to_model_input

    def make_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = synthetic(in_shape, batch_size, num_classes, seed=i, n_test=1)
        images = to_model_input(torch.from_numpy(data.train_images))
        return images, torch.from_numpy(data.train_labels)

    return make_batch


def measure_report(args: argparse.Namespace) -> dict:
    """The JSON object `measure --format json` prints."""
    if args.steps <= 0:
        raise UsageError(f"--steps must be a positive integer, got {args.steps}")
    if args.tensor_steps <= 0:
        raise UsageError(f"--tensor-steps must be a positive integer, got {args.tensor_steps}")
    recipe = recipe_from_args(args)
    torch.manual_seed(args.seed)
    model = build_for_args(args, recipe)
    estimates = model_memory(model, recipe, args.batch_size)

    from trainers.engine import train_step
    from trainers.optim import build_optimizer

    if recipe.momentum_format == "auto":  # Bop: search the format on synthetic gradients
        from trainers.bop import resolve_momentum_format

        batches = synthetic_batches(model.in_shape, args.batch_size)
        # a short search: synthetic gradients have no steady state worth settling into
        recipe = resolve_momentum_format(recipe, model, (batches(i) for i in range(10)),
                                         warmup_steps=3, settle_steps=4)
    optimizer = build_optimizer(model, recipe)
    result = measure_training(
        model, optimizer, lambda x, y: train_step(model, optimizer, x, y),
        synthetic_batches(model.in_shape, args.batch_size), args.steps, args.tensor_steps)
    comparison = compare_measured(result.category_max_bytes,
                                  result.temporaries_max_by_phase["backward"],
                                  result.peak_tensor_bytes, estimates)
    report = {**configuration(args, recipe, model), "steps": args.steps}
    report.update(asdict(result))
    report["modeled"] = {name: e.to_dict() for name, e in estimates.items()}
    for estimate in report["modeled"].values():
        estimate.pop("layers", None)
    report["comparison"] = [asdict(row) for row in comparison]
    from trainers.kernels import describe

    report["kernels"] = describe()
    if args.profile:
        from trainers.profiling import format_profile, profile_training

        batches = synthetic_batches(model.in_shape, args.batch_size)
        profile = profile_training(
            model, optimizer, lambda x, y: train_step(model, optimizer, x, y),
            [batches(i) for i in range(max(3, args.steps))])
        report["profile"] = profile.to_dict()
        report["profile_table"] = format_profile(profile)
    return report


RSS_NOTE = ("(RSS growth exceeds the tensor peak by what no tensor owns: the allocator's "
            "retained pages and fragmentation, oneDNN/OpenMP scratch and stacks, autograd's "
            "graph; the peak RSS adds Python, torch and the engine)")


def format_text(report: dict) -> str:
    lines = [
        f"{report['model']}  method {report['method']}  optimizer {report['optimizer']}"
        f"  batch {report['batch_size']}  steps {report['steps']}"
        f"  torch threads {report['torch_threads']}  cpu {report['cpu_capability']}",
        f"tensor-level peak {report['peak_tensor_bytes'] / MIB:.3f} MiB"
        f"   process: peak RSS growth {report['peak_rss_delta_bytes'] / MIB:.3f} MiB,"
        f" peak RSS {report['peak_rss_bytes'] / MIB:.1f} MiB"
        f" (baseline {report['rss_baseline_bytes'] / MIB:.1f} MiB, {report['rss_method']})"
        f"   median step {report['step_time_s'] * 1e3:.1f} ms",
        RSS_NOTE,
        "",
        f"{'category':<18} {'at peak MiB':>12} {'max MiB':>10}",
    ]
    for name in CATEGORIES:
        lines.append(f"{name:<18} {report['breakdown'][name] / MIB:>12.3f}"
                     f" {report['category_max_bytes'][name] / MIB:>10.3f}")
    lines += ["", f"{'vs. model (MiB)':<18} {'measured':>9} {'published':>10} {'extended':>9}"
              "  within 25 % (published / extended)"]
    for row in report["comparison"]:
        flags = "/".join("yes" if row[k] else "no"
                         for k in ("published_within_25pct", "extended_within_25pct"))
        lines.append(f"{row['category']:<18} {row['measured_mib']:>9.3f}"
                     f" {row['published_mib']:>10.3f} {row['extended_mib']:>9.3f}  {flags}"
                     f"   [{row['measured_from']}]")
    lines += ["", "largest storages live at the peak:"]
    for item in report["largest_at_peak"]:
        lines.append(f"  {item['nbytes'] / MIB:8.3f} MiB  {item['category']:<18}"
                     f" {item['phase']:<14} {item['origin']} {item['dtype']}{item['shape']}")
    lines.append("published: docs/methods.md's model as stated; extended: what the engine really"
                 " keeps; measured categories at their own maxima")
    kernels = report["kernels"]
    lines.append("kernels: " + ", ".join(f"{k} {v}" for k, v in kernels.items()))
    if "profile_table" in report:
        lines += ["", report["profile_table"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = measure_report(args)
    if args.format == "json":
        report.pop("profile_table", None)
        print(json.dumps(report))
    else:
        print(format_text(report))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("measure", help="measure training memory and step time",
                                   description=__doc__)
    add_recipe_arguments(parser)
    parser.add_argument("--steps", type=int, default=5,
                        help="timed training steps; the first is a warm-up (default 5)")
    parser.add_argument("--tensor-steps", type=int, default=2,
                        help="further steps run under the tensor ledger (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="add a per-layer forward/backward timing breakdown")
    parser.set_defaults(handler=run)
