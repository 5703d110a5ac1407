"""CWR* with 1-bit latent replay against naive fine-tuning, and 8/16-bit hybrid quantisation
against the unquantised reference, on real MNIST split into 5 experiences of 2 classes.

Same budget for every row: the MLP backbone, latent layer, epochs per experience, batch
size, learning rate and seeds; `naive` only drops consolidation and replay. Each row is
averaged over the seeds. Prints the table, the two checks of issue 4, and (last line)
one JSON object.

    python benchmarks/continual_mnist.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from datafiles import load_dataset
from trainers.continual.runner import ContinualConfig, ContinualResult, run_continual

MIN_CWR_GAIN_POINTS = 20.0  # CWR* (qf 8 / qb 16) over naive (qf 8 / qb 16)
MIN_CWR_ACCURACY_POINTS = 80.0  # CWR* (qf 8 / qb 16) final average accuracy (issue 17)
MAX_QUANTISATION_LOSS_POINTS = 2.0  # CWR* 32/32 minus CWR* 8/16
ROWS = (("cwr", 32, 32), ("cwr", 8, 16), ("naive", 8, 16))


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


def checks(rows: dict[tuple, Row]) -> dict[str, float]:
    cwr_q, cwr_ref, naive_q = rows["cwr", 8, 16], rows["cwr", 32, 32], rows["naive", 8, 16]
    return {
        "cwr_accuracy_points": cwr_q.mean_points,
        "cwr_gain_points": cwr_q.mean_points - naive_q.mean_points,
        "quantisation_loss_points": cwr_ref.mean_points - cwr_q.mean_points,
    }


def print_table(rows: dict[tuple, Row]) -> None:
    header = (f"{'row':<18}{'final avg acc %':>16}{'per seed %':>22}   "
              f"{'acc after each experience % (seed mean)':<42}{'buffer B':>9}"
              f"{'trainable B':>12}{'s/run':>7}")
    print(header)
    for row in rows.values():
        last = row.results[0].experiences[-1]
        seconds = np.mean([r.seconds for r in row.results])
        per_seed = " ".join(f"{100 * a:.1f}" for a in row.accuracies)
        per_exp = " ".join(f"{v:.1f}" for v in row.per_experience_points())
        print(f"{row.name:<18}{row.mean_points:>16.2f}{per_seed:>22}   {per_exp:<42}"
              f"{last.buffer_bytes:>9}{last.trainable_bytes:>12}{seconds:>7.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="the MNIST IDX files")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs-per-experience", type=int, default=1)
    parser.add_argument("--replay-size", type=int, default=1500)
    parser.add_argument("--latent-layer", type=int)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the MLP gains nothing from more)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run_rows(args.data_dir, args.seeds, args.epochs_per_experience, args.replay_size,
                    args.latent_layer)
    figures = checks(rows)
    print_table(rows)
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
        **figures,
    }))
    return 0 if accuracy_ok and gain_ok and quant_ok else 1


if __name__ == "__main__":
    sys.exit(main())
