"""Exact fast kernels for binary layers: +-1 products in int8 with int32 accumulation.

A product of +-1 operands summed over K terms is an integer of magnitude <= K, so the
int8 matrix product (`torch._int_mm`, int32 accumulation) gives exactly the value the
fp32 product gives (fp32 sums integers exactly below 2^24). Convolutions run as an
im2col unfold in int8 (channels-last windows, so one strided copy builds the columns)
followed by the same product.

Which path runs is a process-wide switch: `set_compute("int8" | "fp32" | "auto")`, default
from the environment variable `BNN_COMPUTE` (else "auto"). The backward pass of the
low-memory block computes its activation and weight gradients in `grad_dtype()`
(bfloat16 by default, `BNN_GRAD_DTYPE` = bf16 | fp16 | fp32) when the products are int8 and
the recipe's gradients are 16-bit anyway; see `trainers.lowmem`.

"auto" times int8 against float32 products once per process, on one thread and a small
product (a few milliseconds), and keeps the faster: int8 products are fast only where the
CPU has int8 dot products (VNNI, ARM's dot product) and torch uses them; elsewhere torch
runs them element by element (torch 2.13 on an AVX2 host without VNNI: `_int_mm` 30-40x
slower than float32, its bfloat16 `mm` too), which made lowmem 10x slower than a plain
float32 network there. Both give the same forward results (exact +-1 products); the float32
path's backward products are float32 (docs/performance.md: what that costs in memory).

Threads: the low-memory block's many short, memory-bound passes over chunks (batch-norm
statistics, packing, masks) gain little from a second thread and lose much to OpenMP's
fork/join when cores are busy (about 24 ms per op against 0.1 ms single-threaded, on this
shared 2-core host). They run with `BNN_ELEMENTWISE_THREADS` threads (default 1; 0 = all)
inside `elementwise_threads()`, while the products (`linear_int8`, `conv2d_int8`, `conv2d`,
`linear`, `bit_conv`, `matmul`, `conv2d_input`, `conv2d_weight`) always use all of torch's
threads.

XNOR-popcount (`bit_conv`, `trainers/csrc/bit_kernels.cpp`): a hidden conv or dense layer's
input is +-1 and the fused block holds it as packed sign bits already, so its forward product is
C - 2 popcount(x XOR w) per tap, exact like the int8 product and without an unpacked input
or im2col columns. `BNN_BIT_FORWARD=0` (or `set_bit_forward(False)`) turns it off.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from trainers import native
from trainers.threads import governor

COMPUTE_CHOICES = ("int8", "fp32", "auto")
GRAD_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

_compute = os.environ.get("BNN_COMPUTE", "auto")
_grad_dtype = os.environ.get("BNN_GRAD_DTYPE", "bf16")
# What "auto" chose, timed once per process (see the module doc); None until asked.
_auto_compute: str | None = None
_elementwise_threads = int(os.environ.get("BNN_ELEMENTWISE_THREADS", "1"))
_bit_forward = os.environ.get("BNN_BIT_FORWARD", "1") != "0"
# torch's thread count outside `elementwise_threads()` (None when not inside one).
_full_threads: int | None = None


def set_elementwise_threads(count: int) -> None:
    """Threads for the low-memory block's elementwise passes (0 = all of torch's)."""
    global _elementwise_threads
    if count < 0:
        raise ValueError(f"elementwise threads must be >= 0, got {count}")
    _elementwise_threads = count


@contextlib.contextmanager
def elementwise_threads() -> Iterator[None]:
    """Run the enclosed elementwise passes with the elementwise thread count."""
    global _full_threads
    full = torch.get_num_threads()
    want = _elementwise_threads or full
    if _full_threads is not None or want >= full:
        yield
        return
    _full_threads = full
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(full)
        _full_threads = None


@contextlib.contextmanager
def all_threads() -> Iterator[None]:
    """Inside `elementwise_threads()`, give a product all of torch's threads back."""
    if _full_threads is None:
        yield
        return
    torch.set_num_threads(_full_threads)
    try:
        yield
    finally:
        torch.set_num_threads(_elementwise_threads)


def _best_seconds(product, repeats: int = 5) -> float:
    product()  # first call: lazy initialisation, not the product's cost
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - start)
    return best


def _fastest(candidates: dict[str, Callable[[], object]]) -> str:
    """The name of the fastest of these zero-argument products (the first wins a tie)."""
    times = {name: _best_seconds(product) for name, product in candidates.items()}
    return min(times, key=lambda name: times[name])


