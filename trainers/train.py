"""The training loop: one model, one recipe, one data set, epochs of train steps and evaluation.

The CLI, the device agent and the benchmarks all train through `train()`; what they need
to show or stream they get from callbacks (`on_epoch_start`, `on_step`, `on_epoch_end`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from contract.errors import UsageError, unknown_choice
from datafiles import Dataset, as_tensor, load_dataset, to_model_input
from trainers.bop.schedule import StepSchedule
from trainers.methods import Recipe

EVAL_CHUNK = 1000  # samples converted to float at a time when evaluating
TRAIN_EVAL_SAMPLES = 10000  # training accuracy is measured on this many fixed training samples


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (same config + seed = same losses)."""

    model: str
    dataset: str
    recipe: Recipe
    epochs: int
    batch_size: int
    seed: int = 0
    data_dir: str | Path | None = None
    max_steps: int | None = (
        None  # stop after this many steps in total (the epoch is still evaluated)
    )
    lr_plateau: bool = False  # halve the learning rate when the test loss stops improving
    plateau_patience: int = 5  # epochs without improvement before halving
    eval_batch_size: int = 500
    # the first N steps run under the tensor ledger (slower) and report their tensor-level peak
    tensor_peak_steps: int = 0
    # Bop: schedules of the recipe's gamma and tau, per epoch (None = constant)
    gamma_schedule: StepSchedule | None = None
    tau_schedule: StepSchedule | None = None

    def bop_hyper(self, epoch: int) -> tuple[float, float]:
        """Bop's (gamma, tau) during `epoch` (1-based)."""
        gamma, tau = self.recipe.bop_gamma, self.recipe.bop_tau
        if self.gamma_schedule is not None:
            gamma = self.gamma_schedule.value(gamma, epoch)
        if self.tau_schedule is not None:
            tau = self.tau_schedule.value(tau, epoch)
        return gamma, tau


@dataclass(frozen=True)
class StepRecord:
    epoch: int  # 1-based
    step: int  # 1-based, counted over the whole run
    loss: float
    step_time_s: float  # the engine's train_step alone (forward, backward, update)
    # bytes of tensors live at the step's peak, for the steps run under the tensor ledger
    peak_tensor_bytes: int | None = None


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    steps: int  # steps taken in this epoch
    train_loss: float  # mean of this epoch's step losses
    train_accuracy: float  # fraction 0..1, eval mode, on up to TRAIN_EVAL_SAMPLES fixed samples
    test_loss: float
    test_accuracy: float  # fraction 0..1
    seconds: float  # wall time of the epoch including evaluation
    lr: float  # learning rate the epoch trained with


