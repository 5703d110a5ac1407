"""The encoding search: candidates, the choice, `resolve_momentum_format`, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from trainers.bop import resolve_momentum_format
from trainers.bop.search import GradientTrace, candidate_formats, search_momentum_format
from trainers.cli import main
from trainers.data import load_dataset
from trainers.errors import UsageError
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
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.empty(512).uniform_(-5, -2, generator=gen)
    grads = torch.randn(8, 512, generator=gen) * scale + scale * 0.5
    return GradientTrace(grads, torch.ones(512), (512, 100_000))


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
    from trainers.data import to_model_input

    for start in range(0, dataset.train_size - batch_size + 1, batch_size):
        yield (to_model_input(torch.from_numpy(dataset.train_images[start:start + batch_size])),
               torch.from_numpy(dataset.train_labels[start:start + batch_size]))


def test_resolve_auto_runs_the_search_on_a_copy_of_the_model():
    digits = load_dataset("digits")
    recipe = make_recipe("bop", enable=("binary_inputs", "packed_masks"), momentum_format="auto")
    model = build_model("mlp", recipe, in_shape=digits.in_shape)
    before = [p.detach().clone() for p in model.parameters()]
    resolved = resolve_momentum_format(recipe, model, digit_batches(digits), warmup_steps=4,
                                       gamma=1e-3, sample_size=512)
    assert resolved.momentum_format not in (None, "auto")
    assert resolved.switches == recipe.switches
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    fixed = make_recipe("bop", momentum_format="4,7,22")
    assert resolve_momentum_format(fixed, model, []) is fixed


def test_cli_lists_candidates_and_the_choice_as_json(capsys):
    code = main(["bop-encodings", "--model", "mlp", "--dataset", "digits", "--batch-size", "50",
                 "--warmup-steps", "3", "--sample-size", "512", "--gamma", "1e-3",
                 "--format", "json"])
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["model"] == "mlp" and record["warmup_steps"] == 3
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
