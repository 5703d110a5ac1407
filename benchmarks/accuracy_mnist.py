"""Accuracy on real MNIST: MLP, batch 100, `standard` vs `lowmem`, same seed and budget.

Requirement (issue 2): `lowmem` reaches at least 96.9 % test accuracy within 30 epochs and
ends within 1 percentage point of `standard` at the same budget. Prints each method's
per-epoch test accuracy side by side, then the comparison; with --format json the last
stdout line is one JSON object (tests/trainers/test_accuracy_mnist.py reads it).

    python benchmarks/accuracy_mnist.py --data-dir ../shared/data/mnist --epochs 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from datafiles import load_dataset
from trainers.methods import make_recipe
from trainers.train import EpochRecord, TrainConfig, train

TARGET_ACCURACY = 0.969  # the paper's MNIST MLP figure for the proposed method
MAX_GAP = 0.01  # lowmem may trail standard by at most one percentage point
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


class EpochPrinter:
    def __init__(self, method: str, out) -> None:
        self.method, self.out = method, out

    def on_epoch_end(self, record: EpochRecord) -> None:
        print(
            f"{self.method:>8} epoch {record.epoch:2d}  train loss {record.train_loss:.4f}"
            f"  test loss {record.test_loss:.4f}  test acc {100 * record.test_accuracy:.2f} %"
            f"  lr {record.lr:.3g}  {record.seconds:.1f} s",
            file=self.out,
            flush=True,
        )


def compare(histories: dict[str, list[float]], epochs: int) -> dict:
    """The requirement's figures from per-epoch test accuracies of both methods."""
    standard, lowmem = histories["standard"], histories["lowmem"]
    reached = next((i + 1 for i, acc in enumerate(lowmem) if acc >= TARGET_ACCURACY), None)
    gap = standard[-1] - lowmem[-1]
    return {
        "epochs": epochs,
        "standard_final": standard[-1],
        "lowmem_final": lowmem[-1],
        "standard_best": max(standard),
        "lowmem_best": max(lowmem),
        "lowmem_epoch_reaching_target": reached,
        "gap_pp": round(100 * gap, 3),
        "target": TARGET_ACCURACY,
        "passed": reached is not None and gap <= MAX_GAP,
        "history": histories,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=os.environ.get("BNN_MNIST_DIR", str(DEFAULT_DATA_DIR))
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-plateau", action="store_true", help="halve lr on test-loss plateau")
    parser.add_argument("--plateau-patience", type=int, default=5)
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=("standard", "lowmem"),
        default=["standard", "lowmem"],
        help="train only these (the comparison needs both)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on shared cores)"
    )
    parser.add_argument("--format", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    dataset = load_dataset("mnist", args.data_dir)
    log = sys.stderr if args.format == "json" else sys.stdout
    histories: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for method in args.methods:
        config = TrainConfig(
            model="mlp",
            dataset="mnist",
            recipe=make_recipe(method, lr=args.lr),
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            lr_plateau=args.lr_plateau,
            plateau_patience=args.plateau_patience,
        )
        result = train(config, EpochPrinter(method, log), dataset=dataset)
        histories[method] = [record.test_accuracy for record in result.history]
        seconds[method] = round(result.seconds, 1)

    settings = {
        "seconds": seconds,
        "lr": args.lr,
        "lr_plateau": args.lr_plateau,
        "plateau_patience": args.plateau_patience,
        "seed": args.seed,
        "threads": args.threads,
    }
    methods = list(histories)
    print("\nepoch  " + "  ".join(f"{m:>8}" for m in methods) + "   (test accuracy %)", file=log)
    for epoch, row in enumerate(zip(*histories.values()), 1):
        print(f"{epoch:5d}  " + "  ".join(f"{100 * acc:8.2f}" for acc in row), file=log)
    if methods != ["standard", "lowmem"]:  # one method alone: its curve, no verdict
        if args.format == "json":
            print(json.dumps({"history": histories} | settings))
        return 0
    summary = compare(histories, args.epochs) | settings
    reached = summary["lowmem_epoch_reaching_target"]
    print(
        f"final: standard {100 * summary['standard_final']:.2f} %, lowmem "
        f"{100 * summary['lowmem_final']:.2f} % (gap {summary['gap_pp']:.2f} pp, allowed "
        f"{100 * MAX_GAP:.0f}); lowmem reached {100 * TARGET_ACCURACY:.1f} % "
        + (f"at epoch {reached}" if reached else f"not within {args.epochs} epochs")
        + f"; {'PASS' if summary['passed'] else 'FAIL'}",
        file=log,
    )
    if args.format == "json":
        print(json.dumps(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
