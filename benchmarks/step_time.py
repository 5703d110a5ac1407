"""Step time of `standard` and `lowmem` side by side in one run, plus the memory ratios.

Issue 10: at batch 100, `lowmem`'s median step time must be at most 0.67x `standard`'s for
mlp, cnv and binarynet, while issue 2's tensor-level peak reductions still hold (>= 2.5x
mlp, 3.5x cnv, 3.3x binarynet). The methods' rounds are interleaved (standard, lowmem,
lowmem, standard, ...) so that load from other processes hits both alike; a round times as
many back-to-back steps as fill half a second; the ratio is the median of the per-round
ratios, and its spread (min..max over rounds) says how noisy the host was.

    python benchmarks/step_time.py [--models mlp cnv binarynet] [--repeats 7] [--with-fp32]

Prints the CPU capability PyTorch reports, the thread counts and the kernel choice
(`trainers.kernels.describe()`); with --format json the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from datafiles import synthetic, to_model_input
from trainers import kernels
from trainers.engine import train_step
from trainers.measure import track_tensor_peak
from trainers.methods import make_recipe
from trainers.models import build_model
from trainers.optim import build_optimizer

ROUND_SECONDS = 0.5  # at least this long per timed round (several steps of a small model)
WARMUP_STEPS = 3
TIME_TARGET = 0.67  # lowmem step time / standard step time, at most
MEMORY_TARGETS = {"mlp": 2.5, "cnv": 3.5, "binarynet": 3.3}  # standard peak / lowmem peak


@dataclass
class Variant:
    """One column of the comparison: a method and the kernels its lowmem blocks use."""

    label: str
    method: str
    compute: str = "int8"


@dataclass
class ModelResult:
    model: str
    step_s: dict[str, list[float]]
    median_s: dict[str, float]
    ratio: float  # median over rounds of lowmem / standard
    ratio_min: float
    ratio_max: float
    peak_tensor_bytes: dict[str, int]
    memory_ratio: float | None
    time_ok: bool | None  # None: no target for this model
    memory_ok: bool | None


def batches(in_shape: tuple[int, ...], batch_size: int, count: int, seed: int = 0):
    data = synthetic(in_shape, batch_size * count, 10, seed=seed, n_test=1)
    x = to_model_input(torch.from_numpy(data.train_images))
    y = torch.from_numpy(data.train_labels).long()
    # each batch owns its storage, so that a dropped batch frees its memory
    return [(x[i * batch_size:(i + 1) * batch_size].clone(),
             y[i * batch_size:(i + 1) * batch_size].clone()) for i in range(count)]


class Trainer:
    """A model and optimizer for one variant, and its step under the variant's kernels."""

    def __init__(self, model_name: str, variant: Variant, seed: int) -> None:
        torch.manual_seed(seed)
        recipe = make_recipe(variant.method)
        self.variant = variant
        self.model = build_model(model_name, recipe)
        self.optimizer = build_optimizer(self.model, recipe)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        kernels.set_compute(self.variant.compute)
        return train_step(self.model, self.optimizer, x, y)

    def timed_steps(self, x: torch.Tensor, y: torch.Tensor, count: int) -> float:
        """Mean seconds per step over `count` back-to-back steps."""
        start = time.perf_counter()
        for _ in range(count):
            self.step(x, y)
        return (time.perf_counter() - start) / count


def tensor_peak(model_name: str, variant: Variant, batch_size: int, seed: int) -> int:
    trainer = Trainer(model_name, variant, seed)
    data = batches(trainer.model.in_shape, batch_size, 2, seed=seed + 1)
    # optimizer state exists before the measured step, as in training; the warm-up batch is
    # dropped first, so that only the measured batch is live (as in `trainers measure`)
    trainer.step(*data.pop(0))
    return track_tensor_peak(trainer.model, trainer.optimizer, trainer.step, data).peak_bytes


