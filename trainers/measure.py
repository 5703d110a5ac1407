"""Measured training memory and step time: tensor level and process level.

Tensor level: a `TorchDispatchMode` sees the output of every op, so every storage
that training allocates is noted when it appears (and a `weakref.finalize` on the
storage notes when it is freed). Each storage is then attributed to one category:
`parameters` (model parameters and buffers), `optimizer_state` (tensors in the
optimizer's `state`), `gradients` (parameter `.grad` and packed 1-bit weight
gradients), `saved_activations` (what autograd keeps for backward, seen through
`saved_tensors_hooks`) and `temporaries` (everything else). Attribution is settled
after the steps, so a storage counts in its category for its whole life; the peak is
the maximum over time of the live bytes, with the breakdown at that moment.

Process level: the high-water mark of the resident set (VmHWM) above the baseline
after model, optimizer and data exist, reset through `/proc/self/clear_refs` (its growth),
and that high-water mark itself (the absolute peak). They differ from the ledger's peak
because RSS also counts what no tensor owns: the allocator's free but still mapped pages
and fragmentation, oneDNN's and OpenMP's scratch and thread stacks, autograd's graph
nodes, and the first touch of pages that later steps reuse; the absolute peak adds the
interpreter, torch's libraries and the engine (typically 250-350 MiB before any tensor).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from trainers.procmem import read_memory, reset_peak_rss

CATEGORIES = ("parameters", "optimizer_state", "saved_activations", "gradients", "temporaries")
# A storage that is several things at once counts as the first of them (a weight that
# autograd saves for backward is still a parameter).
_PRIORITY = {name: rank for rank, name in enumerate(
    ("parameters", "optimizer_state", "gradients", "saved_activations", "temporaries"))}
# Temporaries by the phase that made them; "backward" are activation gradients and their
# scratch, "backward_other" what backward makes in a parameter's shape (weight-gradient
# scratch, per-channel sums) or as a scalar.
PHASES = ("setup", "input", "forward", "backward", "backward_other", "optimizer")

Batch = tuple[torch.Tensor, torch.Tensor]
StepFn = Callable[[torch.Tensor, torch.Tensor], object]


@dataclass
class StorageRecord:
    """One storage seen during measurement: its size, what it is, and which op made it."""

    nbytes: int
    origin: str
    phase: str
    shape: tuple[int, ...]
    dtype: str
    category: str = "temporaries"


@dataclass(frozen=True)
class LiveStorage:
    """A storage live at the peak, for the 'where are the bytes' listing."""

    nbytes: int
    category: str
    origin: str
    phase: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class TensorPeak:
    """The tensor-level result: peak bytes, the breakdown at the peak, per-category maxima."""

    peak_bytes: int
    breakdown: dict[str, int]
    category_max_bytes: dict[str, int]
    temporaries_by_phase: dict[str, int]  # `temporaries` at the peak, by the phase making them
    temporaries_max_by_phase: dict[str, int]  # the maximum over time of each of those
    largest_at_peak: list[LiveStorage]


def tensors_in(obj: object, depth: int = 4) -> Iterator[torch.Tensor]:
    """Tensors held by `obj` directly or inside containers, dataclasses and plain objects."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth <= 0 or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value, depth - 1)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from tensors_in(value, depth - 1)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from tensors_in(getattr(obj, f.name), depth - 1)
    elif hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            yield from tensors_in(value, depth - 1)


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, meta or wrapper tensors
        return None


