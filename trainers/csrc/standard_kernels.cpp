// The `standard` method's L1 batch norm (+ sign activation with its STE mask) in two passes
// forward and two backward, float32, as trainers.layers.L1BatchNormSignFunction keeps it.
//
// Through autograd the same block is a dozen element-wise ops with as many full-size
// temporaries (mean, centre, abs, mean, divide, add beta, abs, compare, sign, ...), which made
// `standard` up to 1.5x slower than a plain PyTorch BNN on torch's native batch norm. Here each
// channel is one task of torch's thread pool (at::parallel_for): sums in float64, values in
// float32, no fused multiply-add (-ffp-contract=off). Layout: x is (N, C, S) contiguous, S =
// H * W for a conv (1 for a dense layer).

#include "torch_lite.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using torch::Tensor;

struct Shape {
  int64_t n, c, s;
};

Shape shape_of(const Tensor& x) {
  TORCH_CHECK(x.dim() >= 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "expected a contiguous float32 (N, C, ...) tensor, got ", x.sizes(), " ",
              x.scalar_type());
  return {x.size(0), x.size(1), x.numel() / (x.size(0) * x.size(1))};
}

// Sums of a row in kLanes independent float32 chains (vectorisable without reassociating a
// single chain), added up in a fixed order; the caller adds rows in float64.
constexpr int64_t kLanes = 16;

