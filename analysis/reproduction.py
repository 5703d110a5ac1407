"""The reproduction table: the engine's modeled memory next to measured memory and docs/methods.md.

Modeled figures come from `python -m trainers memory --format json`, run as a
subprocess so that the host never imports torch; where torch is not installed the
modeled columns are empty and the table says so.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

MIB = 2**20
REPO = Path(__file__).resolve().parent.parent
MODEL_TIMEOUT_S = 120.0

# The papers' models and batch size (docs/methods.md §2 reference points: MNIST MLP, CIFAR-10
# and SVHN CNV, CIFAR-10 BinaryNet, batch 100).
PAPER_MODELS = ("mlp", "cnv", "binarynet")
PAPER_BATCH_SIZE = 100

# What docs/methods.md publishes about memory reduction (quoted, per method).
PUBLISHED = {
    "lowmem": "no per-model factor stated in docs/methods.md (§2)",
    "bop": "2.47x, 2.43x, 2.04x below 32-bit momentum depending on the model (docs/methods.md §3)",
}


class ModeledMemoryUnavailable(RuntimeError):
    """The engine's memory model could not be run (no torch, or the command failed)."""


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def modeled_memory(model: str, method: str, batch_size: int) -> list[dict]:
    """The published and extended model of one (model, method, batch) from the engine."""
    if not torch_available():
        raise ModeledMemoryUnavailable("torch is not installed: `trainers memory` cannot run")
    cmd = [sys.executable, "-m", "trainers", "memory", "--model", model, "--method", method,
           "--batch-size", str(batch_size), "--format", "json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=MODEL_TIMEOUT_S)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ModeledMemoryUnavailable(
            f"`{' '.join(cmd[1:])}` exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    doc = json.loads(lines[-1])
    rows = []
    for part in (doc, doc.get("extended")):
        if part:
            rows.append({"model": model, "method": method, "batch_size": batch_size,
                         "label": part.get("label", "published"),
                         **{k: part.get(k) for k in ("model_mib", "optimizer_mib",
                                                     "activations_mib", "total_mib")}})
    return rows


def modeled_table(combos: Iterable[tuple[str, str, int]]) -> tuple[pd.DataFrame, list[str]]:
    """Modeled rows for every (model, method, batch), and notes on what could not be modeled."""
    rows, notes = [], []
    for model, method, batch in sorted(set(combos)):
        try:
            rows.extend(modeled_memory(model, method, batch))
        except (ModeledMemoryUnavailable, subprocess.TimeoutExpired, ValueError) as exc:
            notes.append(f"modeled memory of {model}/{method}/b{batch} unavailable: {exc}")
    columns = ["model", "method", "batch_size", "label", "model_mib", "optimizer_mib",
               "activations_mib", "total_mib"]
    return pd.DataFrame(rows, columns=columns), notes


def run_combos(jobs: pd.DataFrame, extra_models: Iterable[str] = (),
               methods: tuple[str, ...] = ("standard", "lowmem")) -> list[tuple[str, str, int]]:
    """Both methods of every (model, batch) the run trained, and of `extra_models` at the
    papers' batch size."""
    trained = jobs.dropna(subset=["model", "batch_size"])
    pairs = {(str(m), int(b)) for m, b in zip(trained["model"], trained["batch_size"])}
    pairs |= {(m, PAPER_BATCH_SIZE) for m in extra_models}
    return [(m, meth, b) for m, b in sorted(pairs) for meth in methods]


def _measured(jobs: pd.DataFrame, model: str, batch: int, method: str, col: str) -> float:
    sel = jobs[(jobs["model"] == model) & (jobs["batch_size"] == batch)
               & (jobs["method"] == method) & (jobs["result_status"] == "completed")]
    value = pd.to_numeric(sel[col], errors="coerce").mean()
    return float(value) / MIB if pd.notna(value) else float("nan")


def reproduction_table(jobs: pd.DataFrame, modeled: pd.DataFrame) -> pd.DataFrame:
    """Per (model, batch): modeled standard/lowmem MiB and factor (published and extended
    model), measured peaks and factor, and what docs/methods.md publishes."""
    keys = set(zip(modeled["model"], modeled["batch_size"].astype(int))) if len(modeled) else set()
    trained = jobs.dropna(subset=["model", "batch_size"])
    keys |= {(str(m), int(b)) for m, b in zip(trained["model"], trained["batch_size"])}
    rows = []
    for model, batch in sorted(keys):
        row: dict = {"model": model, "batch_size": batch}
        for label in ("published", "extended"):
            sel = modeled[(modeled["model"] == model) & (modeled["batch_size"] == batch)
                          & (modeled["label"] == label)].set_index("method")["total_mib"]
            std, low = sel.get("standard", float("nan")), sel.get("lowmem", float("nan"))
            row[f"modeled_{label}_standard_mib"] = std
            row[f"modeled_{label}_lowmem_mib"] = low
            row[f"modeled_{label}_factor"] = std / low if low else float("nan")
        for col, name in (("peak_tensor_bytes", "tensor"), ("peak_rss_delta_bytes", "rss_delta")):
            std = _measured(jobs, model, batch, "standard", col)
            low = _measured(jobs, model, batch, "lowmem", col)
            row[f"measured_{name}_standard_mib"] = std
            row[f"measured_{name}_lowmem_mib"] = low
            row[f"measured_{name}_factor"] = std / low if low else float("nan")
        row["published_lowmem"] = PUBLISHED["lowmem"]
        rows.append(row)
    return pd.DataFrame(rows)
