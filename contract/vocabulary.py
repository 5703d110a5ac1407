"""The engine's vocabulary: the names a job, a plan or a command line may use.

The engine (`trainers`) builds its tables from these names and a test holds the two
equal, so the host can check a plan on a machine without torch: a model `mpl` or a
switch `fp16grads` is refused by `harness plan show`, before any device is touched.
"""

from __future__ import annotations

from contract.fields import SpecError

MODELS = ("mlp", "cnv", "binarynet", "resnete18")
TRAINING_METHODS = ("standard", "lowmem", "bop", "cwr")
IDLE_METHOD = "idle"  # the idle baseline: no training, the samplers run (a job kind of its own)
SCRIPT_METHOD = "script"  # the user's own training script, run by the agent like a job
METHODS = (*TRAINING_METHODS, IDLE_METHOD, SCRIPT_METHOD)
OPTIMIZERS = ("adam", "sgd", "bop")
DATASETS = ("mnist", "cifar10", "svhn", "digits", "synthetic")

# Wang et al.'s low-memory techniques, one switch each (see docs/methods.md, "lowmem").
LOWMEM_TECHNIQUES = (
    "binary_inputs",
    "bn_sign_trick",
    "packed_masks",
    "fp16_grads",
    "po2_grads",
    "binary_dw",
    "fp16_state",
)
# Wang et al.'s code's exact numerics where ours differ, each a variant of one technique
# (docs/methods.md, "Variants"): it is refused without that technique, and `lowmem` leaves
# it off unless `LOWMEM_DEFAULT_VARIANTS` names it (benchmarks/wang_ablation.py decides).
LOWMEM_VARIANTS = {
    "wang_bn_trick": "bn_sign_trick",  # keep sgn(x_hat), mean|x_hat|; beta added outside
    "wang_po2": "po2_grads",  # round dZ, window, clamp (not dY, [R-15, R], flush)
    "wang_fp16": "fp16_grads",  # activation gradients float16 (not bfloat16)
}
LOWMEM_DEFAULT_VARIANTS: tuple[str, ...] = ()
LOWMEM_SWITCHES = (*LOWMEM_TECHNIQUES, *LOWMEM_VARIANTS)

# Bop's low-bit momentum: "E,M" or "E,M,bias" (sign + E exponent bits + M mantissa bits),
# or "auto" (searched on warm-up batches). The values must stay inside float32's range.
MOMENTUM_AUTO = "auto"
EXPONENT_BITS_RANGE = (2, 8)
MANTISSA_BITS_RANGE = (0, 23)
FLOAT32_MIN_EXPONENT = -149  # exponent of float32's smallest subnormal
FLOAT32_MAX_EXPONENT = 127


def default_optimizer(method: str) -> str:
    """The optimizer a method trains with unless told otherwise."""
    return "bop" if method == "bop" else "adam"


def parse_momentum_format(text: str, name: str = "momentum_format") -> tuple[int, int, int]:
    """(exponent bits, mantissa bits, bias) of "E,M[,bias]"; `SpecError` naming `name`.

    Without a bias the IEEE one, 2**(E-1) - 1. "5,10" is float16, "8,7" bfloat16.
    """
    parts = [part.strip() for part in str(text).split(",")]
    if len(parts) not in (2, 3):
        raise SpecError(name, text, "'E,M' or 'E,M,bias'")
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        raise SpecError(name, text, "integers 'E,M[,bias]'") from None
    e_bits, m_bits = numbers[:2]
    for what, value, (low, high) in (
        ("exponent bits", e_bits, EXPONENT_BITS_RANGE),
        ("mantissa bits", m_bits, MANTISSA_BITS_RANGE),
    ):
        if not low <= value <= high:
            raise SpecError(name, value, f"{what} in {low}..{high} (in {text!r})")
    bias = numbers[2] if len(numbers) == 3 else 2 ** (e_bits - 1) - 1
    check_momentum_range(e_bits, m_bits, bias, name)
    return e_bits, m_bits, bias


def check_momentum_range(e_bits: int, m_bits: int, bias: int, name: str) -> None:
    """Refuse a format whose values leave float32's range (a bias too large or too small)."""
    spec = f"{e_bits},{m_bits},{bias}"
    if (1 - bias) - m_bits < FLOAT32_MIN_EXPONENT:
        raise SpecError(
            name, spec, f"a format reaching no lower than 2^{FLOAT32_MIN_EXPONENT} "
            f"(float32's smallest value; it reaches 2^{1 - bias - m_bits}: use a smaller bias)"
        )
    if 2**e_bits - 2 - bias > FLOAT32_MAX_EXPONENT:
        raise SpecError(
            name, spec, f"a format reaching no higher than 2^{FLOAT32_MAX_EXPONENT} "
            f"(it reaches 2^{2**e_bits - 2 - bias}: use a larger bias)"
        )


def check_momentum_format(value: str, name: str = "momentum_format") -> str:
    """`value` if it is "auto" or a valid "E,M[,bias]"; `SpecError` otherwise."""
    if value != MOMENTUM_AUTO:
        parse_momentum_format(value, name)
    return value
