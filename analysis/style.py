"""One look for every figure: a seaborn theme, one colour per method, labels in words.

`apply_theme()` (called when `analysis.figures` is imported) sets seaborn's paper theme
with the colour-blind-safe palette; SVG keeps its text as text and PDF embeds TrueType
fonts, so a figure can be edited and typeset. `method_colours` gives each method the same
colour in every figure of every run: the built-in methods have fixed colours, any other
(a plan's label) the next free ones in name order.
"""

from __future__ import annotations

from collections.abc import Iterable

import seaborn as sns

# The built-in methods in a fixed order: their colours never change.
METHOD_ORDER = ("standard", "lowmem", "bop", "cwr", "script", "idle")
PALETTE = "colorblind"
# Column -> axis label in words with its unit.
LABELS = {
    "test_accuracy": "test accuracy (%)",
    "train_accuracy": "training accuracy (%)",
    "energy_per_epoch_j": "energy per epoch (J)",
    "energy_above_idle_per_epoch_j": "energy above idle per epoch (J)",
    "epoch_s": "time per epoch (s)",
    "step_s": "time per step (s)",
    "peak_rss_delta_mib": "peak memory increase, RSS (MiB)",
    "peak_tensor_mib": "peak tensor memory (MiB)",
    "power_w": "power (W)",
    "method": "method",
    "device": "device",
}
PERCENT_COLUMNS = ("test_accuracy", "train_accuracy")


def apply_theme() -> None:
    sns.set_theme(context="paper", style="whitegrid", palette=PALETTE, font_scale=1.1,
                  rc={"svg.fonttype": "none", "pdf.fonttype": 42, "ps.fonttype": 42,
                      "axes.titleweight": "bold", "legend.frameon": False})


def method_colours(methods: Iterable[str]) -> dict[str, tuple[float, float, float]]:
    """Method -> colour, the same in every figure: built-ins fixed, others after them."""
    colours = sns.color_palette(PALETTE, 10)
    named = {m: colours[i] for i, m in enumerate(METHOD_ORDER)}
    others = sorted({str(m) for m in methods if m is not None} - set(named))
    spare = colours[len(METHOD_ORDER):] or colours
    for i, method in enumerate(others):
        named[method] = spare[i % len(spare)]
    return named


def label(column: str) -> str:
    """The axis label for a column: words and unit (the column name if none is known)."""
    return LABELS.get(column, column.replace("_", " "))
