"""Agent overhead: what the background memory sampler costs a training step.

Measured two ways in one run, side by side:
1. the cost of one sample (read /proc, build and write the event line to a pipe
   and the mirror file) times the sampling rate = the share of each second the
   sampler takes;
2. median step time of real training steps (MLP, batch 100, synthetic data)
   with the sampler off and on, in alternating blocks.
Exits 1 if the sampler's share exceeds 2 % of step time.

    python benchmarks/agent_overhead.py [--hz 10] [--steps 60] [--blocks 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from contract.jobspec import TelemetrySpec
from device_agent.events import EventWriter
from device_agent.sampler import MemorySampler

LIMIT = 0.02


def sample_cost_s(writer: EventWriter, samples: int = 2000) -> float:
    sampler = MemorySampler(writer, hz=1.0)
    start = time.perf_counter()
    for _ in range(samples):
        sampler.sample()
    return (time.perf_counter() - start) / samples


def step_times(steps: int, model, optimizer, x, y) -> list[float]:
    from trainers.engine import train_step

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(model, optimizer, x, y)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hz", type=float, default=TelemetrySpec().memory_hz)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args()

    import torch

    from trainers.methods import make_recipe
    from trainers.models import build_model
    from trainers.optim import build_optimizer

    read_fd, write_fd = os.pipe()  # the host's end is read by a thread, as the host would
    reader = threading.Thread(target=lambda: all(iter(lambda: os.read(read_fd, 1 << 16), b"")))
    reader.start()
    with tempfile.TemporaryDirectory() as tmp, os.fdopen(write_fd, "w") as pipe:
        writer = EventWriter(pipe, Path(tmp) / "events.jsonl")
        cost_s = sample_cost_s(writer)
        torch.manual_seed(0)
        recipe = make_recipe("standard")
        model = build_model("mlp", recipe, in_shape=(1, 28, 28), num_classes=10)
        optimizer = build_optimizer(model, recipe)
        x = torch.rand(100, 1, 28, 28) * 2 - 1
        y = torch.randint(0, 10, (100,))
        step_times(10, model, optimizer, x, y)  # warm up
        off, on = [], []
        for _ in range(args.blocks):
            off += step_times(args.steps, model, optimizer, x, y)
            sampler = MemorySampler(writer, args.hz)
            sampler.start()
            on += step_times(args.steps, model, optimizer, x, y)
            sampler.stop()
        writer.close()
    reader.join(10)
    os.close(read_fd)
    step_off, step_on = statistics.median(off), statistics.median(on)
    share = cost_s * args.hz  # seconds of sampler work per second of training
    print(f"one memory sample (read + event line): {cost_s * 1e6:.1f} us")
    print(
        f"sampler at {args.hz:g} Hz: {share * 100:.3f} % of each second "
        f"(= of any step time, limit {LIMIT * 100:.0f} %)"
    )
    print(
        f"median step time, sampler off: {step_off * 1e3:.2f} ms, on: {step_on * 1e3:.2f} ms, "
        f"ratio on/off {step_on / step_off:.3f} ({len(off)} steps each, alternating blocks)"
    )
    return 0 if share < LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