@dataclass
class TrainResult:
    config: TrainConfig
    history: list[EpochRecord]
    steps: int
    seconds: float
    model: torch.nn.Module = field(repr=False, compare=False)

    @property
    def epochs(self) -> int:
        return len(self.history)

    @property
    def test_accuracy(self) -> float:
        return self.history[-1].test_accuracy if self.history else float("nan")

    @property
    def test_loss(self) -> float:
        return self.history[-1].test_loss if self.history else float("nan")

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures of the run (the CLI's last line with --format json)."""
        recipe = self.config.recipe
        bop = {}
        if recipe.optimizer == "bop":
            bop = {"bop": {
                "momentum_format": recipe.momentum_format,
                "gamma": recipe.bop_gamma,
                "tau": recipe.bop_tau,
                "gamma_schedule": asdict(self.config.gamma_schedule)
                if self.config.gamma_schedule else None,
                "tau_schedule": asdict(self.config.tau_schedule)
                if self.config.tau_schedule else None,
            }}
        return {
            "model": self.config.model,
            "dataset": self.config.dataset,
            "method": recipe.method,
            "optimizer": recipe.optimizer,
            "switches": asdict(recipe.switches),
            "lr": recipe.lr,
            "batch_size": self.config.batch_size,
            "seed": self.config.seed,
            "epochs": self.epochs,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss,
            "history": [asdict(record) for record in self.history],
            **bop,
        }


def check_config(config: TrainConfig, dataset: Dataset | None = None) -> None:
    """Refuse impossible settings with a one-line UsageError before any work starts."""
    from trainers.models import MODELS

    if config.model not in MODELS:
        raise unknown_choice("model", config.model, MODELS)
    if config.epochs < 1:
        raise UsageError(f"epochs must be >= 1, got {config.epochs}")
    if config.batch_size < 1:
        raise UsageError(f"batch size {config.batch_size} is impossible; it must be >= 1")
    if config.max_steps is not None and config.max_steps < 1:
        raise UsageError(f"max steps must be >= 1, got {config.max_steps}")
    if config.tensor_peak_steps < 0:
        raise UsageError(f"tensor peak steps must be >= 0, got {config.tensor_peak_steps}")
    if config.plateau_patience < 0:
        raise UsageError(f"plateau patience must be >= 0, got {config.plateau_patience}")
    if config.eval_batch_size < 1:
        raise UsageError(f"eval batch size must be >= 1, got {config.eval_batch_size}")
    if (config.gamma_schedule or config.tau_schedule) and config.recipe.optimizer != "bop":
        raise UsageError("gamma and tau schedules need the bop optimizer")
    if dataset is not None and config.batch_size > dataset.train_size:
        raise UsageError(
            f"batch size {config.batch_size} is larger than the {dataset.train_size} "
            f"training samples of {dataset.name!r}"
        )


def load_training_data(config: TrainConfig) -> Dataset:
    """The configured data set; synthetic data takes the model's default input shape."""
    in_shape = (1, 28, 28)
    if config.dataset == "synthetic":
        from trainers.models import default_input_shape

        in_shape = tuple(default_input_shape(config.model))
    return load_dataset(config.dataset, config.data_dir, in_shape=in_shape, seed=config.seed)


def evaluate_split(model: torch.nn.Module, images, labels, batch_size: int) -> tuple[float, float]:
    """Mean loss and accuracy over uint8 `images`, converted to float a chunk at a time."""
    from trainers.engine import evaluate

    total = images.shape[0]
    loss_sum = correct = 0.0
    for start in range(0, total, EVAL_CHUNK):
        x = to_model_input(as_tensor(images[start : start + EVAL_CHUNK]))
        y = as_tensor(labels[start : start + EVAL_CHUNK])
        loss, accuracy = evaluate(model, x, y, batch_size)
        loss_sum += loss * x.shape[0]
        correct += accuracy * x.shape[0]
    return loss_sum / total, correct / total


class _Plateau:
    """Halve every learning rate when the test loss has not improved for `patience` epochs."""

    def __init__(self, optimizer: torch.optim.Optimizer, patience: int) -> None:
        if any("lr" not in group for group in optimizer.param_groups):
            raise UsageError("--lr-plateau needs an optimizer with a learning rate (not bop)")
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.5, patience=patience
        )

    def step(self, test_loss: float) -> None:
        self.scheduler.step(test_loss)


def _search_batches(data: Dataset, config: TrainConfig):
    """Training batches in order, epoch after epoch, for Bop's momentum-format search (it
    takes as many as its warm-up, settling and steady-state windows need)."""
    while True:
        for start in range(0, data.train_size - config.batch_size + 1, config.batch_size):
            end = start + config.batch_size
            yield (to_model_input(as_tensor(data.train_images[start:end])),
                   as_tensor(data.train_labels[start:end]))


def load_engine() -> None:
    """Load now what training loads once per process: the compiled kernels, torch's optimizer
    stack (building the first `torch.optim` optimizer imports some 800 modules, about 70 MiB)
    and the tensor ledger's dispatch machinery (one tiny step under it), so that a memory
    baseline taken afterwards counts training, not imports."""
    from trainers import native

    native.kernels()
    layer = torch.nn.Linear(2, 2)
    _step_under_ledger(layer, torch.optim.Adam(layer.parameters()), torch.zeros(1, 2),
                       torch.zeros(1, dtype=torch.long))


