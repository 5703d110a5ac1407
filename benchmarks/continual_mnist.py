"""CWR* with 1-bit latent replay against naive fine-tuning, and hybrid quantisation (weights
held at q_b bits) against the unquantised reference, on real MNIST split into 5 experiences
of 2 classes, with the memory of the trained part beside the accuracy.

Same budget for every row: the MLP backbone, latent layer, epochs per experience, batch
size, learning rates and seeds; `naive` only drops consolidation and replay. Each row is
averaged over the seeds. Memory, per q_f/q_b: the ledger (bytes of the trainable part's
tensors as held between steps: weights as q_b-bit codes with scale and zero point, batch-norm
statistics; SGD keeps no state) and, measured in a fresh process per q_f/q_b, the RSS the
trainable part holds (resident: RSS with it minus RSS after deleting it) and the peak RSS
above the process without it over 20 SGD steps on MNIST latents (batches of 200 as in the
run); glibc's mmap threshold is fixed at 16 KiB there so that freed tensors leave the RSS.
Prints the table, the checks of issues 4 and 17, and (last line) one JSON object.

    python benchmarks/continual_mnist.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datafiles import load_dataset, to_model_input
from trainers.continual.runner import ContinualConfig, ContinualResult, ContinualRun, run_continual
from trainers.continual.scenario import class_incremental

MIN_CWR_GAIN_POINTS = 20.0  # CWR* (qf 8 / qb 16) over naive (qf 8 / qb 16)
MIN_CWR_ACCURACY_POINTS = 80.0  # CWR* (qf 8 / qb 16) final average accuracy (issue 17)
MAX_QUANTISATION_LOSS_POINTS = 2.0  # CWR* 32/32 minus CWR* 8/16
ROWS = (("cwr", 32, 32), ("cwr", 8, 16), ("cwr", 8, 8), ("cwr", 8, 4), ("naive", 8, 16))
PROBE_STEPS = 20
PROBE_BATCH = 200  # 100 new latents + 100 replayed, as in the run
MMAP_THRESHOLD_BYTES = 16384


@dataclass
class Row:
    strategy: str
    qf: int
    qb: int
    results: list[ContinualResult]

    @property
    def name(self) -> str:
        return f"{self.strategy} qf{self.qf}/qb{self.qb}"

    @property
    def accuracies(self) -> list[float]:
        return [r.final_average_accuracy for r in self.results]

    @property
    def mean_points(self) -> float:
        return 100 * float(np.mean(self.accuracies))

    def per_experience_points(self) -> list[float]:
        """Accuracy on the classes seen so far after each experience, mean over seeds."""
        table = [[e.test_accuracy for e in r.experiences] for r in self.results]
        return [100 * float(v) for v in np.mean(table, axis=0)]


def run_rows(data_dir: str, seeds: list[int], epochs: int, replay_size: int,
             latent_layer: int | None, progress=sys.stderr) -> dict[tuple, Row]:
    dataset = load_dataset("mnist", data_dir)
    rows = {}
    for strategy, qf, qb in ROWS:
        row = Row(strategy, qf, qb, [])
        for seed in seeds:
            config = ContinualConfig(
                model="mlp", dataset="mnist", strategy=strategy, experiences=5,
                replay_size=replay_size, qf=qf, qb=qb, latent_layer=latent_layer,
                epochs_per_experience=epochs, batch_size=100, seed=seed,
            )
            start = time.perf_counter()
            result = run_continual(config, dataset=dataset)
            row.results.append(result)
            print(f"{row.name} seed {seed}: final average accuracy "
                  f"{100 * result.final_average_accuracy:.2f} % "
                  f"({time.perf_counter() - start:.0f} s)", file=progress, flush=True)
        rows[(strategy, qf, qb)] = row
    return rows


def _vm_bytes(field: str) -> int:
    """A `Vm*` line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _settle() -> None:
    """Collect garbage and hand freed heap pages back (glibc), so that RSS is what is live."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def probe_memory(data_dir: str, qf: int, qb: int, latent_layer: int | None) -> dict[str, int]:
    """Run in a fresh process: the RSS the trainable part holds at q_f/q_b and the peak RSS
    of its SGD steps, both above the same process without it."""
    from trainers.engine import train_step

    torch.set_num_threads(1)
    dataset = load_dataset("mnist", data_dir)
    config = ContinualConfig(model="mlp", dataset="mnist", qf=qf, qb=qb,
                             latent_layer=latent_layer)
    run = ContinualRun(config, class_incremental(dataset, config.experiences, config.seed), None)
    run.start_on_device()  # the values after pre-training would not change a byte count
    n = (PROBE_STEPS + 1) * PROBE_BATCH
    with torch.no_grad():
        images = torch.from_numpy(dataset.train_images[:n].copy())
        x = run.parts.lower.eval()(to_model_input(images))
    y = torch.from_numpy(dataset.train_labels[:n])
    model = run.parts.trainable()
    train_step(model, run.optimizer, x[:PROBE_BATCH], y[:PROBE_BATCH])  # torch's lazy set-up
    _settle()
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) here
    for s in range(1, PROBE_STEPS + 1):
        batch = slice(s * PROBE_BATCH, (s + 1) * PROBE_BATCH)
        train_step(model, run.optimizer, x[batch], y[batch])
    run.optimizer.zero_grad(set_to_none=True)  # gradients are a step's, not held
    _settle()
    peak, with_part = _vm_bytes("VmHWM"), _vm_bytes("VmRSS")
    del model
    run.parts.upper = run.parts.head = run.optimizer = None
    _settle()
    without = _vm_bytes("VmRSS")
    return {"resident_bytes": with_part - without, "peak_growth_bytes": peak - without}


def measure_memory(data_dir: str, qf: int, qb: int, latent_layer: int | None) -> dict[str, int]:
    """`probe_memory` in a fresh interpreter (one torch thread, fixed mmap threshold)."""
    command = [sys.executable, __file__, "--data-dir", data_dir, "--probe", str(qf), str(qb)]
    if latent_layer is not None:
        command += ["--latent-layer", str(latent_layer)]
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES),
                        "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def checks(rows: dict[tuple, Row]) -> dict[str, float]:
    cwr_q, cwr_ref, naive_q = rows["cwr", 8, 16], rows["cwr", 32, 32], rows["naive", 8, 16]
    return {
        "cwr_accuracy_points": cwr_q.mean_points,
        "cwr_gain_points": cwr_q.mean_points - naive_q.mean_points,
        "quantisation_loss_points": cwr_ref.mean_points - cwr_q.mean_points,
    }


def print_table(rows: dict[tuple, Row], memory: dict[tuple, dict[str, int]]) -> None:
    header = (f"{'row':<18}{'final avg acc %':>16}{'per seed %':>22}   "
              f"{'acc after each experience % (seed mean)':<42}{'buffer B':>9}"
              f"{'trainable B':>12}{'RSS held B':>12}{'RSS peak B':>12}{'s/run':>7}")
    print(header)
    for row in rows.values():
        last = row.results[0].experiences[-1]
        seconds = np.mean([r.seconds for r in row.results])
        per_seed = " ".join(f"{100 * a:.1f}" for a in row.accuracies)
        per_exp = " ".join(f"{v:.1f}" for v in row.per_experience_points())
        rss = memory[row.qf, row.qb]
        print(f"{row.name:<18}{row.mean_points:>16.2f}{per_seed:>22}   {per_exp:<42}"
              f"{last.buffer_bytes:>9}{last.trainable_bytes:>12}{rss['resident_bytes']:>12}"
              f"{rss['peak_growth_bytes']:>12}{seconds:>7.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="the MNIST IDX files")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs-per-experience", type=int, default=1)
    parser.add_argument("--replay-size", type=int, default=1500)
    parser.add_argument("--latent-layer", type=int)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the MLP gains nothing from more)")
    parser.add_argument("--probe", type=int, nargs=2, metavar=("QF", "QB"),
                        help=argparse.SUPPRESS)  # the fresh process of measure_memory
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe_memory(args.data_dir, *args.probe, args.latent_layer)))
        return 0
    torch.set_num_threads(args.threads)
    rows = run_rows(args.data_dir, args.seeds, args.epochs_per_experience, args.replay_size,
                    args.latent_layer)
    memory = {(qf, qb): measure_memory(args.data_dir, qf, qb, args.latent_layer)
              for _, qf, qb in ROWS}
    figures = checks(rows)
    print_table(rows, memory)
    reference = rows["cwr", 32, 32].results[0].experiences[-1].trainable_bytes
    for _, qf, qb in ROWS[1:4]:
        held = rows["cwr", qf, qb].results[0].experiences[-1].trainable_bytes
        rss = memory[qf, qb]["resident_bytes"] / memory[32, 32]["resident_bytes"]
        print(f"trainable part at q_b {qb}: {reference / held:.2f}x smaller than float32 by the "
              f"ledger, {1 / rss:.2f}x by the RSS it holds")
    accuracy_ok = figures["cwr_accuracy_points"] >= MIN_CWR_ACCURACY_POINTS
    gain_ok = figures["cwr_gain_points"] >= MIN_CWR_GAIN_POINTS
    quant_ok = figures["quantisation_loss_points"] <= MAX_QUANTISATION_LOSS_POINTS
    print(f"CWR* (qf 8 / qb 16) final average accuracy {figures['cwr_accuracy_points']:.2f} %"
          f" (need >= {MIN_CWR_ACCURACY_POINTS:.0f}): {'ok' if accuracy_ok else 'FAIL'}")
    print(f"CWR* beats naive by {figures['cwr_gain_points']:.2f} points "
          f"(need >= {MIN_CWR_GAIN_POINTS:.0f}): {'ok' if gain_ok else 'FAIL'}")
    print(f"qf 8 / qb 16 loses {figures['quantisation_loss_points']:.2f} points against 32/32 "
          f"(allowed <= {MAX_QUANTISATION_LOSS_POINTS:.0f}): {'ok' if quant_ok else 'FAIL'}")
    print(json.dumps({
        "rows": {row.name: {"final_average_accuracy": row.mean_points / 100,
                            "per_seed": row.accuracies} for row in rows.values()},
        "seeds": args.seeds,
        "epochs_per_experience": args.epochs_per_experience,
        "replay_size": args.replay_size,
        "latent_layer": rows["cwr", 8, 16].results[0].latent_layer,
        "trainable_bytes": {row.name: row.results[0].experiences[-1].trainable_bytes
                            for row in rows.values()},
        "rss": {f"qf{qf}/qb{qb}": m for (qf, qb), m in memory.items()},
        **figures,
    }))
    return 0 if accuracy_ok and gain_ok and quant_ok else 1


if __name__ == "__main__":
    sys.exit(main())