template <typename F>
inline float lane_sum(int64_t s, F value) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= s; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += value(j + l);
  float total = 0.0f;
  for (; j < s; ++j) total += value(j);
  for (int64_t l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

inline float sgn_value(float y) { return y >= 0.0f ? 1.0f : -1.0f; }
inline float ste_mask(float y) { return std::fabs(y) <= 1.0f ? 1.0f : 0.0f; }

std::vector<Tensor> l1bn_forward_only(const Tensor& x, const Tensor& beta, double eps,
                                      bool sign_output) {
  const Shape sh = shape_of(x);
  TORCH_CHECK(beta.numel() == sh.c && beta.scalar_type() == torch::kFloat, "beta: expected ",
              sh.c, " float32 values");
  Tensor xhat = torch::empty_like(x);
  Tensor out = torch::empty_like(x);
  Tensor mask = sign_output ? torch::empty_like(x) : torch::empty({0}, x.options());
  Tensor mu = torch::empty({sh.c}, x.options());
  Tensor sigma1 = torch::empty({sh.c}, x.options());
  const Tensor b = beta.contiguous();
  const float* __restrict__ xp = x.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* __restrict__ hp = xhat.data_ptr<float>();
  float* __restrict__ op = out.data_ptr<float>();
  float* __restrict__ mp = sign_output ? mask.data_ptr<float>() : nullptr;
  float* mup = mu.data_ptr<float>();
  float* sgp = sigma1.data_ptr<float>();
  const double count = static_cast<double>(sh.n * sh.s);
  const float feps = static_cast<float>(eps);
  auto write = [&](int64_t at, int64_t len, float m, float s1, float bc) {
    const float* row = xp + at;
    float* h = hp + at;
    float* o = op + at;
    if (sign_output) {
      float* k = mp + at;
      for (int64_t j = 0; j < len; ++j) {
        const float xh = (row[j] - m) / s1;
        const float y = xh + bc;
        h[j] = xh;
        o[j] = sgn_value(y);
        k[j] = ste_mask(y);
      }
    } else {
      for (int64_t j = 0; j < len; ++j) {
        const float xh = (row[j] - m) / s1;
        h[j] = xh;
        o[j] = xh + bc;
      }
    }
  };
  // A dense row: every value has its own channel's statistics. Branch-free (selects, no
  // jumps) so that it vectorises: with branches, random signs cost a misprediction each
  // (a 100 x 256 batch took 190 us instead of 20).
  auto write_row = [&](int64_t at, int64_t len, const float* __restrict__ m,
                       const float* __restrict__ s1, const float* __restrict__ bc) {
    const float* __restrict__ row = xp + at;
    float* __restrict__ h = hp + at;
    float* __restrict__ o = op + at;
    if (sign_output) {
      float* __restrict__ k = mp + at;
      for (int64_t j = 0; j < len; ++j) {
        const float xh = (row[j] - m[j]) / s1[j];
        const float y = xh + bc[j];
        h[j] = xh;
        o[j] = sgn_value(y);
        k[j] = ste_mask(y);
      }
    } else {
      for (int64_t j = 0; j < len; ++j) {
        const float xh = (row[j] - m[j]) / s1[j];
        h[j] = xh;
        o[j] = xh + bc[j];
      }
    }
  };
  if (sh.s == 1) {  // dense: rows of C channels, statistics as channel vectors
    std::vector<double> sum(sh.c, 0.0), dev(sh.c, 0.0);
    for (int64_t i = 0; i < sh.n; ++i)
      for (int64_t c = 0; c < sh.c; ++c) sum[c] += xp[i * sh.c + c];
    for (int64_t c = 0; c < sh.c; ++c) mup[c] = static_cast<float>(sum[c] / count);
    for (int64_t i = 0; i < sh.n; ++i)
      for (int64_t c = 0; c < sh.c; ++c) dev[c] += std::fabs(xp[i * sh.c + c] - mup[c]);
    for (int64_t c = 0; c < sh.c; ++c) sgp[c] = static_cast<float>(dev[c] / count) + feps;
    for (int64_t i = 0; i < sh.n; ++i) write_row(i * sh.c, sh.c, mup, sgp, bp);
    return {xhat, out, mask, mu, sigma1};
  }
  at::parallel_for(0, sh.c, 1, [&](int64_t c0, int64_t c1) {  // conv: a channel a task
    for (int64_t c = c0; c < c1; ++c) {
      double sum = 0.0;
      for (int64_t i = 0; i < sh.n; ++i) {
        const float* row = xp + (i * sh.c + c) * sh.s;
        sum += lane_sum(sh.s, [row](int64_t j) { return row[j]; });
      }
      const float m = static_cast<float>(sum / count);
      double dev = 0.0;
      for (int64_t i = 0; i < sh.n; ++i) {
        const float* row = xp + (i * sh.c + c) * sh.s;
        dev += lane_sum(sh.s, [row, m](int64_t j) { return std::fabs(row[j] - m); });
      }
      const float s1 = static_cast<float>(dev / count) + feps;
      mup[c] = m;
      sgp[c] = s1;
      for (int64_t i = 0; i < sh.n; ++i) write((i * sh.c + c) * sh.s, sh.s, m, s1, bp[c]);
    }
  });
  return {xhat, out, mask, mu, sigma1};
}

// running <- running + w (value - running) as torch's lerp_ computes it (w = 1 - momentum).
void lerp_running(Tensor& running, const float* value, int64_t c, double weight) {
  TORCH_CHECK(running.numel() == c && running.scalar_type() == torch::kFloat &&
              running.is_contiguous(), "running statistics: expected ", c, " float32 values");
  float* r = running.data_ptr<float>();
  const float w = static_cast<float>(weight);
  for (int64_t i = 0; i < c; ++i)
    r[i] = w < 0.5f ? r[i] + w * (value[i] - r[i]) : value[i] - (value[i] - r[i]) * (1.0f - w);
}

// forward: mu = mean(x), sigma1 = mean|x - mu| + eps, xhat = (x - mu) / sigma1, y = xhat + beta;
// with sign_output: out = sgn(y) (0 -> +1) and mask = (|y| <= 1) as float, else out = y.
// The running statistics move towards mu and sigma1 by `weight` (1 - the momentum).
// Returns {xhat, out, mask (empty without sign_output), mu, sigma1}.
std::vector<Tensor> l1bn_forward(const Tensor& x, const Tensor& beta, double eps,
                                 bool sign_output, Tensor running_mean, Tensor running_sigma1,
                                 double weight) {
  auto result = l1bn_forward_only(x, beta, eps, sign_output);
  lerp_running(running_mean, result[3].data_ptr<float>(), result[3].numel(), weight);
  lerp_running(running_sigma1, result[4].data_ptr<float>(), result[4].numel(), weight);
  return result;
}
// backward: g = grad_out * mask (an empty mask: none), s = sgn(xhat);
// dX = (g - mean(g) - (s - mean(s)) * mean(g * xhat)) / sigma1, dbeta = sum(g).
// Returns {grad_x, grad_beta}.
std::vector<Tensor> l1bn_backward(const Tensor& grad_out, const Tensor& xhat,
                                  const Tensor& mask, const Tensor& sigma1) {
  const Shape sh = shape_of(xhat);
  const Tensor g = grad_out.to(torch::kFloat).contiguous();
  TORCH_CHECK(g.sizes() == xhat.sizes(), "grad_out: expected ", xhat.sizes(), ", got ",
              g.sizes());
  const bool masked = mask.numel() > 0;
  if (masked) TORCH_CHECK(mask.sizes() == xhat.sizes() && mask.is_contiguous(), "mask shape");
  Tensor grad_x = torch::empty_like(xhat);
  Tensor grad_beta = torch::empty({sh.c}, xhat.options());
  const float* gp = g.data_ptr<float>();
  const float* __restrict__ hp = xhat.data_ptr<float>();
  const float* kp = masked ? mask.data_ptr<float>() : nullptr;
  const Tensor sig = sigma1.contiguous();
  const float* sp = sig.data_ptr<float>();
  float* __restrict__ dp = grad_x.data_ptr<float>();
  float* bp = grad_beta.data_ptr<float>();
  const double count = static_cast<double>(sh.n * sh.s);
  auto gval = [gp, kp, masked](int64_t at) { return masked ? gp[at] * kp[at] : gp[at]; };
  // Per channel: mean(g), and the dX terms for s = +1 (up) and s = -1 (down).
  struct Terms {
    float mean_g, up, down;
  };
  auto terms = [count](double sum_g, double sum_gx, double positive) {
    const float mean_gx = static_cast<float>(sum_gx / count);
    const float mean_s = static_cast<float>((2.0 * positive - count) / count);
    return Terms{static_cast<float>(sum_g / count), (1.0f - mean_s) * mean_gx,
                 (-1.0f - mean_s) * mean_gx};
  };
  // Restrict-qualified locals and no branch in the loop, so that it vectorises (through the
  // captured pointers it ran element by element, a misprediction per random sign).
  auto write = [&](int64_t at, int64_t len, const Terms& t, float s1) {
    const float* __restrict__ h = hp + at;
    const float* __restrict__ gr = gp + at;
    float* __restrict__ d = dp + at;
    if (masked) {
      const float* __restrict__ k = kp + at;
      for (int64_t j = 0; j < len; ++j)
        d[j] = (gr[j] * k[j] - t.mean_g - (h[j] >= 0.0f ? t.up : t.down)) / s1;
    } else {
      for (int64_t j = 0; j < len; ++j)
        d[j] = (gr[j] - t.mean_g - (h[j] >= 0.0f ? t.up : t.down)) / s1;
    }
  };
  if (sh.s == 1) {  // dense: channel vectors, rows written branch-free (see the forward)
    std::vector<double> sum_g(sh.c, 0.0), sum_gx(sh.c, 0.0), positive(sh.c, 0.0);
    std::vector<float> mean_g(sh.c), up(sh.c), down(sh.c);
    double* __restrict__ sg = sum_g.data();
    double* __restrict__ sgx = sum_gx.data();
    double* __restrict__ pos = positive.data();
    std::vector<float> g_row(sh.c);
    float* __restrict__ gv = g_row.data();
    for (int64_t i = 0; i < sh.n; ++i) {
      const float* __restrict__ h = hp + i * sh.c;
      const float* __restrict__ gr = gp + i * sh.c;
      if (masked) {
        const float* __restrict__ kr = kp + i * sh.c;
        for (int64_t c = 0; c < sh.c; ++c) gv[c] = gr[c] * kr[c];
      } else {
        for (int64_t c = 0; c < sh.c; ++c) gv[c] = gr[c];
      }
      for (int64_t c = 0; c < sh.c; ++c) {
        sg[c] += gv[c];
        sgx[c] += gv[c] * h[c];
        pos[c] += h[c] >= 0.0f ? 1.0 : 0.0;
      }
    }
    for (int64_t c = 0; c < sh.c; ++c) {
      const Terms t = terms(sum_g[c], sum_gx[c], positive[c]);
      mean_g[c] = t.mean_g;
      up[c] = t.up;
      down[c] = t.down;
      bp[c] = static_cast<float>(sum_g[c]);
    }
    const float* __restrict__ mg = mean_g.data();
    const float* __restrict__ tu = up.data();
    const float* __restrict__ td = down.data();
    for (int64_t i = 0; i < sh.n; ++i) {
      const float* __restrict__ h = hp + i * sh.c;
      const float* __restrict__ gr = gp + i * sh.c;
      const float* __restrict__ kr = masked ? kp + i * sh.c : nullptr;
      float* __restrict__ d = dp + i * sh.c;
      for (int64_t c = 0; c < sh.c; ++c) {
        const float gv = masked ? gr[c] * kr[c] : gr[c];
        d[c] = (gv - mg[c] - (h[c] >= 0.0f ? tu[c] : td[c])) / sp[c];
      }
    }
    return {grad_x, grad_beta};
  }
  at::parallel_for(0, sh.c, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double sum_g = 0.0, sum_gx = 0.0, positive = 0.0;
      for (int64_t i = 0; i < sh.n; ++i) {
        const int64_t at = (i * sh.c + c) * sh.s;
        sum_g += lane_sum(sh.s, [&](int64_t j) { return gval(at + j); });
        sum_gx += lane_sum(sh.s, [&](int64_t j) { return gval(at + j) * hp[at + j]; });
        positive += lane_sum(sh.s, [&](int64_t j) { return hp[at + j] >= 0.0f ? 1.0f : 0.0f; });
      }
      const Terms t = terms(sum_g, sum_gx, positive);
      bp[c] = static_cast<float>(sum_g);
      for (int64_t i = 0; i < sh.n; ++i) write((i * sh.c + c) * sh.s, sh.s, t, sp[c]);
    }
  });
  return {grad_x, grad_beta};
}

