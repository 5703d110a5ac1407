"""`python -m trainers train`: train one model with one recipe and report accuracy per epoch."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from contract.errors import UsageError
from datafiles.download import download
from trainers.bop.schedule import schedule_from_flags
from trainers.methods import BOP_DEFAULT_GAMMA, BOP_DEFAULT_TAU, make_recipe
from trainers.train import (
    EpochRecord,
    StepRecord,
    TrainConfig,
    check_config,
    load_training_data,
    train,
)


class ProgressLine:
    """One self-overwriting progress line on a stream, redrawn at most `hz` times a second."""

    def __init__(self, stream: TextIO, epochs: int, steps_per_epoch: int, hz: float = 4.0) -> None:
        self.stream, self.epochs, self.steps_per_epoch = stream, epochs, steps_per_epoch
        self.min_interval_s = 1.0 / hz
        self.last_draw = 0.0
        self.epoch_step = 0

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch_step = 0

    def on_step(self, record: StepRecord) -> None:
        self.epoch_step += 1
        now = time.monotonic()
        if now - self.last_draw < self.min_interval_s and self.epoch_step < self.steps_per_epoch:
            return
        self.last_draw = now
        done = self.epoch_step / self.steps_per_epoch
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        self.stream.write(
            f"\repoch {record.epoch}/{self.epochs} [{bar}] {self.epoch_step}/{self.steps_per_epoch}"
            f" loss {record.loss:.4f} {record.step_time_s * 1e3:.1f} ms/step"
        )
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\033[K")
        self.stream.flush()


class Reporter:
    """The command's callbacks: progress line (optional) and one line per epoch."""

    def __init__(self, out: TextIO, epochs: int, progress: ProgressLine | None) -> None:
        self.out, self.epochs, self.progress = out, epochs, progress

    def on_epoch_start(self, epoch: int) -> None:
        if self.progress:
            self.progress.on_epoch_start(epoch)

    def on_step(self, record: StepRecord) -> None:
        if self.progress:
            self.progress.on_step(record)

    def on_epoch_end(self, record: EpochRecord) -> None:
        if self.progress:
            self.progress.clear()
        print(
            f"epoch {record.epoch}/{self.epochs}"
            f"  train loss {record.train_loss:.4f} acc {100 * record.train_accuracy:.2f} %"
            f"  test loss {record.test_loss:.4f} acc {100 * record.test_accuracy:.2f} %"
            f"  lr {record.lr:.3g}  {record.seconds:.1f} s",
            file=self.out,
            flush=True,
        )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model on a data set and report test accuracy",
        description=__doc__,
    )
    parser.add_argument("--model", required=True, help="mlp, cnv, binarynet, resnete18")
    parser.add_argument("--dataset", required=True, help="mnist, cifar10, svhn, digits, synthetic")
    parser.add_argument(
        "--data-dir",
        help="raw files, a prepared .npz, or a directory holding <dataset>.npz "
        "(not needed for digits and synthetic)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="fetch missing raw files (mnist, cifar10, svhn) into --data-dir first",
    )
    parser.add_argument("--method", required=True, help="standard, lowmem, bop, cwr")
    parser.add_argument("--optimizer", help="adam, sgd or bop (default: the method's)")
    parser.add_argument(
        "--enable",
        action="append",
        default=[],
        metavar="SWITCH",
        help="turn a lowmem switch on (repeatable)",
    )
    parser.add_argument(
        "--disable",
        action="append",
        default=[],
        metavar="SWITCH",
        help="turn a lowmem switch off (repeatable)",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, help="stop after this many training steps")
    parser.add_argument(
        "--lr-plateau",
        action="store_true",
        help="halve the learning rate when the test loss stops improving",
    )
    parser.add_argument(
        "--plateau-patience",
        type=int,
        default=5,
        help="epochs without improvement before halving (default 5)",
    )
    parser.add_argument(
        "--progress",
        action="store_true",
        help="show the progress line even when stderr is not a terminal",
    )
    parser.add_argument(
        "--momentum-format",
        metavar="E,M[,BIAS]|auto",
        help="Bop: store the momentum in this float format, or search it first (auto)",
    )
    parser.add_argument("--gamma", type=float, default=BOP_DEFAULT_GAMMA,
                        help="Bop's adaptivity rate (default %(default)s, Larq's)")
    parser.add_argument("--tau", type=float, default=BOP_DEFAULT_TAU,
                        help="Bop's flip threshold (default %(default)s, Larq's)")
    parser.add_argument("--gamma-decay", type=float, metavar="FACTOR",
                        help="Bop: multiply gamma by FACTOR every --gamma-decay-every epochs"
                        " (Helwegen et al., CIFAR-10: 0.1 every 100)")
    parser.add_argument("--gamma-decay-every", type=int, metavar="EPOCHS")
    parser.add_argument("--tau-decay", type=float, metavar="FACTOR",
                        help="Bop: multiply tau by FACTOR every --tau-decay-every epochs")
    parser.add_argument("--tau-decay-every", type=int, metavar="EPOCHS")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    recipe = make_recipe(
        args.method,
        optimizer=args.optimizer,
        enable=tuple(args.enable),
        disable=tuple(args.disable),
        lr=args.lr,
        momentum_format=args.momentum_format,
        bop_gamma=args.gamma,
        bop_tau=args.tau,
    )
    config = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        recipe=recipe,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        max_steps=args.max_steps,
        lr_plateau=args.lr_plateau,
        plateau_patience=args.plateau_patience,
        gamma_schedule=schedule_from_flags("gamma", args.gamma_decay, args.gamma_decay_every),
        tau_schedule=schedule_from_flags("tau", args.tau_decay, args.tau_decay_every),
    )
    check_config(config)
    if args.download:
        if args.data_dir is None:
            raise UsageError("--download needs --data-dir (where to put the files)")
        try:
            download(args.dataset, args.data_dir)
        except OSError as exc:
            print(f"error: download of {args.dataset} failed: {exc}", file=sys.stderr)
            return 1
    dataset = load_training_data(config)
    check_config(config, dataset)
    steps_per_epoch = dataset.train_size // config.batch_size
    if config.max_steps is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps)
    progress = None
    if args.progress or sys.stderr.isatty():
        progress = ProgressLine(sys.stderr, config.epochs, steps_per_epoch)
    as_json = args.format == "json"
    reporter = Reporter(sys.stderr if as_json else sys.stdout, config.epochs, progress)
    result = train(config, reporter, dataset=dataset)
    if as_json:
        print(json.dumps(result.summary()))
    else:
        print(
            f"{config.model} {recipe.method} on {dataset.name}: test accuracy "
            f"{100 * result.test_accuracy:.2f} % after {result.epochs} epochs "
            f"({result.steps} steps, {result.seconds:.1f} s)"
        )
    return 0
