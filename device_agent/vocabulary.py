"""The engine's vocabulary, without the engine: what `trainers` accepts, importable without torch.

The host validates every plan value against this before a job reaches a device, so
an unknown model, lowmem switch or momentum format is refused at `harness plan show`
time (file, line, field, choices) rather than on the device a minute into the job.
`tests/test_vocabulary.py` holds it equal to what `trainers` accepts (its METHODS,
OPTIMIZERS, MODELS, DATASETS, LowMemSwitches, FloatFormat.parse, make_recipe).
Standard library only: the agent on a Pi imports it too.
"""

from __future__ import annotations

METHODS = ("standard", "lowmem", "bop", "cwr")  # trainers.methods.METHODS
OPTIMIZERS = ("adam", "sgd", "bop")  # trainers.methods.OPTIMIZERS
MODELS = ("mlp", "cnv", "binarynet", "resnete18")  # trainers.models.MODELS
DATASETS = ("mnist", "cifar10", "svhn", "digits", "synthetic")  # trainers.data.DATASETS
LOWMEM_SWITCHES = (  # trainers.methods.LowMemSwitches.names()
    "binary_inputs",
    "bn_sign_trick",
    "packed_masks",
    "fp16_grads",
    "po2_grads",
    "binary_dw",
    "fp16_state",
)
# Bop's low-bit momentum "E,M[,bias]" (trainers.bop.fpformat.FloatFormat): E and M ranges,
# and the format must stay inside float32's exponent range.
MOMENTUM_EXPONENT_BITS = (2, 8)
MOMENTUM_MANTISSA_BITS = (0, 23)
FLOAT32_MIN_EXPONENT = -149
FLOAT32_MAX_EXPONENT = 127
# Options of the continual-learning method the device runs (the rest would be ignored).
CWR_OPTIONS = ("name", "lr")


def default_optimizer(method: str) -> str:
    """The optimizer a method trains with when the plan names none (trainers.make_recipe)."""
    return "bop" if method == "bop" else "adam"


def momentum_format_problem(text: str) -> str | None:
    """None if `text` is a momentum format FloatFormat.parse accepts (or "auto"), else why."""
    if text == "auto":
        return None
    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in (2, 3):
        return "expected 'E,M', 'E,M,bias' or 'auto'"
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        return "expected integers 'E,M[,bias]' or 'auto'"
    e_bits, m_bits = numbers[0], numbers[1]
    for name, value, (low, high) in (
        ("exponent bits", e_bits, MOMENTUM_EXPONENT_BITS),
        ("mantissa bits", m_bits, MOMENTUM_MANTISSA_BITS),
    ):
        if not low <= value <= high:
            return f"{name} must be in {low}..{high}, got {value}"
    bias = numbers[2] if len(numbers) == 3 else 2 ** (e_bits - 1) - 1
    min_exponent, max_exponent = 1 - bias, 2**e_bits - 2 - bias
    if min_exponent - m_bits < FLOAT32_MIN_EXPONENT:
        return f"reaches 2^{min_exponent - m_bits}, below float32's smallest value; smaller bias"
    if max_exponent > FLOAT32_MAX_EXPONENT:
        return f"reaches 2^{max_exponent}, beyond float32's range; use a larger bias"
    return None


def recipe_problem(
    method: str,
    optimizer: str | None,
    enable: tuple[str, ...] | list[str],
    disable: tuple[str, ...] | list[str],
    momentum_format: str | None,
    lr_plateau: bool,
) -> tuple[str, str] | None:
    """(option, why) for a method's options the engine would refuse on the device, or None."""
    if method not in METHODS:
        return "name", f"unknown method; choose one of {', '.join(METHODS)}"
    if optimizer is not None and optimizer not in OPTIMIZERS:
        return "optimizer", f"unknown optimizer; choose one of {', '.join(OPTIMIZERS)}"
    for option, names in (("enable", enable), ("disable", disable)):
        for name in names:
            if name not in LOWMEM_SWITCHES:
                return option, (
                    f"unknown lowmem switch {name!r}; choose from {', '.join(LOWMEM_SWITCHES)}"
                )
    chosen = optimizer or default_optimizer(method)
    if momentum_format is not None:
        if chosen != "bop":
            return "momentum_format", f"needs the bop optimizer (this method uses {chosen})"
        problem = momentum_format_problem(momentum_format)
        if problem:
            return "momentum_format", problem
    if lr_plateau and chosen == "bop":
        return "lr_plateau", "needs an optimizer with a learning rate (not bop)"
    return None
