"""Wang et al.'s exact numerics against ours, one variant at a time: accuracy and memory.

Arms (MLP on real MNIST, batch 100, Adam lr 1e-3, every lowmem technique on):

    ours           `lowmem` with none of Wang et al.'s variants
    wang_bn_trick  BN sign trick keeps sgn(x_hat), mean|x_hat|, beta outside, no centring
    wang_po2       power-of-two rounding of dZ in [R-16, R-1], clamping (not dY, [R-15, R])
    wang_fp16      activation gradients float16 (products float32), not bfloat16
    wang_all       all three: Wang et al.'s code's numerics

Each arm and seed trains in its own worker process (one torch thread, the steadiest on
shared cores) and reports the final test accuracy after --epochs; the seed-0 worker first
measures memory on a fresh model of the same recipe over real MNIST batches: the tensor-level
peak (the engine's tensor ledger, `trainers.measure`) and the process's peak-RSS growth
(VmHWM reset after setup, `trainers.procmem`). A variant counts as better when its mean
accuracy beats ours by more than the largest seed-to-seed spread of the two arms and its
tensor peak is not above ours.

    python benchmarks/wang_ablation.py --data-dir ../shared/data/mnist [--epochs 3]
        [--seeds 0 1] [--arms ...] [--format json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MNIST = Path(os.environ.get("BNN_MNIST_DIR", REPO.parent / "shared/data/mnist"))
ARMS = {
    "ours": (),
    "wang_bn_trick": ("wang_bn_trick",),
    "wang_po2": ("wang_po2",),
    "wang_fp16": ("wang_fp16",),
    "wang_all": ("wang_bn_trick", "wang_po2", "wang_fp16"),
}
MEMORY_STEPS = 4  # timed (untracked) steps for the RSS peak; one more under the ledger
MIB = 2**20


def recipe_for(arm: str, lr: float):
    """`lowmem` with the arm's variants on and the others off (ours = none of them)."""
    from contract.vocabulary import LOWMEM_VARIANTS
    from trainers.methods import make_recipe

    chosen = ARMS[arm]
    return make_recipe("lowmem", lr=lr, enable=chosen,
                       disable=tuple(v for v in LOWMEM_VARIANTS if v not in chosen))


def measure_memory(arm: str, dataset, args) -> dict:
    """Tensor-level peak and peak-RSS growth of a few steps on real MNIST batches."""
    import torch

    from datafiles import to_model_input
    from trainers.engine import train_step
    from trainers.measure import measure_training
    from trainers.models import build_model
    from trainers.optim import build_optimizer

    recipe = recipe_for(arm, args.lr)
    torch.manual_seed(0)
    model = build_model("mlp", recipe, in_shape=dataset.in_shape)
    optimizer = build_optimizer(model, recipe)
    images = torch.from_numpy(dataset.train_images)
    labels = torch.from_numpy(dataset.train_labels).long()

    def batch(i: int):
        s = i * args.batch_size
        return to_model_input(images[s:s + args.batch_size]), labels[s:s + args.batch_size]

    result = measure_training(model, optimizer, lambda x, y: train_step(model, optimizer, x, y),
                              batch, MEMORY_STEPS, tensor_steps=1)
    return {"peak_tensor_bytes": result.peak_tensor_bytes,
            "rss_growth_bytes": result.peak_rss_delta_bytes}


def run_arm(arm: str, seed: int, args) -> dict:
    """One worker: (memory, for seed 0) then training; the last stdout line is JSON."""
    import torch

    from datafiles import load_dataset
    from trainers import native
    from trainers.train import TrainConfig, train

    torch.set_num_threads(1)
    dataset = load_dataset("mnist", args.data_dir)
    out = {"arm": arm, "seed": seed, "lowmem_block": native.status()}
    if seed == args.seeds[0]:
        out |= measure_memory(arm, dataset, args)
    config = TrainConfig(model="mlp", dataset="mnist", recipe=recipe_for(arm, args.lr),
                         epochs=args.epochs, batch_size=args.batch_size, seed=seed)
    result = train(config, dataset=dataset)
    out |= {"history": [record.test_accuracy for record in result.history],
            "final_accuracy": result.test_accuracy, "seconds": round(result.seconds, 1)}
    return out