class TensorLedger(TorchDispatchMode):
    """Notes every storage that ops create, and when it is freed, as a list of events.

    Storages are keyed by their StorageImpl address (`_cdata`), which is stable when a
    storage is resized; a resize is noted as a change in size.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[StorageRecord] = []
        self.live: dict[int, int] = {}  # StorageImpl address -> record index
        self.events: list[tuple[int, int]] = []  # (record index, byte delta) in time order
        self.phase = "setup"
        # shapes of parameters (and transposes): tells weight-gradient scratch from the rest
        self.parameter_shapes: set[tuple[int, ...]] = set()

    # -- noting storages ------------------------------------------------------------------
    def track(self, tensor: torch.Tensor, origin: str, phase: str | None = None) -> int | None:
        """Note `tensor`'s storage if it is new; return its record index."""
        storage = _storage(tensor)
        if storage is None:
            return None
        key = storage._cdata
        nbytes = storage.nbytes()
        index = self.live.get(key)
        if index is not None:
            delta = nbytes - self.records[index].nbytes
            if delta:  # resized in place
                self.records[index].nbytes = nbytes
                self.events.append((index, delta))
            return index
        if nbytes == 0:
            return None
        index = len(self.records)
        phase = phase or self.phase
        shape = tuple(tensor.shape)
        if phase == "backward" and (len(shape) < 2 or shape in self.parameter_shapes):
            phase = "backward_other"
        self.records.append(StorageRecord(nbytes, origin, phase, shape,
                                          str(tensor.dtype).removeprefix("torch.")))
        self.live[key] = index
        self.events.append((index, nbytes))
        weakref.finalize(storage, self._freed, key, index)
        return index

    def _freed(self, key: int, index: int) -> None:
        if self.live.get(key) == index:
            del self.live[key]
            self.events.append((index, -self.records[index].nbytes))

    def tag(self, tensor: torch.Tensor, category: str, origin: str = "existing") -> None:
        """Attribute `tensor`'s storage to `category` (a stronger category wins)."""
        index = self.track(tensor, origin)
        if index is None:
            return
        record = self.records[index]
        if _PRIORITY[category] < _PRIORITY[record.category]:
            record.category = category

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            s._cdata
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and (s := _storage(t)) is not None
        }
        phase = "backward" if torch._C._current_autograd_node() is not None else self.phase
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = _storage(t)
            if storage is None:
                continue
            if storage._cdata in inputs and storage._cdata not in self.live:
                continue  # a view or in-place result of a storage that predates the ledger
            self.track(t, origin=str(func), phase=phase)
        return out

    @contextlib.contextmanager
    def saved_tensors(self) -> Iterator[None]:
        """Tag what autograd saves for backward as `saved_activations`."""

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            self.tag(tensor, "saved_activations", origin="saved")
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield

    # -- reading the timeline -------------------------------------------------------------
    def peak(self, top: int = 12) -> TensorPeak:
        """Replay the events: the peak of live bytes, its breakdown, per-category maxima."""
        totals = dict.fromkeys(CATEGORIES, 0)
        maxima = dict.fromkeys(CATEGORIES, 0)
        phase_totals = dict.fromkeys(PHASES, 0)
        phase_maxima = dict.fromkeys(PHASES, 0)
        live_now: dict[int, int] = {}
        total = peak = 0
        peak_live: dict[int, int] = {}
        peak_totals = dict(totals)
        for index, delta in self.events:
            category = self.records[index].category
            totals[category] += delta
            maxima[category] = max(maxima[category], totals[category])
            if category == "temporaries":
                phase = self.records[index].phase
                phase_totals[phase] += delta
                phase_maxima[phase] = max(phase_maxima[phase], phase_totals[phase])
            live_now[index] = live_now.get(index, 0) + delta
            if live_now[index] == 0:
                del live_now[index]
            total += delta
            if total > peak:
                peak, peak_totals, peak_live = total, dict(totals), dict(live_now)
        by_phase = dict.fromkeys(PHASES, 0)
        for index, nbytes in peak_live.items():
            record = self.records[index]
            if record.category == "temporaries":
                by_phase[record.phase] += nbytes
        largest = heapq.nlargest(top, peak_live.items(), key=lambda item: item[1])
        return TensorPeak(
            peak_bytes=peak,
            breakdown=peak_totals,
            category_max_bytes=maxima,
            temporaries_by_phase=by_phase,
            temporaries_max_by_phase=phase_maxima,
            largest_at_peak=[
                LiveStorage(nbytes, r.category, r.origin, r.phase, r.shape, r.dtype)
                for i, nbytes in largest
                if (r := self.records[i])
            ],
        )


