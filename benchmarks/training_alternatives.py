"""What a PyTorch user would pick, against the engine, in one run: step time, tensor-level
peak and whole-process memory of seven ways to train the same binary network.

Arms (batch 100, Adam lr 1e-3, synthetic data in [-1, 1], the same batches for all):

    plain          benchmarks/plain_bnn.py: sign + STE, autograd, float32, torch BatchNorm
    plain-bf16     the same under torch.autocast("cpu", bfloat16)
    plain-ckpt     the same with activation checkpointing (one segment per block)
    plain-bf16-ckpt  both
    standard       the engine's `standard` (Courbariaux & Bengio, L1 batch norm)
    lowmem         the engine's `lowmem` (Wang et al.)
    lowmem-bop     `lowmem`'s switches with Bop (binary weights as packed bits, 32-bit momentum)

Each arm lives in its own worker process (so that its process memory is its own) and the
workers take turns: in every round each arm runs the same number of steps, the order
rotating from round to round, so that load from other processes hits all arms alike. Step
time is the median over rounds of each round's mean step; "x plain" is the median over
rounds of the per-round ratio to `plain` (its spread min..max says how noisy the host was).
"best" is each arm's fastest single step over all rounds and its ratio to plain's: on a
host that other processes load, the figure least disturbed by them (the median is the one
the goals judge, for a quiet machine).

Memory per arm: the tensor-level peak (the engine's tensor ledger, `trainers.measure`, over
one more step), the process's peak-RSS growth (VmHWM, reset through /proc/self/clear_refs
after model, optimizer, data and the engine's machinery are loaded, to its value after the
last timed step) and the absolute peak RSS. The two differ: RSS counts the allocator's
retained and fragmented pages, torch's and the kernels' own buffers (oneDNN scratch, thread
stacks, autograd's graph) and the pages a freed tensor leaves mapped; the ledger counts only
the bytes of live tensor storages.

    python benchmarks/training_alternatives.py [--models mlp cnv binarynet] [--rounds 5]
        [--threads 2] [--format json]

Prints the machine's load average before and after, the thread count and the kernels that
ran; goals checked (issue 21): `standard` within 1.10x of `plain`'s step and not above its
memory; on cnv and binarynet `lowmem` faster than every other arm but lowmem-bop and at most
half the smallest RSS growth of the others; on mlp `lowmem` no slower than `plain`.
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ARMS = ("plain", "plain-bf16", "plain-ckpt", "plain-bf16-ckpt", "standard", "lowmem",
        "lowmem-bop")
ENGINE_ARMS = ("standard", "lowmem", "lowmem-bop")
STEPS_PER_ROUND = {"mlp": 20, "cnv": 4, "binarynet": 1}
MIB = 2**20
STANDARD_TIME_TARGET = 1.10


# ---------------------------------------------------------------------------- the worker
class Worker:
    """One arm in this process: model, optimizer, batches, and its step."""

    def __init__(self, arm: str, model_name: str, batch_size: int, threads: int) -> None:
        import torch

        from trainers.train import load_engine

        torch.set_num_threads(threads)
        load_engine()  # kernels, optimizer stack, ledger machinery: loaded before the baseline
        torch.manual_seed(0)
        self.arm = arm
        shape = {"mlp": (1, 28, 28), "cnv": (3, 32, 32), "binarynet": (3, 32, 32)}[model_name]
        generator = torch.Generator().manual_seed(1)
        self.batches = [(torch.rand(batch_size, *shape, generator=generator) * 2 - 1,
                         torch.randint(0, 10, (batch_size,), generator=generator))
                        for _ in range(4)]
        if arm in ENGINE_ARMS:
            from trainers.engine import train_step
            from trainers.methods import LowMemSwitches, make_recipe
            from trainers.models import build_model
            from trainers.optim import build_optimizer

            recipe = (make_recipe("bop", enable=LowMemSwitches.lowmem().enabled())
                      if arm == "lowmem-bop" else make_recipe(arm, optimizer="adam"))
            self.model = build_model(model_name, recipe, in_shape=shape)
            self.optimizer = build_optimizer(self.model, recipe)
            self.step_fn = lambda x, y: train_step(self.model, self.optimizer, x, y)
        else:
            sys.path.insert(0, str(HERE))
            from plain_bnn import build_plain, plain_step

            self.model = build_plain(model_name)
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
            bf16, ckpt = "bf16" in arm, "ckpt" in arm
            self.step_fn = lambda x, y: plain_step(self.model, self.optimizer, x, y, bf16, ckpt)
        self.steps = 0

    def run(self, count: int) -> tuple[float, float]:
        """Seconds per step over `count` steps, and the fastest single step among them."""
        start = time.perf_counter()
        best = float("inf")
        for _ in range(count):
            x, y = self.batches[self.steps % len(self.batches)]
            began = time.perf_counter()
            self.step_fn(x, y)
            best = min(best, time.perf_counter() - began)
            self.steps += 1
        return (time.perf_counter() - start) / count, best

    def tensor_peak(self) -> int:
        from trainers.measure import track_tensor_peak

        x, y = self.batches[0]
        return track_tensor_peak(self.model, self.optimizer, self.step_fn,
                                 [(x.clone(), y.clone())]).peak_bytes


def worker_main(arm: str, model_name: str, batch_size: int, threads: int) -> int:
    """Serve the parent over stdin/stdout: `run N`, `memory`, `quit`; JSON answers."""
    from trainers.measure import RssWatch

    worker = Worker(arm, model_name, batch_size, threads)
    rss = RssWatch()
    rss.start()  # baseline: before the first step
    print(json.dumps({"ready": True, "baseline_rss_bytes": rss.baseline_bytes}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "run":
            from trainers.threads import governor

            step_s, best_s = worker.run(int(command[1]))
            print(json.dumps({"step_s": step_s, "best_step_s": best_s,
                              "threads": governor.describe(),
                              "reductions": governor.reductions}), flush=True)
        elif command[0] == "memory":
            growth = rss.peak_delta_bytes()  # before the ledger's step, which costs extra
            from trainers import kernels

            print(json.dumps({"rss_growth_bytes": growth,
                              "peak_rss_bytes": rss.baseline_bytes + growth,
                              "rss_method": rss.method,
                              "tensor_peak_bytes": worker.tensor_peak(),
                              "lowmem_block": kernels.describe()["lowmem_block"]}), flush=True)
        else:
            break
    return 0


# ---------------------------------------------------------------------------- the parent
class Arm:
    """A worker process running one arm; `extra_env` adds to its environment."""

    def __init__(self, arm: str, model_name: str, args: argparse.Namespace,
                 extra_env: dict[str, str] | None = None) -> None:
        self.name = arm
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), **(extra_env or {})}
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", arm, model_name, "--batch-size",
             str(args.batch_size), "--threads", str(args.threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.ready = self.ask(None)
        self.step_s: list[float] = []
        self.best_s: list[float] = []
        self.reductions = 0  # times the thread governor went to one thread (engine arms)

    def ask(self, command: str | None) -> dict:
        if command is not None:
            assert self.process.stdin is not None
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.name} died (exit {self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.ask_quit()
        finally:
            self.process.wait(30)

    def ask_quit(self) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def compare_model(model_name: str, args: argparse.Namespace) -> dict:
    arms = {}
    try:
        extra = {} if args.adaptive_threads else {"BNN_ADAPTIVE_THREADS": "0"}
        for name in args.arms:  # started one at a time: their set-up does not overlap
            arms[name] = Arm(name, model_name, args, extra)
        steps = args.steps or STEPS_PER_ROUND[model_name]
        for arm in arms.values():  # warm-up (first steps allocate optimizer state, caches)
            arm.ask("run 1")
        names = list(arms)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                answer = arms[name].ask(f"run {steps}")
                arms[name].step_s.append(answer["step_s"])
                arms[name].best_s.append(answer["best_step_s"])
                arms[name].reductions = answer["reductions"]
            print(f"  {model_name} round {r + 1}/{args.rounds} (load {load_average()})",
                  file=sys.stderr, flush=True)
        memory = {name: arm.ask("memory") for name, arm in arms.items()}
    finally:
        for arm in arms.values():
            arm.close()
    rows = {}
    plain = arms.get("plain")
    for name, arm in arms.items():
        ratios = ([a / b for a, b in zip(arm.step_s, plain.step_s)] if plain else [])
        rows[name] = {
            "step_s": statistics.median(arm.step_s),
            "rounds_s": arm.step_s,
            "x_plain": statistics.median(ratios) if ratios else None,
            "x_plain_min": min(ratios) if ratios else None,
            "x_plain_max": max(ratios) if ratios else None,
            "best_step_s": min(arm.best_s),
            "best_x_plain": min(arm.best_s) / min(plain.best_s) if plain else None,
            "governor_reductions": arm.reductions,
            **memory[name],
        }
    return {"model": model_name, "steps_per_round": steps, "rows": rows,
            "goals": goals(model_name, rows)}


def goals(model_name: str, rows: dict) -> dict:
    """Issue 21's targets, where the arms they compare ran."""
    out: dict[str, bool] = {}
    if "plain" in rows and "standard" in rows:
        std, plain = rows["standard"], rows["plain"]
        out["standard_time_within_1.10x_plain"] = std["x_plain"] <= STANDARD_TIME_TARGET
        out["standard_tensor_peak_not_above_plain"] = (
            std["tensor_peak_bytes"] <= plain["tensor_peak_bytes"])
        out["standard_rss_growth_not_above_plain"] = (
            std["rss_growth_bytes"] <= plain["rss_growth_bytes"])
    if "lowmem" not in rows:
        return out
    low = rows["lowmem"]
    others = {n: r for n, r in rows.items() if n not in ("lowmem", "lowmem-bop")}
    if model_name == "mlp" and "plain" in rows:
        out["lowmem_not_slower_than_plain"] = low["x_plain"] <= 1.0
    elif others:
        out["lowmem_faster_than_all_others"] = low["step_s"] < min(
            r["step_s"] for r in others.values())
        out["lowmem_rss_growth_at_most_half_the_others"] = low["rss_growth_bytes"] <= 0.5 * min(
            r["rss_growth_bytes"] for r in others.values())
    return out