def _step_under_ledger(model, optimizer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """One real training step under `trainers.measure`'s tensor ledger: its loss and the
    bytes of tensors live at its peak (parameters, optimizer state, batch and all)."""
    from trainers.engine import train_step
    from trainers.measure import track_tensor_peak

    losses: list[float] = []
    peak = track_tensor_peak(
        model, optimizer, lambda bx, by: losses.append(float(train_step(model, optimizer, bx, by))),
        [(x, y)],
    )
    return losses[0], peak.peak_bytes


def _set_bop_hyper(optimizer: torch.optim.Optimizer, gamma: float, tau: float) -> None:
    """Set gamma and tau in Bop's param groups (the groups that have them)."""
    for group in optimizer.param_groups:
        if "gamma" in group:
            group["gamma"], group["tau"] = gamma, tau


def _call(callbacks: Any, name: str, *args: Any, **kwargs: Any) -> None:
    method = getattr(callbacks, name, None)
    if method is not None:
        method(*args, **kwargs)


def train(
    config: TrainConfig, callbacks: Any = None, dataset: Dataset | None = None
) -> TrainResult:
    """Train `config.model` with `config.recipe`; evaluate on the test split after every epoch.

    `dataset` may be passed in (already loaded); otherwise it is loaded from the config.
    Each epoch reshuffles and drops the last incomplete batch (a batch of one would leave
    batch norm with no spread); over epochs every sample is seen.
    """
    from trainers.engine import train_step
    from trainers.models import build_model
    from trainers.optim import build_optimizer

    check_config(config)
    if dataset is None:
        _call(callbacks, "on_setup", "loading data")  # what the run's progress shows
    data = dataset if dataset is not None else load_training_data(config)
    check_config(config, data)
    _call(callbacks, "on_setup", "building model",
          steps_per_epoch=data.train_size // config.batch_size)

    torch.manual_seed(config.seed)
    shuffle = torch.Generator().manual_seed(config.seed)
    model = build_model(
        config.model, config.recipe, in_shape=data.in_shape, num_classes=data.num_classes
    )
    recipe = config.recipe
    if recipe.momentum_format == "auto":  # Bop: search the momentum format on real gradients
        from trainers.bop import resolve_momentum_format

        recipe = resolve_momentum_format(recipe, model, _search_batches(data, config))
    optimizer = build_optimizer(model, recipe)
    plateau = _Plateau(optimizer, config.plateau_patience) if config.lr_plateau else None
    train_eval = torch.randperm(
        data.train_size, generator=torch.Generator().manual_seed(config.seed)
    )
    train_eval = train_eval[:TRAIN_EVAL_SAMPLES].sort().values.numpy()
    train_eval_images, train_eval_labels = (
        data.train_images[train_eval],
        data.train_labels[train_eval],
    )
    train_images = as_tensor(data.train_images)
    train_labels = as_tensor(data.train_labels)

    history: list[EpochRecord] = []
    step = 0
    run_start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        if recipe.optimizer == "bop":
            _set_bop_hyper(optimizer, *config.bop_hyper(epoch))
        lr = float(optimizer.param_groups[0].get("lr", float("nan")))
        _call(callbacks, "on_epoch_start", epoch)
        model.train()
        order = torch.randperm(data.train_size, generator=shuffle)
        losses: list[float] = []
        for start in range(0, data.train_size - config.batch_size + 1, config.batch_size):
            index = order[start : start + config.batch_size]
            x = to_model_input(train_images[index])
            y = train_labels[index]
            step_start = time.perf_counter()
            if step < config.tensor_peak_steps:
                loss, peak_bytes = _step_under_ledger(model, optimizer, x, y)
            else:
                loss, peak_bytes = float(train_step(model, optimizer, x, y)), None
            step_time_s = time.perf_counter() - step_start
            step += 1
            losses.append(loss)
            _call(callbacks, "on_step", StepRecord(epoch, step, loss, step_time_s, peak_bytes))
            if config.max_steps is not None and step >= config.max_steps:
                break
        train_loss = sum(losses) / len(losses)
        _, train_accuracy = evaluate_split(
            model, train_eval_images, train_eval_labels, config.eval_batch_size
        )
        test_loss, test_accuracy = evaluate_split(
            model, data.test_images, data.test_labels, config.eval_batch_size
        )
        record = EpochRecord(
            epoch=epoch,
            steps=len(losses),
            train_loss=train_loss,
            train_accuracy=train_accuracy,
            test_loss=test_loss,
            test_accuracy=test_accuracy,
            seconds=time.perf_counter() - epoch_start,
            lr=lr,
        )
        history.append(record)
        _call(callbacks, "on_epoch_end", record)
        if plateau is not None:
            plateau.step(test_loss)
        if config.max_steps is not None and step >= config.max_steps:
            break
    return TrainResult(
        config=config,
        history=history,
        steps=step,
        seconds=time.perf_counter() - run_start,
        model=model,
    )
