"""The encoding search: candidates, the choice, `resolve_momentum_format`, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from contract.errors import UsageError
from datafiles import load_dataset
from trainers.bop import resolve_momentum_format
from trainers.bop.search import (
    GradientTrace,
    TraceWindow,
    candidate_formats,
    record_gradient_trace,
    search_momentum_format,
)
from trainers.cli import main
from trainers.methods import make_recipe
from trainers.models import build_model


def test_candidates_cover_every_width_and_split():
    formats = candidate_formats(1e-3, range(4, 17))
    assert {f.bits for f in formats} == set(range(4, 17))
    for width in range(4, 17):
        splits = {(f.exponent_bits, f.mantissa_bits) for f in formats if f.bits == width}
        assert splits == {(e, width - 1 - e) for e in range(2, min(8, width - 1) + 1)}
    # the fitted bias puts the largest finite value just above the largest gradient
    covering = [f for f in formats if f.max_finite >= 1e-3]
    # (E = 7, 8 fitted at 1e-3 would reach below float32's range; they keep other biases)
    splits = {(f.exponent_bits, f.mantissa_bits) for f in formats if f.exponent_bits < 7}
    for e_bits, m_bits in splits:
        tightest = min(f.max_finite for f in covering
                       if (f.exponent_bits, f.mantissa_bits) == (e_bits, m_bits))
        assert tightest < 2 * 2.0**-9
    with pytest.raises(UsageError, match="got 40"):
        candidate_formats(1e-3, [40])


def synthetic_trace(seed: int = 0) -> GradientTrace:
    """Gradients with a drift of half their spread; the steady window starts from the
    momentum the drift builds up (its mean)."""
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.empty(512).uniform_(-5, -2, generator=gen)
    grads = torch.randn(16, 512, generator=gen) * scale + scale * 0.5
    warmup = TraceWindow.from_zero(grads[:8], torch.ones(512))
    steady = TraceWindow(grads[8:], torch.ones(512), scale * 0.5)
    return GradientTrace(warmup, steady, (512, 100_000), settle_steps=100)


def test_formats_are_judged_on_the_steady_state_not_the_warm_up():
    """From m = 0 every step is large beside m and few updates are lost; from a settled
    momentum the relative steps are tiny and narrow formats lose most of them."""
    report = search_momentum_format(synthetic_trace(), gamma=1e-3, tau=1e-8, tolerance=0.2)
    narrow = [c for c in report.candidates if c.bits <= 8 and c.represents_tau]
    assert any(c.lost_fraction_start <= 0.2 < c.lost_fraction_steady for c in narrow)
    assert all(c.eligible == (c.represents_tau and c.lost_fraction_steady <= 0.2)
               for c in report.candidates)
    assert report.choice.lost_fraction == report.choice.lost_fraction_steady
    record = report.as_record()
    assert record["judged_on"] == "steady" and record["settle_steps"] == 100


def test_choice_is_the_narrowest_eligible_and_memory_is_reported():
    report = search_momentum_format(synthetic_trace(), gamma=1e-3, tau=1e-8, tolerance=0.2)
    eligible = [c for c in report.candidates if c.eligible]
    assert report.choice is not None and report.choice.bits == min(c.bits for c in eligible)
    assert all(c.represents_tau and c.lost_fraction <= 0.2 for c in eligible)
    narrower = [c for c in report.candidates if c.bits < report.choice.bits]
    assert all(not c.eligible for c in narrower)
    assert report.reference.spec == "fp32" and report.reference.momentum_bytes == 4 * 100_512
    assert report.memory_ratio == pytest.approx(
        report.reference.momentum_bytes / report.choice.momentum_bytes
    )
    stricter = search_momentum_format(synthetic_trace(), gamma=1e-3, tau=1e-8, tolerance=0.01)
    assert stricter.choice is None or stricter.choice.bits >= report.choice.bits
    record = report.as_record()
    assert record["choice"]["spec"] == report.choice.spec and json.dumps(record)


def test_tolerance_out_of_range_is_refused():
    with pytest.raises(UsageError, match=r"got 1\.5"):
        search_momentum_format(synthetic_trace(), tolerance=1.5)


def digit_batches(dataset, batch_size: int = 64):
    from datafiles import to_model_input

    for start in range(0, dataset.train_size - batch_size + 1, batch_size):
        yield (to_model_input(torch.from_numpy(dataset.train_images[start:start + batch_size])),
               torch.from_numpy(dataset.train_labels[start:start + batch_size]))


def test_resolve_auto_runs_the_search_on_a_copy_of_the_model():
    digits = load_dataset("digits")
    recipe = make_recipe("bop", enable=("binary_inputs", "packed_masks"), momentum_format="auto")
    model = build_model("mlp", recipe, in_shape=digits.in_shape)
    before = [p.detach().clone() for p in model.parameters()]
    resolved = resolve_momentum_format(recipe, model, digit_batches(digits), warmup_steps=4,
                                       settle_steps=6, gamma=1e-3, sample_size=512)
    assert resolved.momentum_format != "auto"
    assert resolved.switches == recipe.switches
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    fixed = make_recipe("bop", momentum_format="4,7,22")
    assert resolve_momentum_format(fixed, model, []) is fixed


def test_the_steady_window_starts_from_the_momentum_the_run_reached():
    digits = load_dataset("digits")
    recipe = make_recipe("bop")
    torch.manual_seed(0)
    model = build_model("mlp", recipe, in_shape=digits.in_shape)
    trace = record_gradient_trace(model, recipe, digit_batches(digits), steps=3, settle_steps=5,
                                  gamma=1e-3, sample_size=512)
    assert trace.warmup.grads.shape[0] == trace.steady.grads.shape[0] == 3
    assert torch.count_nonzero(trace.warmup.momentum) == 0
    # 8 steps of m <- m + gamma (g - m) from 0 reach m != 0 wherever a gradient was seen
    assert torch.count_nonzero(trace.steady.momentum) > 0.9 * trace.steady.momentum.numel()
    with pytest.raises(UsageError, match="got 22 batches; it needs 1003"):
        record_gradient_trace(model, recipe, digit_batches(digits), steps=3, settle_steps=997)


def test_cli_lists_candidates_and_the_choice_as_json(capsys):
    code = main(["bop-encodings", "--model", "mlp", "--dataset", "digits", "--batch-size", "50",
                 "--warmup-steps", "3", "--settle-steps", "4", "--sample-size", "512",
                 "--gamma", "1e-3", "--format", "json"])
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["model"] == "mlp" and record["warmup_steps"] == 3
    assert record["settle_steps"] == 4 and record["judged_on"] == "steady"
    assert {c["bits"] for c in record["candidates"]} == set(range(4, 17))
    assert record["choice"] is None or record["choice"]["eligible"]


@pytest.mark.parametrize(("argv", "named"), [
    (["--tolerance", "2"], "--tolerance must be in [0, 1), got 2.0"),
    (["--tau", "-1"], "--tau must be finite and >= 0, got -1.0"),
    (["--warmup-steps", "0"], "--warmup-steps must be at least 1, got 0"),
    (["--model", "nope"], "unknown model 'nope'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, argv, named):
    base = {"--model": "mlp", "--dataset": "digits"}
    args = dict(base)
    for flag, value in zip(argv[::2], argv[1::2]):
        args[flag] = value
    code = main(["bop-encodings", *[item for pair in args.items() for item in pair]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and named in err[-1]
