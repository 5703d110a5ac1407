"""The analytical memory model against figures computed by hand, and its command line."""

from __future__ import annotations

import functools
import json

import pytest

from trainers.cli import main
from trainers.memory_model import extended_model, model_memory, published_model
from trainers.methods import make_recipe
from trainers.models import MODELS, build_model, layer_inventory

MIB_BITS = 8 * 2**20
BATCH = 100

# MLP 784-256-256-256-256-10, every layer binary with an L1 batch norm after it.
MLP_WEIGHTS = 784 * 256 + 3 * 256 * 256 + 256 * 10  # 200704 + 196608 + 2560 = 399872
MLP_BN = 4 * 256 + 10  # 1034 channels
MLP_INPUTS = 784 + 4 * 256  # per-sample elements at the five layers' inputs: 1808
MLP_LARGEST_INPUT = 784


def mib(bits: int) -> float:
    return bits / MIB_BITS


def mlp_expected(b_w, b_beta, b_dw, b_m, moments, b_x, b_da, b_db):
    """docs/methods.md's formulas written out for the MLP at batch 100, in MiB."""
    model = MLP_WEIGHTS * b_w + MLP_BN * b_beta
    optimizer = MLP_WEIGHTS * (b_dw + moments * b_m)
    activations = MLP_INPUTS * BATCH * b_x + MLP_LARGEST_INPUT * BATCH * (b_da + b_db)
    return mib(model), mib(optimizer), mib(activations)


CASES = {
    # standard: everything 32-bit; Adam keeps m1 and m2, SGD keeps m1 (momentum).
    ("standard", "adam", None): mlp_expected(32, 32, 32, 32, 2, 32, 32, 32),
    ("standard", "sgd", None): mlp_expected(32, 32, 32, 32, 1, 32, 32, 32),
    # Bop: no latent weights (b_w term 0), one 32-bit momentum per weight.
    ("bop", "bop", None): mlp_expected(0, 32, 32, 32, 1, 32, 32, 32),
    # Bop with a sign + 4 exponent + 3 mantissa bit momentum: m1 is 8 bits.
    ("bop", "bop", "4,3"): mlp_expected(0, 32, 32, 8, 1, 32, 32, 32),
    # lowmem: b_w = b_beta = b_m = 16, b_dW = 1, b_x = 1, b_dA = 16, b_dB = 5.
    ("lowmem", "adam", None): mlp_expected(16, 16, 1, 16, 2, 1, 16, 5),
    ("lowmem", "sgd", None): mlp_expected(16, 16, 1, 16, 1, 1, 16, 5),
    ("lowmem", "bop", None): mlp_expected(0, 16, 1, 16, 1, 1, 16, 5),
}


@pytest.mark.parametrize(("method", "optimizer", "momentum_format"), list(CASES))
def test_mlp_published_model_matches_hand_computation(method, optimizer, momentum_format):
    recipe = make_recipe(method, optimizer, momentum_format=momentum_format)
    model = build_model("mlp", recipe)
    estimate = published_model(layer_inventory(model), recipe, BATCH)
    model_mib, optimizer_mib, activations_mib = CASES[(method, optimizer, momentum_format)]
    assert estimate.model_mib == pytest.approx(model_mib, rel=1e-12)
    assert estimate.optimizer_mib == pytest.approx(optimizer_mib, rel=1e-12)
    assert estimate.activations_mib == pytest.approx(activations_mib, rel=1e-12)
    assert estimate.total_mib == pytest.approx(model_mib + optimizer_mib + activations_mib)


def test_standard_mlp_adam_figures_in_mib():
    """The same arithmetic once more as numbers: 400906 * 4 bytes, 399872 * 12 bytes, ..."""
    recipe = make_recipe("standard")
    estimate = published_model(layer_inventory(build_model("mlp", recipe)), recipe, BATCH)
    assert estimate.model_mib == pytest.approx(1_603_624 / 2**20)  # (399872 + 1034) * 4 B
    assert estimate.optimizer_mib == pytest.approx(4_798_464 / 2**20)  # 399872 * 3 * 4 B
    # 1808 * 100 * 4 B saved inputs + 784 * 100 * 8 B for the dX/dY pair
    assert estimate.activations_mib == pytest.approx((723_200 + 627_200) / 2**20)