def print_table(result: dict, args: argparse.Namespace) -> None:
    print(f"\n{result['model']} (batch {args.batch_size}, {args.threads} threads, "
          f"{result['steps_per_round']} steps a round, {args.rounds} rounds)")
    print(f"{'arm':>16} {'step ms':>9} {'x plain':>8} {'(min..max)':>13} {'best ms':>8}"
          f" {'x plain':>8} {'tensor MiB':>11} {'RSS+ MiB':>9} {'peak RSS MiB':>13}")
    for name, row in result["rows"].items():
        ratio = "-" if row["x_plain"] is None else f"{row['x_plain']:.2f}"
        spread = ("" if row["x_plain"] is None
                  else f"({row['x_plain_min']:.2f}..{row['x_plain_max']:.2f})")
        best_ratio = "-" if row["best_x_plain"] is None else f"{row['best_x_plain']:.2f}"
        print(f"{name:>16} {row['step_s'] * 1e3:>9.1f} {ratio:>8} {spread:>13}"
              f" {row['best_step_s'] * 1e3:>8.1f} {best_ratio:>8}"
              f" {row['tensor_peak_bytes'] / MIB:>11.2f} {row['rss_growth_bytes'] / MIB:>9.1f}"
              f" {row['peak_rss_bytes'] / MIB:>13.1f}")
    throttled = {name: row["governor_reductions"] for name, row in result["rows"].items()
                 if row["governor_reductions"]}
    if throttled:  # what produced the figures: some engine steps ran on one thread
        print("  thread governor went to one thread (times): " + ", ".join(
            f"{name} {count}" for name, count in throttled.items())
              + " (trainers/threads.py; --no-adaptive-threads keeps the count)")
    for goal, ok in result["goals"].items():
        print(f"  {goal}: {'yes' if ok else 'NO'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnv", "binarynet"],
                        choices=("mlp", "cnv", "binarynet"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=0,
                        help="steps per arm per round (default: mlp 20, cnv 4, binarynet 1)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per arm (2)")
    parser.add_argument("--no-adaptive-threads", dest="adaptive_threads", action="store_false",
                        help="engine arms keep their thread count under contention "
                        "(BNN_ADAPTIVE_THREADS=0; see trainers/threads.py)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--worker", nargs=2, metavar=("ARM", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker[0], args.worker[1], args.batch_size, args.threads)
    if args.rounds < 1 or args.batch_size < 2 or args.threads < 1 or args.steps < 0:
        parser.error("--rounds and --threads must be >= 1, --batch-size >= 2, --steps >= 0")

    from trainers import kernels

    info = kernels.describe()
    before = load_average()
    print(f"load average before: {before}; cpu {info['cpu_capability']}, lowmem block "
          f"{info['lowmem_block']}, torch {info['torch_version']}", file=sys.stderr)
    results = []
    for model_name in args.models:
        result = compare_model(model_name, args)
        results.append(result)
        if args.format == "text":
            print_table(result, args)
    after = load_average()
    if args.format == "json":
        print(json.dumps({"load_before": before, "load_after": after, "threads": args.threads,
                          "kernels": info, "results": results}))
    else:
        print(f"\nload average before {before}, after {after} (1, 5, 15 min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
