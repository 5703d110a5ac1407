"""Training memory and step time of every method combination, side by side, at batch 100.

Combinations: standard (Adam), lowmem (all switches, Adam), bop (float32 momentum), bop with
the searched low-bit momentum, and lowmem + bop with the searched low-bit momentum. The
momentum format is searched per model from a warm-up (real MNIST for mlp; the conv models'
3x32x32 input has no real data set on this machine, so their warm-up uses synthetic data,
which the output says). Each configuration is measured by `trainers.measure.measure_training`
(tensor-level peak, median step time) in its own process. Requirement (issue 3): lowmem + Bop
with low-bit momentum below lowmem + Adam for every model.

    python benchmarks/method_combinations.py [--models mlp cnv binarynet] [--format json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MNIST = Path(os.environ.get("BNN_MNIST_DIR", REPO.parent / "shared/data/mnist"))
COMBINATIONS = ("standard", "lowmem", "bop", "bop+lowbit", "lowmem+bop+lowbit")
MIB = 2**20


def recipe_for(combination: str, momentum_format: str):
    from trainers.methods import LowMemSwitches, make_recipe

    if combination in ("standard", "lowmem"):
        return make_recipe(combination, optimizer="adam")
    if combination == "bop":
        return make_recipe("bop")
    if combination == "bop+lowbit":
        return make_recipe("bop", momentum_format=momentum_format)
    return make_recipe("bop", enable=LowMemSwitches.lowmem().enabled(),
                       momentum_format=momentum_format)


def measure_one(model_name: str, combination: str, momentum_format: str, args) -> dict:
    """Measure one configuration in this process (called in a fresh subprocess)."""
    from trainers.commands.measure import synthetic_batches
    from trainers.engine import train_step
    from trainers.measure import measure_training
    from trainers.models import build_model
    from trainers.optim import build_optimizer

    recipe = recipe_for(combination, momentum_format)
    torch.manual_seed(0)
    model = build_model(model_name, recipe)
    optimizer = build_optimizer(model, recipe)
    result = measure_training(
        model, optimizer, lambda x, y: train_step(model, optimizer, x, y),
        synthetic_batches(model.in_shape, args.batch_size), args.steps, tensor_steps=1,
    )
    return {
        "model": model_name,
        "combination": combination,
        "momentum_format": recipe.momentum_format,
        "peak_tensor_bytes": result.peak_tensor_bytes,
        "optimizer_state_bytes": result.category_max_bytes.get("optimizer_state", 0),
        "step_time_s": result.step_time_s,
    }


def search_format(model_name: str, args) -> tuple[str, dict]:
    """The searched momentum format for a model and where its warm-up data came from."""
    from datafiles import load_dataset
    from trainers.bop.search import search_model_momentum_format
    from trainers.commands.bop_encodings import training_batches
    from trainers.methods import make_recipe
    from trainers.models import build_model, default_input_shape

    if model_name == "mlp":
        dataset, source = load_dataset("mnist", args.data_dir), "mnist"
    else:
        shape = default_input_shape(model_name)
        dataset = load_dataset("synthetic", in_shape=shape, synthetic_size=20 * args.batch_size)
        source = "synthetic"
    recipe = make_recipe("bop")
    torch.manual_seed(0)
    model = build_model(model_name, recipe, in_shape=dataset.in_shape)
    report = search_model_momentum_format(
        model, recipe, training_batches(dataset, args.batch_size, 0),
        warmup_steps=args.warmup_steps, settle_steps=args.settle_steps,
    )
    if report.choice is None:
        raise SystemExit(f"{model_name}: no momentum format under the tolerance")
    return report.choice.spec, {"warmup_data": source, "bits": report.choice.bits,
                                "warmup_lost_fraction": report.choice.lost_fraction_start,
                                "steady_lost_fraction": report.choice.lost_fraction_steady}


def run_worker(model_name: str, combination: str, momentum_format: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", model_name, combination, momentum_format,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:]
        raise SystemExit(f"{model_name} {combination} failed ({done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnv", "binarynet"])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--warmup-steps", type=int, default=5, help="search warm-up steps")
    parser.add_argument("--settle-steps", type=int, default=10,
                        help="search steps between its warm-up and steady-state windows")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_MNIST)
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "COMBINATION", "FORMAT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure_one(*args.worker, args)))
        return 0

    results = []
    for model_name in args.models:
        spec, search = search_format(model_name, args)
        print(f"{model_name}: searched momentum format {spec} ({search})", file=sys.stderr)
        rows = {c: run_worker(model_name, c, spec, args) for c in COMBINATIONS}
        below = rows["lowmem+bop+lowbit"]["peak_tensor_bytes"] < rows["lowmem"]["peak_tensor_bytes"]
        results.append({"model": model_name, "momentum_format": spec, "search": search,
                        "rows": rows, "lowmem_bop_lowbit_below_lowmem_adam": below})
        if args.format == "text":
            print(f"\n{model_name} (batch {args.batch_size}, momentum {spec})")
            print(f"{'combination':>20} {'peak MiB':>9} {'x standard':>10} {'opt state MiB':>13}"
                  f" {'step ms':>8}")
            base = rows["standard"]["peak_tensor_bytes"]
            for c, row in rows.items():
                print(f"{c:>20} {row['peak_tensor_bytes'] / MIB:>9.2f}"
                      f" {row['peak_tensor_bytes'] / base:>10.3f}"
                      f" {row['optimizer_state_bytes'] / MIB:>13.3f}"
                      f" {1e3 * row['step_time_s']:>8.1f}")
            print(f"lowmem+bop+lowbit below lowmem (Adam): {'yes' if below else 'NO'}")
    if args.format == "json":
        print(json.dumps({"batch_size": args.batch_size, "models": results}))
    return 0 if all(r["lowmem_bop_lowbit_below_lowmem_adam"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
