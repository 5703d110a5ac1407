"""`python -m trainers bop-encodings`: search the cheapest low-bit momentum format for Bop.

Trains a copy of the model on real batches with float32 momentum, records the sampled
gradients of the first steps (the warm-up, from m = 0) and of a window after
--settle-steps more (the steady state, from the momentum reached there), replays both
through every candidate (sign, E, M, bias) of 4..16 bits, and lists each candidate's
lost-update fractions, whether it represents tau, and the memory it saves; the narrowest
one whose steady-state lost fraction is under the tolerance is chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

import torch

from contract.errors import UsageError
from trainers.bop.optimizer import DEFAULT_GAMMA, DEFAULT_TAU
from trainers.bop.search import (
    DEFAULT_SAMPLE_SIZE,
    DEFAULT_SETTLE_STEPS,
    DEFAULT_TOLERANCE,
    DEFAULT_WARMUP_STEPS,
    SearchReport,
    search_model_momentum_format,
)
from trainers.methods import make_recipe


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bop-encodings",
        help="search the low-bit momentum format for Bop (Yayla & Chen)",
        description=__doc__,
    )
    parser.add_argument("--model", required=True, help="mlp, cnv, binarynet, resnete18")
    parser.add_argument("--dataset", required=True, help="mnist, cifar10, svhn, digits, synthetic")
    parser.add_argument("--data-dir", help="raw files or a prepared .npz of the data set")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--warmup-steps", type=int, default=DEFAULT_WARMUP_STEPS,
                        help="steps of each recorded window (default %(default)s)")
    parser.add_argument("--settle-steps", type=int, default=DEFAULT_SETTLE_STEPS,
                        help="training steps between the warm-up and the steady-state window"
                        " (default %(default)s)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest steady-state lost-update fraction accepted"
                        f" (default {DEFAULT_TOLERANCE})")
    parser.add_argument("--tau", type=float, default=DEFAULT_TAU)
    parser.add_argument("--gamma", type=float, default=DEFAULT_GAMMA)
    parser.add_argument("--sample-size", type=int, default=DEFAULT_SAMPLE_SIZE,
                        help="binary weights whose gradients the warm-up records")
    parser.add_argument("--enable", action="append", default=[], metavar="SWITCH",
                        help="lowmem switch for the warm-up model (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.set_defaults(handler=run)


def check_arguments(args: argparse.Namespace) -> None:
    for name in ("batch_size", "warmup_steps", "sample_size"):
        value = getattr(args, name)
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.settle_steps < 0:
        raise UsageError(f"--settle-steps must be >= 0, got {args.settle_steps}")
    if not 0.0 <= args.tolerance < 1.0:
        raise UsageError(f"--tolerance must be in [0, 1), got {args.tolerance}")
    if not 0.0 < args.gamma <= 1.0:
        raise UsageError(f"--gamma must be in (0, 1], got {args.gamma}")
    if not 0.0 <= args.tau < float("inf"):
        raise UsageError(f"--tau must be finite and >= 0, got {args.tau}")


def training_batches(dataset, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Shuffled training batches as model input (what the training loop feeds), epoch after
    epoch, reshuffled each time, for as long as the caller takes them."""
    from datafiles import as_tensor, to_model_input

    if dataset.train_size < batch_size:
        raise UsageError(
            f"--batch-size {batch_size} exceeds the {dataset.train_size} training samples"
        )
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(dataset.train_size, generator=generator)
        for start in range(0, dataset.train_size - batch_size + 1, batch_size):
            index = order[start:start + batch_size].numpy()
            yield (to_model_input(as_tensor(dataset.train_images[index])),
                   as_tensor(dataset.train_labels[index]))


def describe(report: SearchReport) -> str:
    lines = [
        f"{'format':>10} {'bits':>4} {'tau?':>4} {'lost(warm-up)':>13} {'lost(steady)':>12}"
        f" {'flips(steady)':>13} {'bytes':>9}"
    ]
    for c in (report.reference, *report.candidates):
        mark = " <- chosen" if c is report.choice else ""
        lines.append(
            f"{c.spec:>10} {c.bits:>4} {'yes' if c.represents_tau else 'no':>4}"
            f" {c.lost_fraction_start:>13.4f} {c.lost_fraction_steady:>12.4f} {c.flips:>13}"
            f" {c.momentum_bytes:>9}{mark}"
        )
    if report.choice:
        lines.append(
            f"chosen {report.choice.spec} ({report.choice.bits} bits): momentum"
            f" {report.choice.momentum_bytes} B instead of {report.reference.momentum_bytes} B,"
            f" {report.memory_ratio:.2f}x smaller"
        )
    else:
        lines.append(f"no format loses at most {report.tolerance} of the steady-state updates;"
                     " keep fp32")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from datafiles import load_dataset
    from trainers.models import build_model

    check_arguments(args)
    recipe = make_recipe("bop", enable=tuple(args.enable))
    dataset = load_dataset(args.dataset, args.data_dir)
    torch.manual_seed(args.seed)
    model = build_model(args.model, recipe, in_shape=dataset.in_shape,
                        num_classes=dataset.num_classes)
    print(f"training {args.model} on {args.dataset}: {args.warmup_steps} warm-up steps,"
          f" {args.settle_steps} settling, {args.warmup_steps} steady-state", file=sys.stderr)
    report = search_model_momentum_format(
        model, recipe, training_batches(dataset, args.batch_size, args.seed),
        warmup_steps=args.warmup_steps, settle_steps=args.settle_steps, gamma=args.gamma,
        tau=args.tau,
        tolerance=args.tolerance, sample_size=args.sample_size, seed=args.seed,
    )
    record = report.as_record() | {"model": args.model, "dataset": args.dataset,
                                   "batch_size": args.batch_size}
    if args.format == "json":
        print(json.dumps(record))
    else:
        print(describe(report))
    return 0