// The weight's straight-through gradient: grad where |w| <= 1, else 0, in one pass into one
// output. Through autograd it was |w|, a comparison, a float32 copy of the mask and the
// product: two weight-sized float32 temporaries beside the result (64 MiB on binarynet's
// 1024 x 8192 layer) and four passes.
Tensor ste_weight_grad(const Tensor& grad, const Tensor& w) {
  TORCH_CHECK(grad.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat &&
                  grad.sizes() == w.sizes(),
              "ste_weight_grad: float32 grad and weight of one shape expected, got ",
              grad.sizes(), " and ", w.sizes());
  const Tensor g = grad.contiguous(), wc = w.contiguous();
  Tensor out = torch::empty_like(g);
  const float* __restrict__ gp = g.data_ptr<float>();
  const float* __restrict__ wp = wc.data_ptr<float>();
  float* __restrict__ op = out.data_ptr<float>();
  at::parallel_for(0, g.numel(), 1 << 16, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) op[i] = std::fabs(wp[i]) <= 1.0f ? gp[i] : 0.0f;
  });
  return out;
}

}  // namespace

void register_standard_kernels(pybind11::module& m) {
  m.def("ste_weight_grad", &ste_weight_grad,
        "straight-through weight gradient: grad where |w| <= 1, else 0 (one pass)");
  m.def("l1bn_forward", &l1bn_forward,
        "standard L1 batch norm (+ sign and STE mask) forward, running statistics updated: "
        "xhat, out, mask, mu, sigma1");
  m.def("l1bn_backward", &l1bn_backward,
        "standard L1 batch norm (+ STE mask) backward: grad_x, grad_beta");
}
