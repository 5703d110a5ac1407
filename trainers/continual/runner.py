"""The continual-learning run: a binary backbone learns a class-incremental stream.

`cwr` (Vorabbi et al.): the first experience trains the whole network in float32 (Adam);
afterwards the blocks below the latent-replay layer are frozen and only produce latents,
and the blocks above it plus a bias-free head are trained on the device with CWR*
consolidation and latent replay: hybrid quantisation (forward at q_f bits, weights,
gradients and updates at q_b bits, the weights held for real at q_b bits) and plain SGD,
as in the authors' code (`hybrid_sgd.HybridSGD`).
`naive`: the same trainable part, budget and quantisation, plain fine-tuning (no
consolidation, no replay) -- the forgetting baseline.

Evaluation after each experience covers the test samples of every class seen so far, the
prediction being the arg-max over those classes (the learner knows what it was taught).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from contract.errors import UsageError, unknown_choice
from datafiles import Dataset, load_dataset, to_model_input
from trainers.continual.cwr import CWRStar
from trainers.continual.hybrid_sgd import HybridSGD
from trainers.continual.qstore import ROUNDINGS
from trainers.continual.quant import FULL_PRECISION_BITS, QuantisedLinearHead, quantise_activations
from trainers.continual.replay import STORAGES, LatentReplayBuffer
from trainers.continual.scenario import Experience, Scenario, class_incremental
from trainers.methods import make_recipe

STRATEGIES = ("cwr", "naive")
EVAL_CHUNK = 1000
# The authors' code trains the later experiences with one SGD rate (0.009) for 40 epochs;
# here an experience is one epoch, and the latent weights of binary layers get gradients
# far smaller than the head's (the layer output is divided by its batch norm's scale), so
# they take their own rate. Both chosen on real MNIST (seeds 0-2, 32/32, the benchmark's
# setting); with --binary-lr equal to --sgd-lr no rate we tried reached the 80 % hold.
SGD_LR = 0.3
BINARY_LR = 10.0


@dataclass(frozen=True)
class ContinualConfig:
    """Everything that determines a continual run (same config + seed = same result)."""

    model: str
    dataset: str
    strategy: str = "cwr"
    experiences: int = 5
    replay_size: int = 1500  # latent-replay entries (cwr only)
    qf: int = 8  # bits of the trainable part's forward tensors (32 = unquantised)
    qb: int = 16  # bits of its stored weights, gradients and updates (32 = unquantised)
    latent_layer: int | None = None  # blocks below it are frozen; None = the model's default
    epochs_per_experience: int = 1
    batch_size: int = 100
    seed: int = 0
    replay_storage: str = "packed"  # "packed" (1 bit per latent) or "fp32" (ablation)
    lr: float = 1e-3  # Adam's, the first experience (the whole network, float32)
    sgd_lr: float = SGD_LR  # SGD's from the second experience on: head and batch-norm betas
    binary_lr: float = BINARY_LR  # ... and the latent weights of the trainable binary layers
    rounding: str = "nearest"  # onto the q_b-bit grid: "nearest" (the authors') or "stochastic"
    data_dir: str | Path | None = None
    class_order: tuple[int, ...] | None = None  # None = permuted with the seed


@dataclass(frozen=True)
class ExperienceRecord:
    """What one experience cost and what the learner knows after it."""

    experience: int  # 1-based
    epoch: int  # = experience: the training loop's callbacks see one "epoch" per experience
    classes: list[int]
    seen_classes: list[int]
    train_samples: int  # samples of this experience's classes
    replay_entries: int  # buffer entries replayed during this experience
    steps: int
    train_loss: float  # mean step loss
    test_loss: float  # cross-entropy over the seen classes
    test_accuracy: float  # fraction 0..1 on the test samples of all classes seen so far
    accuracy_per_experience: list[float]  # on each seen experience's classes
    buffer_bytes: int  # measured bytes of the stored replay latents
    # parameters (as held: q_b-bit codes), buffers and optimizer state of what was trained
    # (experience 1: the whole float32 network and Adam's moments)
    trainable_bytes: int
    seconds: float  # training, buffer update and evaluation of the experience


@dataclass(frozen=True)
class ContinualStep:
    epoch: int  # the experience, 1-based
    step: int  # 1-based over the whole run
    loss: float
    step_time_s: float


@dataclass
class ContinualResult:
    config: ContinualConfig
    class_order: tuple[int, ...]
    latent_layer: int
    experiences: list[ExperienceRecord]
    seconds: float
    model: nn.Module = field(repr=False, compare=False)

    @property
    def final_average_accuracy(self) -> float:
        """Mean over experiences of the final accuracy on each experience's classes."""
        return float(np.mean(self.experiences[-1].accuracy_per_experience))

    def summary(self) -> dict[str, Any]:
        config = {k: v for k, v in asdict(self.config).items() if k != "data_dir"}
        config["latent_layer"] = self.latent_layer
        config["class_order"] = list(self.class_order)
        return {
            **config,
            "experiences": [asdict(record) for record in self.experiences],
            "final_average_accuracy": self.final_average_accuracy,
            "final_accuracy": self.experiences[-1].test_accuracy,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class SplitModel:
    """The backbone cut at the latent layer: frozen lower blocks, trainable upper blocks, head."""

    lower: nn.Sequential
    upper: nn.Sequential
    head: QuantisedLinearHead

    def full(self) -> nn.Sequential:
        return nn.Sequential(self.lower, self.upper, self.head)

    def trainable(self) -> nn.Sequential:
        return nn.Sequential(self.upper, self.head)


DEFAULT_LATENT_LAYER = 1
# Only the first block is frozen by default: a block trained on the first experience's
# few classes gives features the later classes can use only near the input (on MNIST
# after 2 classes, a linear probe on the latents of block 1 reaches 86 %, of block 4 37 %).


def split_model(config: ContinualConfig, in_shape: tuple[int, int, int],
                num_classes: int) -> tuple[SplitModel, int]:
    """Build the model, replace its classifier by the CWR* head and cut it at the latent layer."""
    from trainers.models import BlockStack, build_model

    recipe = make_recipe("cwr", lr=config.lr)
    model = build_model(config.model, recipe, in_shape=in_shape, num_classes=num_classes)
    if not isinstance(model, BlockStack):
        raise UsageError(f"continual: model {config.model!r} is not a stack of blocks; "
                         "use mlp, cnv or binarynet")
    blocks = list(model)[:-1]  # the last block is the classifier; the CWR* head replaces it
    latent = DEFAULT_LATENT_LAYER if config.latent_layer is None else config.latent_layer
    if not 1 <= latent <= len(blocks):
        raise UsageError(f"continual: --latent-layer {latent} is outside model {config.model!r} "
                         f"(choose 1..{len(blocks)}: the blocks below it are frozen)")
    backbone = BlockStack(*blocks)
    with torch.no_grad():
        features = backbone.eval()(torch.zeros(1, *in_shape))[0].numel()
    backbone.train()
    lower, upper = BlockStack(*blocks[:latent]), BlockStack(*blocks[latent:])
    head = QuantisedLinearHead(features, num_classes, FULL_PRECISION_BITS, FULL_PRECISION_BITS)
    return SplitModel(lower, upper, head), latent


def check_config(config: ContinualConfig) -> None:
    if config.strategy not in STRATEGIES:
        raise unknown_choice("strategy", config.strategy, STRATEGIES)
    if config.replay_storage not in STORAGES:
        raise unknown_choice("replay storage", config.replay_storage, STORAGES)
    for name in ("qf", "qb"):
        bits = getattr(config, name)
        if not 1 <= bits <= 32:
            raise UsageError(f"continual: --{name} must be 1..32 bits, got {bits}")
    for name in ("epochs_per_experience", "batch_size"):
        if getattr(config, name) < 1:
            raise UsageError(f"continual: --{name.replace('_', '-')} must be >= 1, "
                             f"got {getattr(config, name)}")
    for name in ("lr", "sgd_lr", "binary_lr"):
        if getattr(config, name) <= 0:
            raise UsageError(f"continual: --{name.replace('_', '-')} must be positive, "
                             f"got {getattr(config, name)}")
    if config.rounding not in ROUNDINGS:
        raise unknown_choice("rounding", config.rounding, ROUNDINGS)


def tensor_bytes(*objects: Any) -> int:
    """Bytes of every distinct tensor among modules' parameters/buffers and optimizer state."""
    seen: dict[int, int] = {}
    for obj in objects:
        if isinstance(obj, nn.Module):
            tensors = [*obj.parameters(), *obj.buffers()]
        else:
            tensors = [v for state in obj.state.values() for v in state.values()
                       if isinstance(v, torch.Tensor)]
        for t in tensors:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def _call(callbacks: Any, name: str, *args: Any) -> None:
    method = getattr(callbacks, name, None)
    if method is not None:
        method(*args)


class ContinualRun:
    """The state of one run: model parts, CWR* state, buffer, data and counters."""

    def __init__(self, config: ContinualConfig, scenario: Scenario, callbacks: Any) -> None:
        self.config, self.scenario, self.callbacks = config, scenario, callbacks
        data = scenario.dataset
        torch.manual_seed(config.seed)
        self.parts, self.latent_layer = split_model(config, data.in_shape, data.num_classes)
        self.cwr = CWRStar() if config.strategy == "cwr" else None
        self.buffer = None
        if config.strategy == "cwr":
            self.buffer = LatentReplayBuffer(
                config.replay_size, config.replay_storage,
                min_classes=len(scenario.class_order), seed=config.seed,
            )
        self.images = torch.from_numpy(np.require(data.train_images, requirements='W'))
        self.labels = torch.from_numpy(data.train_labels)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.optimizer: HybridSGD | None = None  # from the second experience on

    def start_on_device(self) -> None:
        """After the first experience: hold the trainable part at q_b bits under SGD, and
        quantise its forward at q_f and its gradients at q_b bits."""
        from trainers.layers import binary_weights

        config, trainable = self.config, self.parts.trainable()
        binary = {id(p) for p in binary_weights(trainable)}
        groups = [
            {"params": [p for p in trainable.parameters() if id(p) in binary], "clip": 1.0,
             "lr": config.binary_lr},
            {"params": [p for p in trainable.parameters() if id(p) not in binary]},
        ]
        self.optimizer = HybridSGD([g for g in groups if g["params"]], lr=config.sgd_lr,
                                   bits=config.qb, rounding=config.rounding, seed=config.seed)
        self.optimizer.attach(trainable)
        quantise_activations([self.parts.upper], config.qf, config.qb)
        self.parts.head.qf, self.parts.head.qb = config.qf, config.qb

    @contextmanager
    def head_weight(self) -> Iterator[torch.Tensor]:
        """The head's float32 weight to edit (CWR*), held at q_b bits again afterwards."""
        if self.optimizer is None:
            yield self.parts.head.weight.data
        else:
            with self.optimizer.editing(self.parts.head.weight) as weight:
                yield weight

    def trainable_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """The ledger of what was trained: held parameters count as their codes (their
        modules keep empty tensors between steps), plus buffers and optimizer state."""
        if not isinstance(optimizer, HybridSGD):
            return tensor_bytes(model, optimizer)
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        return buffers + optimizer.stored_bytes

    def run_experience(self, exp: Experience) -> ExperienceRecord:
        from trainers.engine import train_step
        from trainers.optim import build_optimizer

        start = time.perf_counter()
        config, parts = self.config, self.parts
        first = exp.index == 0
        if not first:
            parts.lower.eval().requires_grad_(False)
        model = parts.full() if first else parts.trainable()
        optimizer = (build_optimizer(model, make_recipe("cwr", lr=config.lr)) if first
                     else self.optimizer)
        replay = 0 if first or self.buffer is None else len(self.buffer)
        counts = self.experience_counts(exp, replay > 0)
        if self.cwr is not None:
            with self.head_weight() as weight:
                self.cwr.before_experience(weight, list(counts))

        indices = torch.from_numpy(exp.train_indices)
        batch = min(config.batch_size, indices.numel())
        batches = indices.numel() // batch
        replay_per_batch = min(replay, batch) if replay else 0
        losses: list[float] = []
        for _ in range(config.epochs_per_experience):
            order = indices[torch.randperm(indices.numel(), generator=self.shuffle)]
            replay_order = self.replay_order(batches * replay_per_batch) if replay else None
            for b in range(batches):
                index = order[b * batch:(b + 1) * batch]
                x, y = to_model_input(self.images[index]), self.labels[index]
                step_start = time.perf_counter()
                if not first:
                    with torch.no_grad():
                        x = parts.lower(x)
                if replay_per_batch:
                    picks = replay_order[b * replay_per_batch:(b + 1) * replay_per_batch]
                    if picks.numel():
                        old_x, old_y = self.buffer.take(picks)
                        x, y = torch.cat([x, old_x]), torch.cat([y, old_y])
                loss = float(train_step(model, optimizer, x, y))
                self.step += 1
                losses.append(loss)
                _call(self.callbacks, "on_step", ContinualStep(
                    exp.index + 1, self.step, loss, time.perf_counter() - step_start))

        if self.cwr is not None:
            with self.head_weight() as weight:
                self.cwr.consolidate(weight, counts)
                self.cwr.load_all(weight)
        if self.buffer is not None:
            self.fill_buffer(exp)
        trainable_bytes = self.trainable_bytes(model, optimizer)
        test_loss, per_class_correct, per_class_total = self.evaluate(exp.index)
        if first:
            self.start_on_device()
        seen = self.scenario.seen_classes(exp.index)
        per_experience = [
            sum(per_class_correct[c] for c in e.classes)
            / max(1, sum(per_class_total[c] for c in e.classes))
            for e in self.scenario.experiences[: exp.index + 1]
        ]
        return ExperienceRecord(
            experience=exp.index + 1,
            epoch=exp.index + 1,
            classes=list(exp.classes),
            seen_classes=list(seen),
            train_samples=int(indices.numel()),
            replay_entries=replay,
            steps=len(losses),
            train_loss=float(np.mean(losses)),
            test_loss=test_loss,
            test_accuracy=sum(per_class_correct.values()) / max(1, sum(per_class_total.values())),
            accuracy_per_experience=per_experience,
            buffer_bytes=self.buffer.nbytes if self.buffer is not None else 0,
            trainable_bytes=trainable_bytes,
            seconds=time.perf_counter() - start,
        )

    def experience_counts(self, exp: Experience, replaying: bool) -> dict[int, int]:
        """Samples per class this experience trains on: its new data and, when replaying,
        the buffer's entries (CWR*'s union rule: these are the classes reset and
        consolidated, and the counts that weight consolidation)."""
        labels = self.scenario.dataset.train_labels[exp.train_indices]
        counts = {c: int((labels == c).sum()) for c in exp.classes}
        if replaying:
            for c in self.buffer.classes:
                counts[c] = counts.get(c, 0) + self.buffer.count(c)
        return counts

    def replay_order(self, n: int) -> torch.Tensor:
        """`n` buffer indices: whole shuffled passes over the buffer, as many as it takes."""
        passes = [self.buffer.permutation() for _ in range(-(-n // len(self.buffer)))]
        return torch.cat(passes)[:n]

    @torch.no_grad()
    def fill_buffer(self, exp: Experience) -> None:
        """Offer the buffer a class-balanced random sample of this experience's latents."""
        quota = self.buffer.quota(len(self.scenario.seen_classes(exp.index)))
        rng = np.random.default_rng(self.config.seed + exp.index)
        labels = self.scenario.dataset.train_labels
        chosen = np.concatenate([
            rng.permutation(exp.train_indices[labels[exp.train_indices] == c])[:quota]
            for c in exp.classes
        ])
        self.parts.lower.eval()
        for s in range(0, chosen.size, EVAL_CHUNK):
            index = torch.from_numpy(chosen[s:s + EVAL_CHUNK])
            latents = self.parts.lower(to_model_input(self.images[index]))
            self.buffer.add(latents, self.labels[index])

    @torch.no_grad()
    def evaluate(self, upto: int) -> tuple[float, dict[int, int], dict[int, int]]:
        """Test loss and per-class correct/total over the classes seen so far."""
        seen = list(self.scenario.seen_classes(upto))
        data = self.scenario.dataset
        test = self.scenario.test_indices(seen)
        model = self.parts.full().eval()
        mask = torch.full((data.num_classes,), float("-inf"))
        mask[seen] = 0.0
        loss_sum, correct, total = 0.0, dict.fromkeys(seen, 0), dict.fromkeys(seen, 0)
        for s in range(0, test.size, EVAL_CHUNK):
            index = test[s:s + EVAL_CHUNK]
            x = to_model_input(torch.from_numpy(data.test_images[index]))
            y = torch.from_numpy(data.test_labels[index])
            logits = model(x).float() + mask
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            hits = logits.argmax(1) == y
            for c in seen:
                of_c = y == c
                correct[c] += int(hits[of_c].sum())
                total[c] += int(of_c.sum())
        return loss_sum / max(1, test.size), correct, total


def load_stream_data(config: ContinualConfig) -> Dataset:
    """The configured data set; synthetic data takes the model's default input shape."""
    from trainers.models import default_input_shape

    in_shape = default_input_shape(config.model) if config.dataset == "synthetic" else (1, 28, 28)
    return load_dataset(config.dataset, config.data_dir, in_shape=in_shape, seed=config.seed)


def run_continual(config: ContinualConfig, callbacks: Any = None,
                  dataset: Dataset | None = None) -> ContinualResult:
    """Run the stream; callbacks get `on_epoch_start(experience)`, `on_step(ContinualStep)` and
    `on_epoch_end(ExperienceRecord)` once per experience (1-based)."""
    check_config(config)
    data = dataset if dataset is not None else load_stream_data(config)
    scenario = class_incremental(data, config.experiences, config.seed, config.class_order)
    run = ContinualRun(config, scenario, callbacks)
    records: list[ExperienceRecord] = []
    start = time.perf_counter()
    for exp in scenario.experiences:
        _call(callbacks, "on_epoch_start", exp.index + 1)
        record = run.run_experience(exp)
        records.append(record)
        _call(callbacks, "on_epoch_end", record)
    if run.optimizer is not None:
        run.optimizer.materialise()  # the returned model has its weights' values
    return ContinualResult(config, scenario.class_order, run.latent_layer, records,
                           time.perf_counter() - start, run.parts.full())
