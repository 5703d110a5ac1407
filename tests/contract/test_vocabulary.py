"""The engine's tables are the contract's vocabulary, so the host checks plans with the names
the engine takes."""

from __future__ import annotations

import dataclasses

import pytest

from contract import vocabulary
from contract.errors import UsageError
from contract.fields import SpecError
from datafiles import DATASETS
from trainers.bop.fpformat import FloatFormat
from trainers.methods import METHODS, OPTIMIZERS, LowMemSwitches, make_recipe
from trainers.models import DEFAULT_INPUT_SHAPES, MODELS


def test_the_engine_names_what_the_vocabulary_names():
    assert tuple(DEFAULT_INPUT_SHAPES) == MODELS == vocabulary.MODELS
    assert METHODS == vocabulary.TRAINING_METHODS
    assert OPTIMIZERS == vocabulary.OPTIMIZERS
    assert DATASETS == vocabulary.DATASETS
    names = tuple(f.name for f in dataclasses.fields(LowMemSwitches))
    assert names == vocabulary.LOWMEM_SWITCHES


@pytest.mark.parametrize("method", vocabulary.TRAINING_METHODS)
def test_default_optimizers_agree(method):
    assert make_recipe(method).optimizer == vocabulary.default_optimizer(method)


@pytest.mark.parametrize("text", ["5,10", "8,7", "6,5,67", "2,0", "4,3,1", "9,1", "8,23,0",
                                  "5,x", "1,2,3,4", "3,24"])
def test_momentum_syntax_the_same_on_both_sides(text):
    try:
        expected = vocabulary.parse_momentum_format(text)
    except SpecError:
        with pytest.raises(UsageError):
            FloatFormat.parse(text)
        return
    fmt = FloatFormat.parse(text)
    assert (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias) == expected