def _tag_model_and_optimizer(
    ledger: TensorLedger, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    for tensor in model.buffers():
        ledger.tag(tensor, "parameters")
    for param in model.parameters():
        ledger.tag(param, "parameters")
        for grad in tensors_in([param.grad, getattr(param, "packed_grad", None)]):
            ledger.tag(grad, "gradients")
    for tensor in tensors_in(list(optimizer.state.values())):
        ledger.tag(tensor, "optimizer_state")


def track_tensor_peak(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: StepFn,
    batches: list[Batch],
) -> TensorPeak:
    """Run `step` on each batch under a ledger and return the tensor-level peak.

    The batches are taken out of the list one by one (the caller hands them over), so
    only the current batch is live during a step.

    Storages that exist before (parameters, buffers, gradients, optimizer state, the
    batches) are noted at the start; gradients are tagged just before the optimizer's
    step, optimizer state just after it.
    """
    ledger = TensorLedger()
    for param in model.parameters():
        ledger.parameter_shapes |= {tuple(param.shape), tuple(reversed(param.shape))}
    _tag_model_and_optimizer(ledger, model, optimizer)

    def before_step(*_args) -> None:
        ledger.phase = "optimizer"
        _tag_model_and_optimizer(ledger, model, optimizer)

    def after_step(*_args) -> None:
        _tag_model_and_optimizer(ledger, model, optimizer)
        ledger.phase = "forward"

    hooks = [optimizer.register_step_pre_hook(before_step),
             optimizer.register_step_post_hook(after_step)]
    try:
        while batches:
            x, y = batches.pop(0)
            ledger.phase = "input"
            ledger.track(x, origin="batch")
            ledger.track(y, origin="batch")
            ledger.phase = "forward"
            with ledger, ledger.saved_tensors():
                step(x, y)
            _tag_model_and_optimizer(ledger, model, optimizer)
            del x, y
    finally:
        for hook in hooks:
            hook.remove()
    return ledger.peak()


# -- process level ------------------------------------------------------------------------
@dataclass
class RssWatch:
    """The process's resident-set peak above a baseline taken at `start()`.

    With `/proc/self/clear_refs` (Linux) the kernel's high-water mark is reset to the
    current RSS and read back as VmHWM; elsewhere RSS is sampled with psutil at each
    `sample()` call, which can miss short peaks (`method` says which was used).
    """

    baseline_bytes: int = 0
    sampled_peak_bytes: int = 0
    method: str = "psutil-sampled"

    def start(self) -> None:
        self.method = "vmhwm" if reset_peak_rss() else "psutil-sampled"
        self.baseline_bytes = psutil.Process().memory_info().rss
        self.sampled_peak_bytes = self.baseline_bytes

    def sample(self) -> None:
        self.sampled_peak_bytes = max(self.sampled_peak_bytes, psutil.Process().memory_info().rss)

    def peak_bytes(self) -> int:
        """The process's absolute resident-set peak since `start()`."""
        return self.baseline_bytes + self.peak_delta_bytes()

    def peak_delta_bytes(self) -> int:
        self.sample()
        peak = self.sampled_peak_bytes
        if self.method == "vmhwm":
            hwm_bytes = read_memory().hwm_bytes
            if hwm_bytes is not None:
                peak = max(peak, hwm_bytes)
        return max(0, peak - self.baseline_bytes)


@dataclass
class Measurement:
    """What `measure` reports for one configuration."""

    peak_tensor_bytes: int
    peak_rss_delta_bytes: int  # the process's resident-set peak above the baseline
    step_time_s: float
    breakdown: dict[str, int]
    category_max_bytes: dict[str, int]
    temporaries_by_phase: dict[str, int]
    temporaries_max_by_phase: dict[str, int]
    largest_at_peak: list[LiveStorage]
    step_times_s: list[float] = field(default_factory=list)
    peak_rss_bytes: int = 0  # the absolute resident-set peak (baseline included)
    rss_baseline_bytes: int = 0  # RSS with model, optimizer, data and engine loaded
    rss_method: str = ""
    tensor_steps: int = 0
    torch_threads: int = 0
    cpu_capability: str = ""


def measure_training(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: StepFn,
    make_batch: Callable[[int], Batch],
    steps: int,
    tensor_steps: int = 2,
) -> Measurement:
    """Time `steps` training steps (the first is a warm-up) and watch the process peak,
    then run `tensor_steps` more under the tensor ledger for the tensor-level peak.

    The ledger slows each op down, so timing and RSS come from the untracked steps.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    batches = [make_batch(i) for i in range(steps)]
    rss = RssWatch()
    rss.start()
    times: list[float] = []
    for x, y in batches:
        start = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - start)
        rss.sample()
    rss_delta = rss.peak_delta_bytes()
    del batches, x, y
    timed = times[1:] or times
    tracked = [make_batch(steps + i) for i in range(tensor_steps)]
    tensor = track_tensor_peak(model, optimizer, step, tracked)
    return Measurement(
        peak_tensor_bytes=tensor.peak_bytes,
        peak_rss_delta_bytes=rss_delta,
        step_time_s=statistics.median(timed),
        breakdown=tensor.breakdown,
        category_max_bytes=tensor.category_max_bytes,
        temporaries_by_phase=tensor.temporaries_by_phase,
        temporaries_max_by_phase=tensor.temporaries_max_by_phase,
        largest_at_peak=tensor.largest_at_peak,
        step_times_s=times,
        peak_rss_bytes=rss.baseline_bytes + rss_delta,
        rss_baseline_bytes=rss.baseline_bytes,
        rss_method=rss.method,
        tensor_steps=tensor_steps,
        torch_threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
    )