def _auto() -> str:
    """What "auto" means here: the faster of int8 and float32 products of +-1 operands of a
    small layer's size, timed once, on one thread (a second thread's fork/join under
    contention would time the scheduler, not the product)."""
    global _auto_compute
    if _auto_compute is None:
        generator = torch.Generator().manual_seed(0)
        a = torch.randint(-1, 2, (64, 512), dtype=torch.int8, generator=generator)
        b = torch.randint(-1, 2, (512, 64), dtype=torch.int8, generator=generator)
        af, bf = a.float(), b.float()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _auto_compute = _fastest({"int8": lambda: torch._int_mm(a, b),
                                      "fp32": lambda: af.mm(bf)})
        finally:
            torch.set_num_threads(threads)
    return _auto_compute


def set_compute(name: str) -> None:
    """Select the forward kernels of binary layers: "int8" (exact, fast where the CPU has
    int8 dot products), "fp32", or "auto" (the faster of the two here)."""
    global _compute
    if name not in COMPUTE_CHOICES:
        raise ValueError(f"compute must be one of {COMPUTE_CHOICES}, got {name!r}")
    _compute = name


def get_compute() -> str:
    """"int8" or "fp32": the forward kernels that run ("auto" resolved)."""
    if _compute not in COMPUTE_CHOICES:
        raise ValueError(f"BNN_COMPUTE must be one of {COMPUTE_CHOICES}, got {_compute!r}")
    return _auto() if _compute == "auto" else _compute


def set_grad_dtype(name: str) -> None:
    """Select the dtype of the fast backward's products: "bf16", "fp16" or "fp32"."""
    global _grad_dtype
    if name not in GRAD_DTYPES:
        raise ValueError(f"grad dtype must be one of {tuple(GRAD_DTYPES)}, got {name!r}")
    _grad_dtype = name


def grad_dtype() -> torch.dtype:
    if _grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"BNN_GRAD_DTYPE must be one of {tuple(GRAD_DTYPES)}, "
                         f"got {_grad_dtype!r}")
    return GRAD_DTYPES[_grad_dtype]


def set_bit_forward(enabled: bool) -> None:
    """Whether hidden conv and dense layers of the fused low-memory block run XNOR-popcount
    on their input's sign bits (`bit_conv`); off, they run `get_compute()`'s product."""
    global _bit_forward
    _bit_forward = enabled


def bit_forward_enabled() -> bool:
    """XNOR-popcount forward switched on (`BNN_BIT_FORWARD`, default 1) and compiled."""
    return _bit_forward and native.kernels() is not None


def bit_conv(x_bits: torch.Tensor, in_shape: tuple[int, int, int, int], w_bits: torch.Tensor,
             kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
             ) -> torch.Tensor:
    """Exact binary conv of packed sign-bit rows (n*h*w, ceil(C/8)) with packed sgn(W) per
    tap (out, kh*kw*ceil(C/8)) -> int32 NCHW (a channels-last view), with all threads."""
    n, c, h, w = in_shape
    ho, wo = conv_geometry((h, w), kernel, stride, padding)
    with all_threads():
        rows = native.kernels().bit_conv(x_bits, n, h, w, c, w_bits, *kernel, *stride, *padding)
    return rows.view(n, ho, wo, -1).permute(0, 3, 1, 2)


def int8_enabled() -> bool:
    return get_compute() == "int8"


def sign_int8(x: torch.Tensor) -> torch.Tensor:
    """sgn(x) as int8 +-1 (sgn(0) = +1)."""
    out = (x >= 0).to(torch.int8)
    return out.mul_(2).sub_(1)


def weight_matrix_int8(w_sign: torch.Tensor) -> torch.Tensor:
    """sgn(W) as the (K, out) int8 right operand: K = in (dense) or kh*kw*C_in (conv,
    channels-last order, matching `unfold_int8`)."""
    w = w_sign if w_sign.dim() == 2 else w_sign.permute(0, 2, 3, 1)
    return sign_int8(w.reshape(w.shape[0], -1)).t()


def linear_int8(x: torch.Tensor, w_mat: torch.Tensor) -> torch.Tensor:
    """(n, K) int8 @ (K, out) int8 -> (n, out) int32, exact."""
    with all_threads():
        return torch._int_mm(x, w_mat)


def conv_geometry(in_hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                  padding: tuple[int, int]) -> tuple[int, int]:
    """Output height and width of a convolution."""
    return tuple((size + 2 * p - k) // s + 1
                 for size, k, s, p in zip(in_hw, kernel, stride, padding))


def unfold_int8(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int]) -> torch.Tensor:
    """im2col of an int8 NCHW tensor: (n * ho * wo, kh * kw * C), window-major, channel-minor."""
    n, c, h, w = x.shape
    xl = x.permute(0, 2, 3, 1)  # channels last
    if padding[0] or padding[1]:
        xl = F.pad(xl, (0, 0, padding[1], padding[1], padding[0], padding[0]))
    xl = xl.contiguous()
    ho, wo = conv_geometry((h, w), kernel, stride, padding)
    sn, sh, sw, sc = xl.stride()
    windows = xl.as_strided((n, ho, wo, kernel[0], kernel[1], c),
                            (sn, sh * stride[0], sw * stride[1], sh, sw, sc))
    return windows.reshape(n * ho * wo, kernel[0] * kernel[1] * c)