def run_worker(arm: str, seed: int, args) -> dict:
    command = [sys.executable, __file__, "--worker", arm, str(seed), "--data-dir",
               str(args.data_dir), "--epochs", str(args.epochs), "--batch-size",
               str(args.batch_size), "--lr", str(args.lr), "--seeds", *map(str, args.seeds)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:]
        raise SystemExit(f"{arm} seed {seed} failed ({done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], seeds: list[int]) -> dict:
    """Per arm: accuracies by seed, mean, spread, memory, and the verdict against ours."""
    arms: dict[str, dict] = {}
    for run in runs:
        row = arms.setdefault(run["arm"], {"accuracy": {}, "lowmem_block": run["lowmem_block"]})
        row["accuracy"][run["seed"]] = run["final_accuracy"]
        for key in ("peak_tensor_bytes", "rss_growth_bytes"):
            if key in run:
                row[key] = run[key]
    for row in arms.values():
        accs = [row["accuracy"][s] for s in seeds]
        row["mean_accuracy"] = statistics.fmean(accs)
        row["spread"] = max(accs) - min(accs)
    ours = arms.get("ours")
    for arm, row in arms.items():
        if ours is None or arm == "ours":
            continue
        noise = max(row["spread"], ours["spread"])
        row["accuracy_gain_pp"] = round(100 * (row["mean_accuracy"] - ours["mean_accuracy"]), 2)
        row["better"] = (row["mean_accuracy"] - ours["mean_accuracy"] > noise
                         and row["peak_tensor_bytes"] <= ours["peak_tensor_bytes"])
    return arms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_MNIST)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--arms", nargs="+", choices=tuple(ARMS), default=list(ARMS))
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--worker", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_arm(args.worker[0], int(args.worker[1]), args)))
        return 0
    if "ours" not in args.arms:
        args.arms.insert(0, "ours")

    started = time.perf_counter()
    runs = []
    for seed in args.seeds:
        for arm in args.arms:
            runs.append(run_worker(arm, seed, args))
            print(f"{arm} seed {seed}: {100 * runs[-1]['final_accuracy']:.2f} % "
                  f"({runs[-1]['seconds']} s)", file=sys.stderr, flush=True)
    arms = summarise(runs, args.seeds)
    settings = {"epochs": args.epochs, "seeds": args.seeds, "batch_size": args.batch_size,
                "lr": args.lr, "threads": 1, "seconds": round(time.perf_counter() - started)}
    if args.format == "json":
        print(json.dumps(settings | {"arms": arms}))
        return 0
    print(f"MLP, real MNIST, batch {args.batch_size}, Adam lr {args.lr}, {args.epochs} epochs, "
          f"seeds {' '.join(map(str, args.seeds))}, 1 thread; lowmem block: "
          f"{arms['ours']['lowmem_block']}")
    seeds_head = "".join(f" {'seed ' + str(s):>8}" for s in args.seeds)
    print(f"{'arm':>14}{seeds_head} {'mean %':>7} {'vs ours pp':>10} {'tensor peak MiB':>15}"
          f" {'RSS+ MiB':>8} {'better':>6}")
    for arm, row in arms.items():
        accs = "".join(f" {100 * row['accuracy'][s]:8.2f}" for s in args.seeds)
        gain = f"{row['accuracy_gain_pp']:+10.2f}" if arm != "ours" else f"{'-':>10}"
        better = ("yes" if row["better"] else "no") if arm != "ours" else "-"
        print(f"{arm:>14}{accs} {100 * row['mean_accuracy']:7.2f} {gain}"
              f" {row['peak_tensor_bytes'] / MIB:15.3f} {row['rss_growth_bytes'] / MIB:8.1f}"
              f" {better:>6}")
    print(f"({settings['seconds']} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
