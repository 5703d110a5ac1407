"""`python -m trainers continual`: learn a class-incremental stream with CWR* (or naive fine-tuning)
and report, per experience, accuracy on the classes seen so far and what it cost."""

from __future__ import annotations

import argparse
import json
import sys

from trainers.continual.runner import (
    BINARY_LR,
    SGD_LR,
    ContinualConfig,
    ExperienceRecord,
    run_continual,
)


class ExperienceLines:
    """One line per experience on `out`."""

    def __init__(self, out, experiences: int) -> None:
        self.out, self.experiences = out, experiences

    def on_epoch_end(self, record: ExperienceRecord) -> None:
        print(
            f"experience {record.experience}/{self.experiences} classes {record.classes}"
            f"  accuracy on {len(record.seen_classes)} seen classes"
            f" {100 * record.test_accuracy:.2f} %"
            f"  buffer {record.buffer_bytes} B  trainable {record.trainable_bytes} B"
            f"  {record.seconds:.1f} s",
            file=self.out,
            flush=True,
        )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "continual",
        help="class-incremental learning with CWR*, 1-bit latent replay and hybrid quantisation",
        description=__doc__,
    )
    parser.add_argument("--model", required=True, help="mlp, cnv or binarynet")
    parser.add_argument("--dataset", required=True, help="mnist, cifar10, svhn, digits")
    parser.add_argument("--data-dir", help="the data set's files (not needed for digits)")
    parser.add_argument("--strategy", required=True, choices=("cwr", "naive"))
    parser.add_argument("--experiences", type=int, required=True,
                        help="number of experiences the classes are split into")
    parser.add_argument("--replay-size", type=int, default=1500,
                        help="latent-replay buffer entries (cwr; default 1500)")
    parser.add_argument("--replay-storage", default="packed",
                        help="packed (1 bit per latent, default) or fp32 (ablation)")
    parser.add_argument("--qf", type=int, default=8, help="forward bits of the trainable part")
    parser.add_argument("--qb", type=int, default=16,
                        help="bits the trainable part's weights are held at (and its gradients "
                        "and updates)")
    parser.add_argument("--rounding", default="nearest",
                        help="onto the q_b-bit grid: nearest (the paper's, default) or stochastic")
    parser.add_argument("--latent-layer", type=int,
                        help="blocks below this index are frozen after the first experience "
                        "(default 1)")
    parser.add_argument("--epochs-per-experience", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="Adam's rate, first experience (the whole network, float32)")
    parser.add_argument("--sgd-lr", type=float, default=SGD_LR,
                        help=f"SGD's rate from the second experience on (default {SGD_LR})")
    parser.add_argument("--binary-lr", type=float, default=BINARY_LR,
                        help="SGD's rate for the trainable binary layers' latent weights "
                        f"(default {BINARY_LR})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = ContinualConfig(
        model=args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        strategy=args.strategy,
        experiences=args.experiences,
        replay_size=args.replay_size,
        replay_storage=args.replay_storage,
        qf=args.qf,
        qb=args.qb,
        latent_layer=args.latent_layer,
        epochs_per_experience=args.epochs_per_experience,
        batch_size=args.batch_size,
        lr=args.lr,
        sgd_lr=args.sgd_lr,
        binary_lr=args.binary_lr,
        rounding=args.rounding,
        seed=args.seed,
    )
    as_json = args.format == "json"
    result = run_continual(config, ExperienceLines(sys.stderr if as_json else sys.stdout,
                                                   args.experiences))
    if as_json:
        print(json.dumps(result.summary()))
    else:
        print(
            f"{config.model} {config.strategy} on {config.dataset},"
            f" {config.experiences} experiences"
            f" (latent layer {result.latent_layer}, qf {config.qf}, qb {config.qb}): final average"
            f" accuracy {100 * result.final_average_accuracy:.2f} % ({result.seconds:.1f} s)"
        )
    return 0