def conv2d_int8(x: torch.Tensor, w_mat: torch.Tensor, kernel: tuple[int, int],
                stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """Exact conv of int8 +-1 NCHW input with the (K, out) int8 weight matrix -> int32 NCHW
    (a channels-last view; no copy)."""
    n, _, h, w = x.shape
    ho, wo = conv_geometry((h, w), kernel, stride, padding)
    with all_threads():
        out = torch._int_mm(unfold_int8(x, kernel, stride, padding), w_mat)
    return out.view(n, ho, wo, -1).permute(0, 3, 1, 2)


def conv2d(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
           padding: tuple[int, int]) -> torch.Tensor:
    """A float convolution with all threads (the fp32 forward of binary layers)."""
    with all_threads():
        return F.conv2d(x, weight, None, stride, padding)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T in float with all threads (the fp32 forward of binary dense layers)."""
    with all_threads():
        return F.linear(x, weight)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with all threads (the backward's 16-bit products)."""
    with all_threads():
        return a.mm(b)


def conv2d_input(in_shape: tuple[int, ...], weight: torch.Tensor, grad: torch.Tensor,
                 stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """Gradient of a convolution's input, with all threads."""
    with all_threads():
        return torch.nn.grad.conv2d_input(in_shape, weight, grad, stride, padding)


def conv2d_weight(x: torch.Tensor, weight_shape: tuple[int, ...], grad: torch.Tensor,
                  stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """Gradient of a convolution's weight, with all threads."""
    with all_threads():
        return torch.nn.grad.conv2d_weight(x, weight_shape, grad, stride, padding)


def unfold_bytes_per_sample(in_shape: tuple[int, ...], kernel: tuple[int, int],
                            stride: tuple[int, int], padding: tuple[int, int]) -> int:
    """Bytes of one sample's int8 im2col columns."""
    c, h, w = in_shape
    ho, wo = conv_geometry((h, w), kernel, stride, padding)
    return ho * wo * kernel[0] * kernel[1] * c


# aarch64 HWCAP / HWCAP2 bits (Linux's asm/hwcap.h) -> /proc/cpuinfo's feature names.
_AARCH64_HWCAP = {1: "asimd", 9: "fphp", 10: "asimdhp", 20: "asimddp", 22: "sve"}
_AARCH64_HWCAP2 = {1: "sve2", 13: "i8mm", 14: "bf16"}
_AT_HWCAP, _AT_HWCAP2 = 16, 26


def _hwcap_flags() -> set[str]:
    """aarch64 features from the kernel's auxiliary vector (right under qemu-user too, where
    /proc/cpuinfo is the host's); empty elsewhere."""
    if platform.machine() != "aarch64":
        return set()
    try:
        import ctypes

        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype = ctypes.c_ulong
        getauxval.argtypes = [ctypes.c_ulong]
        hwcap, hwcap2 = getauxval(_AT_HWCAP), getauxval(_AT_HWCAP2)
    except (OSError, AttributeError):
        return set()
    return ({name for bit, name in _AARCH64_HWCAP.items() if hwcap >> bit & 1}
            | {name for bit, name in _AARCH64_HWCAP2.items() if hwcap2 >> bit & 1})


def _cpu_flags() -> set[str]:
    flags = _hwcap_flags()
    if flags:
        return flags
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The features `describe` lists (x86 and ARM), when the CPU has them.
_REPORTED_FLAGS = ("avx2", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "asimd", "fphp",
                   "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2")


def describe() -> dict:
    """What runs where: kernel choice, threads, CPU capability (for `measure` and benchmarks)."""
    flags = _cpu_flags()
    return {
        "compute": get_compute() + (" (auto: the faster here)" if _compute == "auto" else ""),
        "lowmem_block": native.status(),
        "forward_kernel": (("hidden layers: XNOR-popcount on sign bits; "
                            if bit_forward_enabled() else "")
                           + ("int8 _int_mm (im2col for conv), int32 accumulation"
                              if int8_enabled() else "fp32 F.linear / F.conv2d")),
        "backward_dtype": str(grad_dtype()).removeprefix("torch.") if int8_enabled()
        else "float32",
        "torch_threads": _full_threads or torch.get_num_threads(),
        "elementwise_threads": _elementwise_threads or torch.get_num_threads(),
        "thread_governor": governor.describe(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "cpu_features": " ".join(f for f in _REPORTED_FLAGS if f in flags) or "none found",
        "kernel_simd": native.simd_features(),
        "cpu_int8_dot": bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"}),
        "cpu_bf16": bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}),
        "torch_version": torch.__version__,
    }
