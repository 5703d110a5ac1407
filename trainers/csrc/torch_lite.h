// What the kernels use of torch: ATen tensors and pybind11's tensor conversions, without the
// C++ frontend (nn, optim, data, jit) that <torch/extension.h> brings in. A compiler on these
// sources then peaks near 1.1 GB instead of 1.7 GB, which decides whether a 1-2 GB Raspberry
// Pi can build them at all (see trainers/kernel_cache.py).
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

namespace torch {
using namespace at;  // torch::Tensor, torch::empty, torch::kFloat ... as the sources spell them
constexpr auto kInt8 = at::kChar;
constexpr auto kUInt8 = at::kByte;
}  // namespace torch
