"""Continual learning: scenarios, hybrid quantisation, the cwr/naive runner and its CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from contract.errors import UsageError
from datafiles import load_dataset
from trainers.continual.hybrid_sgd import HybridSGD
from trainers.continual.qstore import (
    SCALE_ZERO_POINT_BYTES,
    pack_codes,
    quantise,
    storage_dtype,
    unpack_codes,
)
from trainers.continual.quant import HybridQuantise, quantise_activations, quantise_minmax
from trainers.continual.scenario import class_incremental


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The digits MLP gains nothing from threads, and the machine's 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- scenarios ---------------------------------------------------------------------------


def test_scenario_splits_classes_into_disjoint_experiences_in_a_seeded_order(digits):
    scenario = class_incremental(digits, experiences=5, seed=3)
    assert sorted(scenario.class_order) == list(range(10))
    groups = [exp.classes for exp in scenario.experiences]
    assert [len(g) for g in groups] == [2] * 5
    assert [c for g in groups for c in g] == list(scenario.class_order)
    for exp in scenario.experiences:
        labels = digits.train_labels[exp.train_indices]
        assert set(labels.tolist()) == set(exp.classes)
        assert exp.train_indices.size == np.isin(digits.train_labels, exp.classes).sum()
    again = class_incremental(digits, experiences=5, seed=3)
    assert again.class_order == scenario.class_order
    assert all(np.array_equal(a.train_indices, b.train_indices)
               for a, b in zip(scenario.experiences, again.experiences, strict=True))
    assert class_incremental(digits, experiences=5, seed=4).class_order != scenario.class_order


def test_scenario_uneven_split_and_given_order(digits):
    scenario = class_incremental(digits, experiences=3, class_order=range(10))
    assert [exp.classes for exp in scenario.experiences] == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
    assert scenario.seen_classes(1) == (0, 1, 2, 3, 4, 5, 6)
    test = scenario.test_indices(scenario.seen_classes(0))
    assert set(digits.test_labels[test].tolist()) == {0, 1, 2, 3}


def test_more_experiences_than_classes_is_a_usage_error(digits):
    with pytest.raises(UsageError, match="--experiences 11 is more than the 10 classes"):
        class_incremental(digits, experiences=11)


def test_class_order_must_list_every_class_once(digits):
    with pytest.raises(UsageError, match="exactly once"):
        class_incremental(digits, experiences=2, class_order=[0, 1, 2])


# --- hybrid quantisation ---------------------------------------------------------------


def test_minmax_quantisation_uses_2_to_the_bits_levels_between_min_and_max():
    x = torch.linspace(-1.0, 3.0, 1001)
    q = quantise_minmax(x, 2)  # levels -1, 1/3, 5/3, 3
    assert torch.allclose(torch.unique(q), torch.tensor([-1.0, 1 / 3, 5 / 3, 3.0]))
    assert (q - x).abs().max() <= (4.0 / 3) / 2 + 1e-6
    assert torch.equal(quantise_minmax(x, 32), x)
    assert torch.equal(quantise_minmax(torch.full((4,), 2.5), 8), torch.full((4,), 2.5))
    signs = torch.tensor([-1.0, 1.0, 1.0, -1.0])
    assert torch.equal(quantise_minmax(signs, 8), signs)  # +-1 survives any width


def test_hybrid_quantise_forward_at_qf_gradient_identity_then_at_qb():
    x = torch.linspace(0.0, 1.0, 11, requires_grad=True)
    y = HybridQuantise.apply(x, 1, 2)  # forward: 2 levels {0, 1}
    assert torch.equal(y.detach(), torch.round(x.detach()))
    upstream = torch.linspace(0.0, 3.0, 11)
    y.backward(upstream)
    # identity through the rounding, then the gradient itself on 4 levels {0, 1, 2, 3}
    assert torch.equal(x.grad, torch.round(upstream))


@pytest.mark.parametrize(("bits", "dtype", "nbytes"), [
    (1, torch.uint8, 1 * 13), (3, torch.uint8, 3 * 13), (7, torch.uint8, 7 * 13),
    (8, torch.uint8, 100), (12, torch.int16, 200), (16, torch.int16, 200), (20, torch.int32, 400),
])
def test_stored_tensor_dtype_and_bytes(bits, dtype, nbytes):
    # 100 values: packed widths keep `bits` planes of ceil(100 / 8) = 13 bytes
    x = torch.linspace(-1.0, 0.5, 100).reshape(10, 10)
    q = quantise(x, bits)
    assert q.codes.dtype == dtype and storage_dtype(bits) == dtype
    assert q.nbytes == nbytes + SCALE_ZERO_POINT_BYTES
    assert q.dequantise().shape == x.shape and q.dequantise().dtype == torch.float32


@pytest.mark.parametrize("bits", range(1, 8))
def test_pack_unpack_codes_round_trip(bits):
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (1001,), generator=generator)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == bits * 126  # ceil(1001 / 8)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_quantised_values_sit_on_a_grid_that_holds_zero(bits):
    x = torch.cat([torch.linspace(-0.3, 0.9, 999), torch.zeros(1)])
    q = quantise(x, bits)
    values = q.dequantise()
    assert values[-1] == 0.0  # zero is exact (CWR* zeroes head rows)
    assert (values - x).abs().max() <= q.scale / 2 + 1e-6
    steps = values / q.scale
    assert torch.allclose(steps, torch.round(steps), atol=1e-3)
    assert len(torch.unique(q.int_codes())) <= 2**bits
    assert torch.equal(quantise(torch.zeros(5), bits).dequantise(), torch.zeros(5))


def test_hybrid_sgd_holds_weights_as_codes_and_updates_onto_the_grid():
    w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 64))
    start = w.detach().clone()
    optimizer = HybridSGD([w], lr=0.5, bits=4)
    assert w.numel() == 0  # between steps only the codes are held
    held = optimizer.stored(w)
    assert held.codes.dtype == torch.uint8 and held.nbytes == 4 * 8 + SCALE_ZERO_POINT_BYTES
    assert optimizer.stored_bytes == held.nbytes
    optimizer.materialise()
    assert torch.equal(w.detach(), quantise(start, 4).dequantise())
    grad = torch.linspace(0.0, 0.2, 64)
    expected = quantise(w.detach() - 0.5 * quantise_minmax(grad, 4), 4).dequantise()
    w.grad = grad
    optimizer.step()
    assert w.numel() == 0 and w.grad is None
    assert torch.equal(optimizer.stored(w).dequantise(), expected)


def test_nearest_rounding_loses_updates_below_half_a_step_stochastic_keeps_them_on_average():
    def mean_after(rounding):
        w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 4096))
        with torch.no_grad():
            w[0], w[-1] = -2.0, 2.0  # untouched ends keep the range (and so the grid) in place
        optimizer = HybridSGD([w], lr=1.0, bits=4, rounding=rounding, seed=0)
        optimizer.materialise()
        before = w.detach().clone()
        w.grad = torch.full((4096,), 0.02)  # a step is 4 / 15: the update is 0.075 of it
        w.grad[0] = w.grad[-1] = 0.0
        optimizer.step()
        return float((optimizer.stored(w).dequantise() - before)[1:-1].mean())

    # nearest: every value rounds back to its old level (one code moved would shift the
    # mean by 0.27 / 4094 = 6.5e-5; what is left is float32 noise of the re-fitted scale)
    assert abs(mean_after("nearest")) < 1e-6
    assert mean_after("stochastic") == pytest.approx(-0.02, abs=0.004)


def test_hybrid_sgd_state_dict_round_trip():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(7))]
    optimizer = HybridSGD(params, lr=0.1, bits=16)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = [torch.nn.Parameter(torch.zeros(6, 5)), torch.nn.Parameter(torch.zeros(7))]
    loaded = HybridSGD(fresh, lr=0.5, bits=16)
    loaded.load_state_dict(saved)
    assert loaded.param_groups[0]["lr"] == 0.1
    for a, b in zip(params, fresh, strict=True):
        assert loaded.stored(b).codes.dtype == torch.int16
        assert torch.equal(loaded.stored(b).codes, optimizer.stored(a).codes)
        assert torch.equal(loaded.stored(b).dequantise(), optimizer.stored(a).dequantise())
        assert b.numel() == 0
    for opt, ps in ((optimizer, params), (loaded, fresh)):
        opt.materialise()
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    assert all(torch.equal(optimizer.stored(a).codes, loaded.stored(b).codes)
               for a, b in zip(params, fresh, strict=True))


def test_hybrid_sgd_at_32_bits_is_plain_sgd_with_clipping():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(20))
    reference = torch.nn.Parameter(w.detach().clone())
    optimizer = HybridSGD([{"params": [w], "clip": 1.0}], lr=0.3)
    sgd = torch.optim.SGD([reference], lr=0.3)
    grad = torch.randn(20)
    w.grad, reference.grad = grad.clone(), grad.clone()
    optimizer.step()
    sgd.step()
    assert optimizer.state_dict()["state"] == {} and optimizer.stored_bytes == 20 * 4
    assert torch.equal(w.detach(), reference.detach().clamp(-1.0, 1.0))


def test_activation_hooks_quantise_outputs_and_vanish_at_32_bits():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 16)
    x = torch.randn(8, 16)
    handles = quantise_activations([layer], qf=2, qb=16)
    assert len(torch.unique(layer(x))) <= 4
    for handle in handles:
        handle.remove()
    assert len(torch.unique(layer(x))) > 4
    assert quantise_activations([layer], qf=32, qb=32) == []


# --- the runner -------------------------------------------------------------------------

from trainers.continual.runner import ContinualConfig, run_continual  # noqa: E402


def config(**changes) -> ContinualConfig:
    base = dict(model="mlp", dataset="digits", strategy="cwr", experiences=5, replay_size=100,
                epochs_per_experience=1, batch_size=50, seed=0)
    return ContinualConfig(**(base | changes))


class Recorder:
    def __init__(self) -> None:
        self.started, self.steps, self.ended = [], [], []

    def on_epoch_start(self, epoch):
        self.started.append(epoch)

    def on_step(self, record):
        self.steps.append(record)

    def on_epoch_end(self, record):
        self.ended.append(record)


def test_cwr_run_reports_every_experience_and_streams_callbacks(digits):
    calls = Recorder()
    result = run_continual(config(), calls, dataset=digits)
    assert calls.started == [1, 2, 3, 4, 5]
    assert [r.experience for r in calls.ended] == [1, 2, 3, 4, 5]
    assert calls.ended == result.experiences
    assert len(calls.steps) == sum(r.steps for r in result.experiences)
    seen = [len(r.seen_classes) for r in result.experiences]
    assert seen == [2, 4, 6, 8, 10]
    for record in result.experiences:
        assert 0.0 <= record.test_accuracy <= 1.0 and record.seconds > 0
        assert len(record.accuracy_per_experience) == record.experience
        assert record.trainable_bytes > 0
    # 100 // seen classes entries per class, 256 latent bits (the first block's output) each
    assert [r.buffer_bytes for r in result.experiences] == [(100 // n) * n * 32 for n in seen]
    assert result.experiences[0].replay_entries == 0
    assert [r.replay_entries for r in result.experiences[1:]] == [100, 100, 96, 96]
    assert result.final_average_accuracy == pytest.approx(
        np.mean(result.experiences[-1].accuracy_per_experience))
    assert result.experiences[0].test_accuracy > 0.9  # two classes, learned from scratch


def test_blocks_below_the_latent_layer_are_frozen_after_the_first_experience(digits):
    from trainers.continual import runner

    snapshots, grad_outputs = [], []
    original = runner.ContinualRun.run_experience

    def spy(self, exp):
        lower = self.parts.lower
        handle = lower.register_forward_hook(
            lambda _m, _i, out: grad_outputs.append((exp.index, out.requires_grad, lower.training)))
        record = original(self, exp)
        handle.remove()
        snapshots.append({k: v.clone() for k, v in lower.state_dict().items()})
        if exp.index > 0:
            assert not any(p.requires_grad for p in lower.parameters())
        return record

    runner.ContinualRun.run_experience = spy
    try:
        run_continual(config(experiences=3, latent_layer=2), dataset=digits)
    finally:
        runner.ContinualRun.run_experience = original
    # weights and batch-norm statistics of the lower blocks never move after experience 1
    for later in snapshots[1:]:
        assert all(torch.equal(later[k], snapshots[0][k]) for k in later)
    # after the first experience, latents come out of eval mode with no graph behind them
    later_calls = [(grad, training) for index, grad, training in grad_outputs if index > 0]
    assert later_calls and not any(grad or training for grad, training in later_calls)
    assert any(grad for index, grad, _ in grad_outputs if index == 0)


def test_replayed_latents_are_mixed_into_every_minibatch_after_the_first(digits, monkeypatch):
    import trainers.engine

    batches = []
    real_step = trainers.engine.train_step

    def spy(model, optimizer, x, y):
        batches.append((x.shape, y.clone()))
        return real_step(model, optimizer, x, y)

    monkeypatch.setattr(trainers.engine, "train_step", spy)
    result = run_continual(config(experiences=2, replay_size=40), dataset=digits)
    first, second = result.experiences
    old = torch.tensor(first.classes)
    for shape, y in batches[: first.steps]:
        assert shape[1:] == (1, 8, 8) and not torch.isin(y, torch.tensor(second.classes)).any()
    for shape, y in batches[first.steps:]:
        # 50 current samples as latents of the first block (256 signs), then 40 replayed ones
        assert shape == (90, 256)
        assert torch.isin(y[:50], torch.tensor(second.classes)).all()
        assert torch.isin(y[50:], old).all()


def test_cwr_resets_and_consolidates_the_union_of_new_and_replayed_classes(digits, monkeypatch):
    """Lomonaco et al.'s latent-replay rule: after the first experience the classes reset and
    consolidated are the new ones plus those in the replay memory, and each class's count
    includes its replayed entries."""
    from trainers.continual import cwr as cwr_module

    resets, consolidations = [], []
    real_before = cwr_module.CWRStar.before_experience
    real_consolidate = cwr_module.CWRStar.consolidate

    def before(self, head_weight, classes):
        resets.append(sorted(classes))
        return real_before(self, head_weight, classes)

    def consolidate(self, head_weight, counts):
        consolidations.append(dict(counts))
        return real_consolidate(self, head_weight, counts)

    monkeypatch.setattr(cwr_module.CWRStar, "before_experience", before)
    monkeypatch.setattr(cwr_module.CWRStar, "consolidate", consolidate)
    result = run_continual(config(experiences=5, replay_size=40), dataset=digits)
    first, second, third = result.experiences[:3]
    labels = digits.train_labels
    new_counts = [{c: int((labels == c).sum()) for c in e.classes} for e in result.experiences]
    assert resets[0] == sorted(first.classes)
    assert consolidations[0] == new_counts[0]
    # experience 2 replays the 40 entries of experience 1's 2 classes: 20 each
    assert resets[1] == sorted(first.classes + second.classes)
    assert consolidations[1] == {**new_counts[1], **{c: 20 for c in first.classes}}
    # experience 3: the buffer holds 4 classes at 40 // 4 = 10 entries each
    assert resets[2] == sorted(first.seen_classes + second.classes + third.classes)
    assert consolidations[2] == {**new_counts[2], **{c: 10 for c in second.seen_classes}}


def test_naive_keeps_no_buffer_and_forgets(digits):
    result = run_continual(config(strategy="naive"), dataset=digits)
    assert all(r.buffer_bytes == 0 and r.replay_entries == 0 for r in result.experiences)
    # plain fine-tuning on the last two classes: little is left of the first ones
    assert result.experiences[-1].accuracy_per_experience[0] < 0.5


def test_unquantised_reference_differs_from_8_16_bits(digits):
    reference = run_continual(config(experiences=2, qf=32, qb=32), dataset=digits)
    quantised = run_continual(config(experiences=2, qf=8, qb=16), dataset=digits)
    again = run_continual(config(experiences=2, qf=8, qb=16), dataset=digits)
    assert quantised.experiences[-1].train_loss != reference.experiences[-1].train_loss
    assert quantised.experiences[-1].train_loss == again.experiences[-1].train_loss


@pytest.mark.parametrize(("qb", "weight_bytes"), [
    (32, lambda n: 4 * n), (16, lambda n: 2 * n + 8), (4, lambda n: 4 * -(-n // 8) + 8),
])
def test_trainable_part_is_held_at_qb_bits_after_the_first_experience(digits, qb, weight_bytes):
    result = run_continual(config(experiences=3, qf=8, qb=qb), dataset=digits)
    trainable = torch.nn.Sequential(result.model[1], result.model[2])
    buffers = sum(b.numel() * b.element_size() for b in trainable.buffers())
    held = buffers + sum(weight_bytes(p.numel()) for p in trainable.parameters())
    assert [r.trainable_bytes for r in result.experiences[1:]] == [held, held]
    assert result.experiences[0].trainable_bytes > 4 * held // 2  # float32 + Adam, whole net


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(latent_layer=5), "--latent-layer 5 is outside model 'mlp' \\(choose 1..4"),
        (dict(latent_layer=0), "--latent-layer 0 is outside"),
        (dict(replay_size=9), "--replay-size 9 is below the 10 classes"),
        (dict(experiences=11), "--experiences 11 is more than the 10 classes"),
        (dict(strategy="ewc"), "unknown strategy 'ewc'"),
        (dict(qf=0), "--qf must be 1..32 bits, got 0"),
    ],
)
def test_bad_settings_are_usage_errors(digits, changes, message):
    with pytest.raises(UsageError, match=message):
        run_continual(config(**changes), dataset=digits)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainers", "continual", *args],
                          capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})


def test_cli_json_last_line_holds_experiences_and_final_average_accuracy():
    done = run_cli("--model", "mlp", "--dataset", "digits", "--strategy", "cwr",
                   "--experiences", "2", "--replay-size", "50", "--qf", "8", "--qb", "16",
                   "--batch-size", "50", "--format", "json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(summary["experiences"]) == 2
    assert 0.0 <= summary["final_average_accuracy"] <= 1.0
    first = summary["experiences"][0]
    for key in ("test_accuracy", "buffer_bytes", "trainable_bytes", "seconds"):
        assert key in first
    assert "experience 2/2" in done.stderr


def test_cli_bad_input_is_one_line_and_exit_2():
    done = run_cli("--model", "mlp", "--dataset", "digits", "--strategy", "cwr",
                   "--experiences", "3", "--replay-size", "5")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: continual: --replay-size 5 is below the 10 classes of the stream "
        "(the buffer needs at least one entry per class)"
    ]


@pytest.mark.slow
def test_mnist_cwr_reaches_80_beats_naive_by_20_points_and_8_16_bits_lose_at_most_2(mnist_dir):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import continual_mnist

    rows = continual_mnist.run_rows(str(mnist_dir), seeds=[0, 1, 2], epochs=1, replay_size=1500,
                                    latent_layer=None)
    figures = continual_mnist.checks(rows)
    assert figures["cwr_accuracy_points"] >= continual_mnist.MIN_CWR_ACCURACY_POINTS
    assert figures["cwr_gain_points"] >= continual_mnist.MIN_CWR_GAIN_POINTS
    assert figures["quantisation_loss_points"] <= continual_mnist.MAX_QUANTISATION_LOSS_POINTS
