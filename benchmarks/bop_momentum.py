"""Bop with the searched low-bit momentum vs Bop with float32 momentum, on real MNIST (MLP).

Same seed, same batches, same budget. Prints test accuracy, the optimizer state measured as the
bytes of the state tensors the optimizers hold, the mean lost-update fraction per step, and the
ratios. Requirement (issue 3): accuracy within 1 point, Bop state at least 2x smaller.

    python benchmarks/bop_momentum.py [--data-dir DIR] [--epochs 1] [--format json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from trainers.bop import build_bop_optimizer
from trainers.bop.optimizer import DEFAULT_GAMMA, DEFAULT_TAU
from trainers.bop.search import DEFAULT_TOLERANCE, search_model_momentum_format
from trainers.data import as_tensor, load_dataset, to_model_input
from trainers.engine import evaluate, train_step
from trainers.methods import make_recipe
from trainers.models import build_model

DEFAULT_MNIST = Path(
    os.environ.get("BNN_MNIST_DIR", Path(__file__).resolve().parents[2] / "shared/data/mnist")
)


def batches(dataset, batch_size: int, seed: int, epochs: int):
    generator = torch.Generator().manual_seed(seed)
    images, labels = as_tensor(dataset.train_images), as_tensor(dataset.train_labels)
    for _ in range(epochs):
        order = torch.randperm(dataset.train_size, generator=generator)
        for start in range(0, dataset.train_size - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            yield to_model_input(images[index]), labels[index]


def train_bop(dataset, spec: str | None, args) -> dict:
    torch.manual_seed(args.seed)
    recipe = make_recipe("bop", momentum_format=spec)
    model = build_model("mlp", recipe, in_shape=dataset.in_shape)
    optimizer = build_bop_optimizer(model, recipe, gamma=args.gamma, tau=args.tau)
    lost, steps, start = [], 0, time.perf_counter()
    for x, y in batches(dataset, args.batch_size, args.seed, args.epochs):
        loss = train_step(model, optimizer, x, y)
        lost.append(optimizer.last_lost_updates.lost_fraction)
        steps += 1
        if steps % 100 == 0:
            print(f"{spec or 'fp32'}: step {steps}, loss {loss:.3f}", file=sys.stderr, flush=True)
        if args.max_steps and steps >= args.max_steps:
            break
    seconds = time.perf_counter() - start
    test_x = to_model_input(as_tensor(dataset.test_images))
    _, accuracy = evaluate(model, test_x, as_tensor(dataset.test_labels))
    return {
        "momentum_format": spec or "fp32",
        "steps": steps,
        "test_accuracy": accuracy,
        "bop_state_bytes": optimizer.optimizers["bop"].state_bytes(),
        "optimizer_state_bytes": optimizer.state_bytes(),
        "mean_lost_fraction": sum(lost) / len(lost),
        "train_seconds": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_MNIST)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, help="cap the training steps of each run")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    parser.add_argument("--gamma", type=float, default=DEFAULT_GAMMA)
    parser.add_argument("--tau", type=float, default=DEFAULT_TAU)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("text", "json"), default="text")
    args = parser.parse_args()

    dataset = load_dataset("mnist", args.data_dir)
    torch.manual_seed(args.seed)
    recipe = make_recipe("bop")
    model = build_model("mlp", recipe, in_shape=dataset.in_shape)
    report = search_model_momentum_format(
        model, recipe, batches(dataset, args.batch_size, args.seed + 1, 1),
        warmup_steps=args.warmup_steps, gamma=args.gamma, tau=args.tau, tolerance=args.tolerance,
    )
    if report.choice is None:
        print(f"no format under tolerance {args.tolerance}; nothing to compare", file=sys.stderr)
        return 1
    print(f"searched format {report.choice.spec} ({report.choice.bits} bits, warm-up lost"
          f" fraction {report.choice.lost_fraction:.3f})", file=sys.stderr)
    runs = [train_bop(dataset, None, args), train_bop(dataset, report.choice.spec, args)]
    reference, searched = runs
    result = {
        "model": "mlp", "dataset": "mnist", "batch_size": args.batch_size,
        "epochs": args.epochs, "gamma": args.gamma, "tau": args.tau,
        "searched_format": report.choice.spec, "runs": runs,
        "accuracy_drop_points": 100 * (reference["test_accuracy"] - searched["test_accuracy"]),
        "bop_state_ratio": reference["bop_state_bytes"] / searched["bop_state_bytes"],
        "optimizer_state_ratio": (
            reference["optimizer_state_bytes"] / searched["optimizer_state_bytes"]
        ),
    }
    result["meets_requirement"] = (
        result["accuracy_drop_points"] <= 1.0 and result["bop_state_ratio"] >= 2.0
    )
    if args.format == "json":
        print(json.dumps(result))
        return 0
    print(f"{'momentum':>10} {'steps':>6} {'test acc %':>10} {'Bop state B':>12}"
          f" {'all state B':>12} {'lost/step':>9} {'train s':>8}")
    for run in runs:
        print(f"{run['momentum_format']:>10} {run['steps']:>6} {100 * run['test_accuracy']:>10.2f}"
              f" {run['bop_state_bytes']:>12} {run['optimizer_state_bytes']:>12}"
              f" {run['mean_lost_fraction']:>9.3f} {run['train_seconds']:>8.1f}")
    print(f"accuracy drop {result['accuracy_drop_points']:.2f} points; Bop state"
          f" {result['bop_state_ratio']:.2f}x smaller; all optimizer state"
          f" {result['optimizer_state_ratio']:.2f}x smaller")
    return 0


if __name__ == "__main__":
    sys.exit(main())
