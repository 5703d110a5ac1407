"""XNOR-popcount on packed sign bits against torch's float32 convolution of the same signs,
layer by layer: the forward product of `lowmem`'s hidden conv layers (docs/performance.md).

For each hidden conv layer of cnv and binarynet (batch 100): torch's `F.conv2d` on +-1
float32 input and weights (what a plain network and lowmem's float32 path run) and
`kernels.bit_conv` on the same signs as packed bits (what lowmem runs), median of `--repeats`
calls each, alternating, and the ratio; the outputs are checked equal first.

    python benchmarks/bit_conv.py [--repeats 7] [--threads 2] [--batch-size 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# (model, in channels, out channels, input side, padding): docs/methods.md's hidden conv layers
LAYERS = [
    ("cnv", 64, 64, 30, 0), ("cnv", 64, 128, 14, 0), ("cnv", 128, 128, 12, 0),
    ("cnv", 128, 256, 5, 0), ("cnv", 256, 256, 3, 0),
    ("binarynet", 128, 128, 32, 1), ("binarynet", 128, 256, 16, 1),
    ("binarynet", 256, 256, 16, 1), ("binarynet", 256, 512, 8, 1), ("binarynet", 512, 512, 8, 1),
]


def signs(t: torch.Tensor) -> torch.Tensor:
    """+-1 with sgn(0) = +1, the engine's convention (torch.sign would give 0)."""
    return torch.where(t >= 0, 1.0, -1.0)


def median_ms(calls: list, repeats: int) -> list[float]:
    """Median milliseconds of each zero-argument call, the calls alternating."""
    for call in calls:
        call()  # first call: lazy initialisation
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, out in zip(calls, times):
            start = time.perf_counter()
            call()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1 or args.batch_size < 1:
        parser.error("--repeats, --threads and --batch-size must be >= 1")

    from trainers import kernels, native
    from trainers.lowmem_fused import conv_weight_bits

    ext = native.kernels()
    if ext is None:
        print(f"the compiled kernels are not available: {native.status()}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average before: {load}; {args.threads} threads, batch {args.batch_size}, "
          f"kernel simd {native.simd_features()}, torch {torch.__version__}")
    print(f"{'model':>9} {'layer':>22} {'fp32 ms':>9} {'bits ms':>9} {'fp32 / bits':>12}")
    generator = torch.Generator().manual_seed(0)
    n = args.batch_size
    for model, cin, cout, side, pad in LAYERS:
        x = signs(torch.randn(n, cin, side, side, generator=generator))
        w = signs(torch.randn(cout, cin, 3, 3, generator=generator))
        rows = x.permute(0, 2, 3, 1).reshape(-1, cin).contiguous()
        bits = ext.sign_pack(rows, True, False)[1]
        w_bits = conv_weight_bits(w)

        def float_conv(x=x, w=w, pad=pad):
            return F.conv2d(x, w, None, 1, pad)

        def bit_conv(bits=bits, w_bits=w_bits, shape=(n, cin, side, side), pad=pad):
            return kernels.bit_conv(bits, shape, w_bits, (3, 3), (1, 1), (pad, pad))

        if not torch.equal(bit_conv().float(), float_conv()):  # exact: integers below 2^24
            print(f"{model} {cin}->{cout}: results differ", file=sys.stderr)
            return 1
        fp32_ms, bits_ms = median_ms([float_conv, bit_conv], args.repeats)
        layer = f"{cin}->{cout} on {side}x{side}" + (" pad 1" if pad else "")
        print(f"{model:>9} {layer:>22} {fp32_ms:>9.1f} {bits_ms:>9.1f} {fp32_ms / bits_ms:>11.1f}x")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
