"""The papers' CIFAR-10 / SVHN recipes (CNV and BinaryNet at batch 100, standard and lowmem)
run unchanged on a user's own copy of those data sets: files in their published formats
(CIFAR-10 binary batches, SVHN MAT-files) go through `harness data prepare NAME --from PATH`
and the prepared file straight into `python -m trainers train`. The files here are small
and synthetic; only their format is the real one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness.cli import main as harness_main
from trainers.cli import main as trainers_main

RECORDS_PER_BATCH = 20  # 5 training batches: 100 samples, one batch of the papers' 100
RNG = np.random.default_rng(17)


def write_cifar10_batches(directory: Path) -> None:
    """CIFAR-10's binary version: records of 1 label byte + 3072 pixel bytes (R, G, B planes)."""
    directory.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = RNG.integers(0, 10, (RECORDS_PER_BATCH, 1), dtype=np.uint8)
        pixels = RNG.integers(0, 256, (RECORDS_PER_BATCH, 3 * 32 * 32), dtype=np.uint8)
        (directory / name).write_bytes(np.concatenate([labels, pixels], axis=1).tobytes())


def write_svhn_mat_files(directory: Path) -> None:
    """SVHN's format 2: X (32, 32, 3, N) uint8 and y (N, 1) with labels 1..10 (10 = digit 0)."""
    scipy_io = pytest.importorskip("scipy.io")
    directory.mkdir(parents=True)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        n = 5 * RECORDS_PER_BATCH
        scipy_io.savemat(directory / name, {
            "X": RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
            "y": RNG.integers(1, 11, (n, 1)).astype(np.float64),
        })


WRITERS = {"cifar10": write_cifar10_batches, "svhn": write_svhn_mat_files}


@pytest.mark.parametrize(("dataset", "model", "method"), [
    ("cifar10", "cnv", "lowmem"),
    ("cifar10", "cnv", "standard"),
    ("cifar10", "binarynet", "lowmem"),
    ("svhn", "cnv", "lowmem"),
    ("svhn", "binarynet", "standard"),
])
def test_paper_recipe_runs_on_a_prepared_user_copy(tmp_path, capsys, dataset, model, method):
    WRITERS[dataset](tmp_path / "raw")
    assert harness_main(["data", "prepare", dataset, "--from", str(tmp_path / "raw"),
                         "--out", str(tmp_path / "data"), "--format", "json"]) == 0
    prepared = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert prepared["train_size"] == 100 and Path(prepared["path"]).name == f"{dataset}.npz"
    code = trainers_main(["train", "--model", model, "--dataset", dataset,
                          "--data-dir", prepared["path"], "--method", method,
                          "--batch-size", "100", "--epochs", "1", "--format", "json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["model"], summary["dataset"], summary["method"]) == (model, dataset, method)
    assert summary["batch_size"] == 100 and summary["steps"] == 1
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and np.isfinite(summary["test_loss"])
