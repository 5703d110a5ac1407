"""The training loop and `python -m trainers train`: determinism, callbacks, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from contract.checksum import file_sha256
from contract.errors import UsageError
from datafiles import DATASETS
from datafiles.canonical import write_canonical
from datafiles.dataset import synthetic
from trainers.cli import main
from trainers.methods import METHODS, make_recipe
from trainers.models import MODELS, build_model
from trainers.optim import build_optimizer
from trainers.train import (
    EpochRecord,
    StepRecord,
    TrainConfig,
    _Plateau,
    load_training_data,
    train,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these models are tiny, and on busy shared cores two threads thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def on_epoch_start(self, epoch: int) -> None:
        self.events.append(("start", epoch))

    def on_step(self, record: StepRecord) -> None:
        self.events.append(("step", record))

    def on_epoch_end(self, record: EpochRecord) -> None:
        self.events.append(("end", record))

    def losses(self) -> list[float]:
        return [record.loss for kind, record in self.events if kind == "step"]


def digits_config(method: str = "standard", seed: int = 0, **changes) -> TrainConfig:
    settings = dict(
        model="mlp",
        dataset="digits",
        recipe=make_recipe(method),
        epochs=2,
        batch_size=100,
        seed=seed,
    )
    return TrainConfig(**(settings | changes))


@pytest.mark.parametrize("method", ["standard", "lowmem"])
def test_same_seed_same_losses(method):
    first, second, other = Recorder(), Recorder(), Recorder()
    result = train(digits_config(method), first)
    again = train(digits_config(method), second)
    train(digits_config(method, seed=1, max_steps=3), other)
    assert first.losses() == second.losses()

    def figures(r):
        return [(e.train_loss, e.train_accuracy, e.test_loss, e.test_accuracy) for e in r.history]

    assert figures(result) == figures(again)
    assert first.losses()[:3] != other.losses()


def test_callbacks_come_in_order_with_sane_records():
    recorder = Recorder()
    result = train(digits_config(epochs=3), recorder)
    kinds = [kind for kind, _ in recorder.events]
    steps_per_epoch = 1437 // 100  # the last incomplete batch is dropped
    assert kinds == (["start"] + ["step"] * steps_per_epoch + ["end"]) * 3
    steps = [record.step for kind, record in recorder.events if kind == "step"]
    assert steps == list(range(1, 3 * steps_per_epoch + 1))
    ends = [record for kind, record in recorder.events if kind == "end"]
    assert [record.epoch for record in ends] == [1, 2, 3]
    for record in ends:
        assert 0.0 <= record.train_accuracy <= 1.0 and 0.0 <= record.test_accuracy <= 1.0
        assert record.steps == steps_per_epoch and record.seconds > 0 and record.lr == 1e-3
    assert result.epochs == 3 and result.steps == 3 * steps_per_epoch
    assert result.test_accuracy == ends[-1].test_accuracy
    # it learns: three epochs on digits are far above the 10 % of guessing
    assert result.test_accuracy > 0.3


def test_first_steps_under_the_ledger_report_the_tensor_peak_and_train_the_same():
    """`tensor_peak_steps`: those steps are real steps (same losses), with their peak."""
    peaks, losses = {}, {}
    for method in ("standard", "lowmem"):
        plain, ledgered = Recorder(), Recorder()
        train(digits_config(method, epochs=1, max_steps=4), plain)
        train(digits_config(method, epochs=1, max_steps=4, tensor_peak_steps=2), ledgered)
        records = [r for kind, r in ledgered.events if kind == "step"]
        assert [r.peak_tensor_bytes is not None for r in records] == [True, True, False, False]
        assert all(r.peak_tensor_bytes is None for kind, r in plain.events if kind == "step")
        assert ledgered.losses() == plain.losses()
        peaks[method] = max(r.peak_tensor_bytes for r in records[:2])
        losses[method] = ledgered.losses()
    model = build_model("mlp", make_recipe("standard"), in_shape=(1, 8, 8))
    assert peaks["standard"] > sum(p.numel() * 4 for p in model.parameters())
    assert peaks["lowmem"] < peaks["standard"] / 2
    with pytest.raises(UsageError, match="tensor peak steps must be >= 0, got -1"):
        train(digits_config(tensor_peak_steps=-1), Recorder())


def test_bop_gamma_and_tau_follow_their_step_schedules_epoch_by_epoch(monkeypatch):
    from trainers.bop import optimizer as bop_module
    from trainers.bop.schedule import StepSchedule

    seen: list[tuple[float, float]] = []
    real_update = bop_module.Bop._update

    def spy(self, name, param, grad, state, fmt, gamma, tau):
        seen.append((gamma, tau))
        return real_update(self, name, param, grad, state, fmt, gamma, tau)

    monkeypatch.setattr(bop_module.Bop, "_update", spy)
    recipe = make_recipe("bop", bop_gamma=1e-3, bop_tau=1e-6)
    config = digits_config(recipe=recipe, epochs=5, batch_size=200,
                           gamma_schedule=StepSchedule(0.1, 2),
                           tau_schedule=StepSchedule(0.5, 3))
    result = train(config)
    expected = [(1e-3, 1e-6), (1e-3, 1e-6), (1e-4, 1e-6), (1e-4, 5e-7), (1e-5, 5e-7)]
    assert np.allclose([config.bop_hyper(e) for e in range(1, 6)], expected, rtol=1e-12)
    steps_per_epoch = len(seen) // 5
    assert np.allclose([seen[(e - 1) * steps_per_epoch] for e in range(1, 6)], expected,
                       rtol=1e-12)
    assert result.summary()["bop"]["gamma_schedule"] == {"factor": 0.1, "every_epochs": 2}
    with pytest.raises(UsageError, match="need the bop optimizer"):
        train(digits_config(gamma_schedule=StepSchedule(0.1, 2)))
    with pytest.raises(UsageError, match=r"decay factor must be in \(0, 1\], got 2"):
        StepSchedule(2, 1)


def test_cli_bop_gamma_tau_and_schedules(capsys):
    code = main(["train", "--model", "mlp", "--dataset", "digits", "--method", "bop",
                 "--epochs", "1", "--max-steps", "2", "--gamma", "1e-3", "--tau", "1e-7",
                 "--gamma-decay", "0.1", "--gamma-decay-every", "100", "--format", "json"])
    assert code == 0
    bop = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bop"]
    assert bop["gamma"] == 1e-3 and bop["tau"] == 1e-7
    assert bop["gamma_schedule"] == {"factor": 0.1, "every_epochs": 100}
    assert bop["tau_schedule"] is None
    code = main(["train", "--model", "mlp", "--dataset", "digits", "--method", "bop",
                 "--tau-decay-every", "3"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --tau-decay and --tau-decay-every go together (got only --tau-decay-every)")


def test_max_steps_stops_early_and_still_evaluates():
    recorder = Recorder()
    result = train(digits_config(epochs=5, max_steps=20), recorder)
    assert result.steps == 20 and result.epochs == 2
    assert [r.steps for r in result.history] == [14, 6]


def test_plateau_halves_lr_after_patience():
    recipe = make_recipe("standard")
    optimizer = build_optimizer(build_model("mlp", recipe, in_shape=(1, 8, 8)), recipe)
    plateau = _Plateau(optimizer, patience=1)
    lrs = []
    for loss in (1.0, 0.9, 0.95, 0.95, 0.95, 0.95):
        plateau.step(loss)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == [1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]


def test_lr_plateau_follows_the_test_loss_in_training():
    result = train(digits_config(epochs=4, lr_plateau=True, plateau_patience=0, batch_size=200))
    expected, best = [1e-3], float("inf")
    for record in result.history[:-1]:
        improved = record.test_loss < best * (1 - 1e-4)  # ReduceLROnPlateau's default threshold
        best = min(best, record.test_loss)
        expected.append(expected[-1] if improved else expected[-1] / 2)
    assert [record.lr for record in result.history] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("batch_size", [0, -5, 1438])
def test_impossible_batch_sizes(batch_size):
    with pytest.raises(UsageError, match=f"batch size {batch_size}"):
        train(digits_config(batch_size=batch_size))


def test_synthetic_data_takes_the_models_input_shape():
    config = TrainConfig(
        model="cnv", dataset="synthetic", recipe=make_recipe("lowmem"), epochs=1, batch_size=10
    )
    data = load_training_data(config)
    assert data.in_shape == (3, 32, 32) and data.train_size == 1000


# ---------------------------------------------------------------- the command line


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["train", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_last_line(capsys):
    code, out, err = run_cli(
        capsys,
        "--model",
        "mlp",
        "--dataset",
        "digits",
        "--method",
        "lowmem",
        "--epochs",
        "2",
        "--batch-size",
        "50",
        "--seed",
        "3",
        "--format",
        "json",
    )
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["epochs"] == 2 and len(summary["history"]) == 2
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["seconds"] > 0
    assert summary["method"] == "lowmem" and summary["switches"]["binary_dw"] is True
    assert summary["test_accuracy"] == summary["history"][-1]["test_accuracy"]
    assert "epoch 2/2" in err and "\r" not in err  # epoch lines on stderr, no progress bar


def test_cli_text_epoch_lines_switches_and_progress(capsys):
    code, out, err = run_cli(
        capsys,
        "--model",
        "mlp",
        "--dataset",
        "digits",
        "--method",
        "lowmem",
        "--disable",
        "po2_grads",
        "--epochs",
        "1",
        "--progress",
    )
    assert code == 0
    assert "epoch 1/1  train loss" in out and "test accuracy" in out.splitlines()[-1]
    assert "\repoch 1/1 [" in err and "14/14" in err


def test_cli_prepared_file_is_accepted(capsys, tmp_path):
    write_canonical(synthetic((1, 28, 28), 40, seed=1), tmp_path / "synthetic.npz")
    code, out, _ = run_cli(
        capsys,
        "--model",
        "mlp",
        "--dataset",
        "synthetic",
        "--data-dir",
        str(tmp_path),
        "--method",
        "standard",
        "--epochs",
        "1",
        "--batch-size",
        "20",
        "--format",
        "json",
    )
    assert code == 0 and json.loads(out.splitlines()[-1])["steps"] == 2


@pytest.mark.parametrize(
    ("option", "value", "choices"),
    [
        ("--model", "vgg", MODELS),
        ("--method", "magic", METHODS),
        ("--dataset", "imagenet", DATASETS),
        ("--optimizer", "lion", ("adam", "sgd", "bop")),
        ("--enable", "no_such_switch", ("binary_dw", "fp16_state")),
    ],
)
def test_cli_unknown_names_exit_2_with_choices(capsys, option, value, choices):
    argv = {"--model": "mlp", "--dataset": "digits", "--method": "standard"} | {option: value}
    code, out, err = run_cli(capsys, *[s for pair in argv.items() for s in pair], "--epochs", "1")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and repr(value) in lines[0]
    assert all(choice in lines[0] for choice in choices)


@pytest.mark.parametrize("batch_size", ["0", "100000"])
def test_cli_impossible_batch_size_exit_2(capsys, batch_size):
    code, _, err = run_cli(
        capsys,
        "--model",
        "mlp",
        "--dataset",
        "digits",
        "--method",
        "lowmem",
        "--batch-size",
        batch_size,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"batch size {batch_size}" in err


def _corrupt_mnist(directory, kind):
    """Tiny valid MNIST IDX files, then one of them broken in the way `kind` says."""
    rng = np.random.default_rng(0)
    for name, shape, magic in [
        ("train-images-idx3-ubyte", (8, 28, 28), 0x803),
        ("train-labels-idx1-ubyte", (8,), 0x801),
        ("t10k-images-idx3-ubyte", (4, 28, 28), 0x803),
        ("t10k-labels-idx1-ubyte", (4,), 0x801),
    ]:
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
        array = rng.integers(0, 10 if len(shape) == 1 else 256, shape, dtype=np.uint8)
        (directory / name).write_bytes(header + array.tobytes())
    path = directory / "train-images-idx3-ubyte"
    if kind == "magic":
        path.write_bytes(b"\x00\x00\x08\x04" + path.read_bytes()[4:])
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:-1])
    else:  # checksum: valid IDX content that no longer matches SHA256SUMS
        (directory / "SHA256SUMS").write_text(f"{file_sha256(path)}  {path.name}\n")
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x55
        path.write_bytes(bytes(data))
    return path


def test_cli_corrupt_data_file_exit_2_naming_it_as_a_process(tmp_path):
    path = _corrupt_mnist(tmp_path, "magic")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainers",
            "train",
            "--model",
            "mlp",
            "--dataset",
            "mnist",
            "--data-dir",
            str(tmp_path),
            "--method",
            "standard",
            "--batch-size",
            "4",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "magic 0x00000804" in lines[0]


@pytest.mark.parametrize("kind", ["truncated", "checksum"])
def test_cli_corrupt_data_file_exit_2_naming_it(capsys, tmp_path, kind):
    path = _corrupt_mnist(tmp_path, kind)
    code, out, err = run_cli(
        capsys,
        "--model",
        "mlp",
        "--dataset",
        "mnist",
        "--data-dir",
        str(tmp_path),
        "--method",
        "standard",
        "--batch-size",
        "4",
    )
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and str(path) in lines[0]
    assert ("sha256" in lines[0]) == (kind == "checksum")


def test_cli_missing_data_dir_exit_2(capsys, tmp_path):
    code, _, err = run_cli(
        capsys,
        "--model",
        "mlp",
        "--dataset",
        "cifar10",
        "--data-dir",
        str(tmp_path / "none"),
        "--method",
        "standard",
    )
    assert code == 2 and str(tmp_path / "none") in err


def test_step_records_carry_positive_times():
    recorder = Recorder()
    train(digits_config(epochs=1, max_steps=3), recorder)
    times = [record.step_time_s for kind, record in recorder.events if kind == "step"]
    assert len(times) == 3 and all(t > 0 for t in times)
    assert np.isfinite(recorder.losses()).all()