def run_model(model_name: str, variants: list[Variant], batch_size: int, repeats: int,
              seed: int, memory: bool, log) -> ModelResult:
    trainers = [Trainer(model_name, v, seed) for v in variants]
    data = batches(trainers[0].model.in_shape, batch_size, 2, seed=seed)
    # Warm-up (first-call allocations, optimizer state), which also sizes the rounds: each
    # times enough steps to fill ROUND_SECONDS, so that a 10 ms step is not timed alone.
    slowest = max(t.timed_steps(*data[0], WARMUP_STEPS) for t in trainers)
    steps = max(1, math.ceil(ROUND_SECONDS / slowest))
    times: dict[str, list[float]] = {v.label: [] for v in variants}
    for r in range(repeats):
        x, y = data[r % len(data)]
        order = trainers if r % 2 == 0 else trainers[::-1]
        for t in order:
            times[t.variant.label].append(t.timed_steps(x, y, steps))
        log(f"  {model_name} round {r + 1}/{repeats}: " + "  ".join(
            f"{label} {ts[-1] * 1e3:.0f} ms" for label, ts in times.items()))
    rounds = [low / std for std, low in zip(times["standard"], times["lowmem"])]
    peaks: dict[str, int] = {}
    if memory:
        for v in variants[:2]:
            log(f"  {model_name} tensor-level peak of {v.label} ...")
            peaks[v.label] = tensor_peak(model_name, v, batch_size, seed)
    memory_ratio = peaks["standard"] / peaks["lowmem"] if peaks else None
    ratio = statistics.median(rounds)
    target = MEMORY_TARGETS.get(model_name)
    return ModelResult(
        model=model_name,
        step_s=times,
        median_s={label: statistics.median(ts) for label, ts in times.items()},
        ratio=ratio,
        ratio_min=min(rounds),
        ratio_max=max(rounds),
        peak_tensor_bytes=peaks,
        memory_ratio=memory_ratio,
        time_ok=ratio <= TIME_TARGET if model_name in MEMORY_TARGETS else None,
        memory_ok=None if memory_ratio is None or target is None else memory_ratio >= target,
    )


def verdict(ok: bool | None) -> str:
    """yes / NO against a target; '-' where the issues set none (resnete18)."""
    return "-" if ok is None else "yes" if ok else "NO"


def format_table(results: list[ModelResult], info: dict, batch_size: int, repeats: int) -> str:
    labels = list(results[0].median_s)
    lines = [
        f"batch {batch_size}, {repeats} interleaved rounds; cpu capability "
        f"{info['cpu_capability']}, torch threads {info['torch_threads']}, elementwise threads "
        f"{info['elementwise_threads']}, lowmem block {info['lowmem_block']}, kernels "
        f"{info['compute']} forward / {info['backward_dtype']} backward, "
        f"torch {info['torch_version']}",
        "",
        f"{'model':<10}" + "".join(f"{label + ' ms':>16}" for label in labels)
        + f"{'lowmem/std':>12} {'(min..max)':>13} {'<=0.67':>7}"
        + f"{'peak std MiB':>14}{'peak low MiB':>14}{'std/low':>9}{'target':>8}",
    ]
    for r in results:
        row = f"{r.model:<10}" + "".join(f"{r.median_s[label] * 1e3:>16.1f}" for label in labels)
        row += (f"{r.ratio:>12.2f} {f'({r.ratio_min:.2f}..{r.ratio_max:.2f})':>13}"
                f" {verdict(r.time_ok):>6}")
        if r.memory_ratio is not None:
            target = MEMORY_TARGETS.get(r.model)
            row += (f"{r.peak_tensor_bytes['standard'] / 2**20:>14.2f}"
                    f"{r.peak_tensor_bytes['lowmem'] / 2**20:>14.2f}{r.memory_ratio:>8.2f}x"
                    f"{f'>={target}' if target else '-':>6} {verdict(r.memory_ok)}")
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnv", "binarynet"])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-fp32", action="store_true",
                        help="also time lowmem with the fp32 kernels (the int8 path's gain)")
    parser.add_argument("--no-memory", action="store_true", help="skip the tensor-level peaks")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    for name in args.models:
        if name not in MEMORY_TARGETS and name != "resnete18":
            print(f"error: --models: unknown model {name!r}; choices: "
                  f"{', '.join([*MEMORY_TARGETS, 'resnete18'])}", file=sys.stderr)
            return 2
    if args.batch_size < 1 or args.repeats < 1:
        print(f"error: --batch-size and --repeats must be positive, got {args.batch_size}, "
              f"{args.repeats}", file=sys.stderr)
        return 2

    variants = [Variant("standard", "standard"), Variant("lowmem", "lowmem", "int8")]
    if args.with_fp32:
        variants.append(Variant("lowmem-fp32", "lowmem", "fp32"))
    default_compute = kernels.get_compute()
    info = kernels.describe()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log(f"cpu capability {info['cpu_capability']}, torch threads {info['torch_threads']}")
    results = []
    try:
        for name in args.models:
            results.append(run_model(name, variants, args.batch_size, args.repeats, args.seed,
                                     not args.no_memory, log))
    finally:
        kernels.set_compute(default_compute)
    print(format_table(results, info, args.batch_size, args.repeats))
    if args.format == "json":
        print(json.dumps({"kernels": info, "batch_size": args.batch_size,
                          "repeats": args.repeats, "time_target": TIME_TARGET,
                          "memory_targets": MEMORY_TARGETS,
                          "results": [asdict(r) for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
