"""Bop with the searched low-bit momentum vs Bop with float32 momentum, on real MNIST (MLP).

Same seed, same batches, same budget (default 3 epochs). The format comes from the encoding
search judged on the steady state (`trainers.bop.search`). Prints per run: test accuracy
after every epoch; the lost-update fraction over the first steps (the warm-up, from m = 0)
and over the last epoch (the steady state); and memory under three accountings:

- momentum: the bytes of the stored momentum alone (what the format changes);
- weights + momentum: binary weights at 1 bit each plus the momentum, i.e. Bop's whole
  per-weight training state, the storage a low-bit momentum format shrinks;
- full: the tensor-level peak of a training step (parameters as the engine holds them,
  Adam state of the real-valued parameters, activations, gradients, temporaries), measured
  by the engine's tensor ledger (`trainers.measure`).

Yayla & Chen report "the memory usage in BNN training" 2.04-2.47x lower than with 32-bit
momentum; which tensors that figure counts is not stated in the abstract, the only part of
the paper this project could consult, so the first two accountings bracket it and the third
shows what a device would see.

Also the finding of issue 17: Bop on the lowmem switches (1-bit weight gradients
sgn(dW) / sqrt(N)) against Bop alone, at Larq's tau = 1e-8 and at a tau scaled to the sign
gradients' size (--lowmem-tau), same budget. Requirement (issues 3 and 17): accuracy of the
searched format within 1 point of float32 after the budget; Bop state at least 2x smaller.

    python benchmarks/bop_momentum.py [--data-dir DIR] [--epochs 3] [--format json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from datafiles import as_tensor, load_dataset, to_model_input
from trainers.bop import build_bop_optimizer
from trainers.bop.optimizer import DEFAULT_GAMMA, DEFAULT_TAU
from trainers.bop.search import (
    DEFAULT_SETTLE_STEPS,
    DEFAULT_TOLERANCE,
    DEFAULT_WARMUP_STEPS,
    search_model_momentum_format,
)
from trainers.engine import evaluate, train_step
from trainers.layers import binary_layers, weight_shape
from trainers.measure import track_tensor_peak
from trainers.methods import LowMemSwitches, make_recipe
from trainers.models import build_model

DEFAULT_MNIST = Path(
    os.environ.get("BNN_MNIST_DIR", Path(__file__).resolve().parents[2] / "shared/data/mnist")
)
MAX_DROP_POINTS = 1.0
MIN_STATE_RATIO = 2.0
# tau on the sign gradients' scale: below sqrt(gamma) / sqrt(N) (2.2e-5 to 2.0e-4 for the MLP),
# the size of the momentum's noise when sgn(dW) / sqrt(N) flips sign at random
LOWMEM_TAU = 1e-5


def batches(dataset, batch_size: int, seed: int, epochs: int | None):
    """Shuffled batches, epoch after epoch (`epochs` None: for as long as they are taken)."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = as_tensor(dataset.train_images), as_tensor(dataset.train_labels)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = torch.randperm(dataset.train_size, generator=generator)
        for start in range(0, dataset.train_size - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            yield to_model_input(images[index]), labels[index]
        epoch += 1


def test_accuracy(model, dataset) -> float:
    x = to_model_input(as_tensor(dataset.test_images))
    return evaluate(model, x, as_tensor(dataset.test_labels))[1]


def train_bop(dataset, label: str, spec: str | None, args, *, lowmem: bool = False,
              tau: float = DEFAULT_TAU) -> dict:
    """Train the MLP with Bop; accuracy per epoch, lost fractions, the three accountings."""
    torch.manual_seed(args.seed)
    enable = LowMemSwitches.lowmem().enabled() if lowmem else ()
    recipe = make_recipe("bop", enable=enable, momentum_format=spec, bop_gamma=args.gamma,
                         bop_tau=tau)
    model = build_model("mlp", recipe, in_shape=dataset.in_shape)
    optimizer = build_bop_optimizer(model, recipe)
    bop = optimizer.optimizers["bop"]
    steps_per_epoch = dataset.train_size // args.batch_size
    lost, accuracies, start = [], [], time.perf_counter()
    for step, (x, y) in enumerate(batches(dataset, args.batch_size, args.seed, args.epochs), 1):
        train_step(model, optimizer, x, y)
        lost.append((bop.last_lost_updates.lost, bop.last_lost_updates.attempted))
        if step % steps_per_epoch == 0:
            accuracies.append(test_accuracy(model, dataset))
            print(f"{label}: epoch {len(accuracies)} test accuracy {100 * accuracies[-1]:.2f} %",
                  file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    weights = sum(weight_shape(layer).numel() for layer in binary_layers(model))
    x, y = next(batches(dataset, args.batch_size, args.seed + 7, 1))
    peak = track_tensor_peak(model, optimizer, lambda bx, by: train_step(model, optimizer, bx, by),
                             [(x, y)])

    def fraction(window) -> float:
        attempted = sum(a for _, a in window)
        return sum(lost_ for lost_, _ in window) / attempted if attempted else 0.0

    momentum_bytes = bop.state_bytes()
    return {
        "run": label,
        "momentum_format": spec or "fp32",
        "tau": tau,
        "steps": len(lost),
        "test_accuracy_per_epoch": accuracies,
        "test_accuracy": accuracies[-1],
        "lost_fraction_warmup": fraction(lost[:args.warmup_steps]),
        "lost_fraction_last_epoch": fraction(lost[-steps_per_epoch:]),
        "momentum_bytes": momentum_bytes,
        "weights_plus_momentum_bytes": momentum_bytes + weights / 8,
        "peak_tensor_bytes": peak.peak_bytes,
        "train_seconds": seconds,
    }


def ratios(reference: dict, other: dict) -> dict:
    return {
        key: reference[key] / other[key]
        for key in ("momentum_bytes", "weights_plus_momentum_bytes", "peak_tensor_bytes")
    }


def print_text(result: dict) -> None:
    search = result["search"]
    print(f"searched format {search['spec']} ({search['bits']} bits): lost fraction"
          f" {search['lost_fraction_warmup']:.3f} over the {search['warmup_steps']} warm-up steps,"
          f" {search['lost_fraction_steady']:.3f} over the steady-state window after"
          f" {search['settle_steps']} steps (judged on; tolerance {search['tolerance']})")
    print(f"{'run':<26}{'acc per epoch %':>24}{'lost warm-up':>13}{'lost last ep':>13}"
          f"{'momentum B':>12}{'w+m B':>11}{'peak MiB':>10}{'train s':>9}")
    for run in result["runs"]:
        per_epoch = " ".join(f"{100 * a:.2f}" for a in run["test_accuracy_per_epoch"])
        print(f"{run['run']:<26}{per_epoch:>24}{run['lost_fraction_warmup']:>13.3f}"
              f"{run['lost_fraction_last_epoch']:>13.3f}{run['momentum_bytes']:>12}"
              f"{run['weights_plus_momentum_bytes']:>11.0f}"
              f"{run['peak_tensor_bytes'] / 2**20:>10.2f}{run['train_seconds']:>9.1f}")
    r = result["memory_ratios"]
    print(f"float32 / searched: momentum {r['momentum_bytes']:.2f}x, weights + momentum"
          f" {r['weights_plus_momentum_bytes']:.2f}x,"
          f" full tensor peak {r['peak_tensor_bytes']:.2f}x"
          f" (Yayla & Chen: 2.04-2.47x)")
    print(f"accuracy drop {result['accuracy_drop_points']:.2f} points after {result['epochs']}"
          f" epochs (need <= {MAX_DROP_POINTS}): {'ok' if result['meets_requirement'] else 'FAIL'}")
    if len(result["runs"]) < 4:
        return
    bop_alone, _, default_tau, scaled_tau = result["runs"]
    print(f"finding: Bop on the lowmem switches reaches {100 * default_tau['test_accuracy']:.2f} %"
          f" at tau {default_tau['tau']:g} and {100 * scaled_tau['test_accuracy']:.2f} % at tau"
          f" {scaled_tau['tau']:g}; Bop alone {100 * bop_alone['test_accuracy']:.2f} %")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_MNIST)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--warmup-steps", type=int, default=DEFAULT_WARMUP_STEPS)
    parser.add_argument("--settle-steps", type=int, default=DEFAULT_SETTLE_STEPS)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    parser.add_argument("--gamma", type=float, default=DEFAULT_GAMMA)
    parser.add_argument("--tau", type=float, default=DEFAULT_TAU)
    parser.add_argument("--lowmem-tau", type=float, default=LOWMEM_TAU)
    parser.add_argument("--no-lowmem", action="store_true", help="skip the lowmem + Bop finding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--format", choices=("text", "json"), default="text")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dataset = load_dataset("mnist", args.data_dir)
    torch.manual_seed(args.seed)
    recipe = make_recipe("bop", bop_gamma=args.gamma, bop_tau=args.tau)
    model = build_model("mlp", recipe, in_shape=dataset.in_shape)
    report = search_model_momentum_format(
        model, recipe, batches(dataset, args.batch_size, args.seed + 1, None),
        warmup_steps=args.warmup_steps, settle_steps=args.settle_steps, gamma=args.gamma,
        tau=args.tau, tolerance=args.tolerance,
    )
    if report.choice is None:
        print(f"no format loses at most {args.tolerance} of the steady-state updates",
              file=sys.stderr)
        return 1
    spec = report.choice.spec
    print(f"searched format {spec} ({report.choice.bits} bits)", file=sys.stderr)
    runs = [train_bop(dataset, "bop fp32", None, args, tau=args.tau),
            train_bop(dataset, f"bop {spec}", spec, args, tau=args.tau)]
    if not args.no_lowmem:
        runs += [train_bop(dataset, f"lowmem+bop fp32 tau {t:g}", None, args, lowmem=True, tau=t)
                 for t in (args.tau, args.lowmem_tau)]
    reference, searched = runs[:2]
    drop = 100 * (reference["test_accuracy"] - searched["test_accuracy"])
    memory = ratios(reference, searched)
    result = {
        "model": "mlp", "dataset": "mnist", "batch_size": args.batch_size,
        "epochs": args.epochs, "gamma": args.gamma, "tau": args.tau,
        "search": {"spec": spec, "bits": report.choice.bits, "tolerance": args.tolerance,
                   "warmup_steps": report.warmup_steps, "settle_steps": report.settle_steps,
                   "lost_fraction_warmup": report.choice.lost_fraction_start,
                   "lost_fraction_steady": report.choice.lost_fraction_steady},
        "runs": runs,
        "accuracy_drop_points": drop,
        "memory_ratios": memory,
        "meets_requirement": (drop <= MAX_DROP_POINTS
                              and memory["momentum_bytes"] >= MIN_STATE_RATIO),
    }
    if args.format == "json":
        print(json.dumps(result))
    else:
        print_text(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