def test_lowmem_switches_each_change_their_own_width():
    base = make_recipe("lowmem")
    no_po2 = make_recipe("lowmem", disable=("po2_grads",))
    model = build_model("mlp", base)
    inventory = layer_inventory(model)
    with_po2 = published_model(inventory, base, BATCH)
    without = published_model(inventory, no_po2, BATCH)
    # b_dB goes from 5 to 16 bits: 784 * 100 * 11 more bits, nothing else changes.
    assert without.activations_mib - with_po2.activations_mib == pytest.approx(
        mib(784 * 100 * 11))
    assert without.model_mib == with_po2.model_mib
    assert without.optimizer_mib == with_po2.optimizer_mib


def test_mlp_extended_standard_counts_what_section_1_keeps():
    recipe = make_recipe("standard")
    estimate = extended_model(build_model("mlp", recipe), recipe, BATCH)
    t = estimate.terms_mib
    assert t["parameters"] == pytest.approx(mib((MLP_WEIGHTS + MLP_BN) * 32))
    assert t["buffers"] == pytest.approx(mib(2 * MLP_BN * 32))  # running mean and sigma1
    assert t["layer_inputs"] == pytest.approx(mib(MLP_INPUTS * BATCH * 32))
    assert t["bn_outputs"] == pytest.approx(mib(MLP_BN * BATCH * 32))  # normalised outputs
    assert t["ste_masks"] == pytest.approx(mib(4 * 256 * BATCH * 32))  # no sign after the last
    # sgn(W) copies the matmul saves for dX: every layer but the first
    assert t["binarised_weights"] == pytest.approx(mib((MLP_WEIGHTS - 784 * 256) * 32))
    # largest gradient pair: the first block's batch norm, its output's and its input's
    # gradients (256 each); the first layer computes no gradient for the data (784)
    assert t["gradient_buffers"] == pytest.approx(mib(2 * 256 * BATCH * 32))


@functools.cache
def built(name: str, lowmem: bool):
    """One model per name and method family; the optimizer does not change the model."""
    in_shape = (3, 64, 64) if name == "resnete18" else None
    return build_model(name, make_recipe("lowmem" if lowmem else "standard"), in_shape)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("optimizer", ["adam", "sgd", "bop"])
def test_every_model_and_optimizer_has_a_model(name, optimizer):
    method = "bop" if optimizer == "bop" else "standard"
    standard = make_recipe(method, optimizer)
    lowmem = make_recipe("lowmem", optimizer)
    figures = {}
    for recipe in (standard, lowmem):
        estimates = model_memory(built(name, recipe.switches.any), recipe, 10)
        for estimate in estimates.values():
            parts = (estimate.model_mib, estimate.optimizer_mib, estimate.activations_mib)
            assert all(part > 0 for part in parts[1:])
            assert estimate.total_mib == pytest.approx(sum(parts))
        figures[recipe.method] = estimates["published"].total_mib
    assert figures["lowmem"] < figures[method]


def test_memory_command_prints_json(capsys):
    code = main(["memory", "--model", "mlp", "--batch-size", "100", "--method", "standard",
                 "--optimizer", "sgd", "--format", "json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = CASES[("standard", "sgd", None)]
    assert [report[k] for k in ("model_mib", "optimizer_mib", "activations_mib")] == (
        pytest.approx(list(expected)))
    assert report["total_mib"] == pytest.approx(sum(expected))
    assert len(report["layers"]) == 5
    assert report["extended"]["label"] == "extended"


def test_memory_command_table_and_momentum_format(capsys):
    assert main(["memory", "--model", "cnv", "--method", "bop", "--momentum-format", "4,3"]) == 0
    out = capsys.readouterr().out
    assert "published" in out and "extended" in out and "layer" in out


@pytest.mark.parametrize(("argv", "needle"), [
    (["--model", "vgg", "--method", "standard"], "'vgg'"),
    (["--model", "mlp", "--method", "fast"], "'fast'"),
    (["--model", "mlp", "--method", "standard", "--optimizer", "rmsprop"], "'rmsprop'"),
    (["--model", "mlp", "--method", "standard", "--batch-size", "0"], "got 0"),
    (["--model", "mlp", "--method", "lowmem", "--disable", "nope"], "'nope'"),
    (["--model", "mlp", "--method", "bop", "--momentum-format", "x"], "'x'"),
    (["--model", "mlp", "--method", "standard", "--in-shape", "1,28"], "'1,28'"),
])
def test_memory_command_refuses_bad_input(capsys, argv, needle):
    assert main(["memory", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
