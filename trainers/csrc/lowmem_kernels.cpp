// Fused passes of the low-memory block (trainers/lowmem_fused.py) and of LowMemAdam.
//
// Each function replaces a chain of PyTorch element-wise ops with one loop that reads its
// inputs once and writes only what is kept: packed sign and mask bits, 16-bit outputs and
// per-channel float64 sums. Tensors are "rows x channels": a dense layer's (N, C), a conv
// layer's channels-last (N*H*W, C). Bits are packed per row, lowest bit first, each row
// padded to a whole byte, as trainers.bits.pack_rows does.
//
// The arithmetic is the reference path's (trainers/lowmem.py), float32 element-wise with
// float64 sums, in the same order; compiled with -ffp-contract=off so that no fused
// multiply-add changes a rounding.

#include "torch_lite.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <string>

#if defined(__F16C__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

// bit_kernels.cpp: exact binary convolution (a dense layer: 1 x 1 on 1 x 1) of sign bits.
at::Tensor bit_conv(const at::Tensor& x_bits, int64_t n, int64_t h, int64_t w, int64_t c,
                    const at::Tensor& w_bits, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                    int64_t ph, int64_t pw);

namespace {

using torch::Tensor;

inline int64_t packed_width(int64_t features) { return (features + 7) / 8; }

static_assert(std::endian::native == std::endian::little, "bit packing assumes little endian");

// Row scratch of `c` values, padded to whole bytes of bits (padding stays zero).
inline int64_t padded(int64_t c) { return packed_width(c) * 8; }

// byte value -> its 8 bits as 0/1 bytes, lowest first.
struct BitTable {
  uint8_t bits[256][8];
  BitTable() {
    for (int v = 0; v < 256; ++v)
      for (int j = 0; j < 8; ++j) bits[v][j] = (v >> j) & 1;
  }
};
const BitTable kBitTable;

// Packed bits of a row -> one 0/1 byte per value (flags has padded(c) bytes).
inline void expand_bits(const uint8_t* row, int64_t c, uint8_t* flags) {
  const int64_t width = packed_width(c);
  for (int64_t b = 0; b < width; ++b) std::memcpy(flags + 8 * b, kBitTable.bits[row[b]], 8);
}

// 0/1 bytes -> packed bits: eight flags read as one little-endian word; the multiply moves
// flag j to bit 56 + j without overlaps. Flags past c must be 0.
inline void pack_flags(const uint8_t* flags, int64_t c, uint8_t* row) {
  const int64_t width = packed_width(c);
  for (int64_t b = 0; b < width; ++b) {
    uint64_t word;
    std::memcpy(&word, flags + 8 * b, 8);
    row[b] = static_cast<uint8_t>((word * 0x0102040810204080ull) >> 56);
  }
}

void check_rows(const Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.is_contiguous(),
              name, ": expected a contiguous (", rows, ", ", cols, ") tensor, got ", t.sizes());
}

// Per-channel float64 sums over rows, split into fixed blocks of kSumRows rows: each block's
// partial sums are made on any thread of torch's pool and added in block order, so a sum
// does not depend on the thread count. add(first, last, partial) adds rows [first, last)
// into `width` zeroed doubles.
constexpr int64_t kSumRows = 2048;

template <typename Add>
void blocked_sums(int64_t rows, int64_t width, double* out, const Add& add) {
  const int64_t blocks = (rows + kSumRows - 1) / kSumRows;
  std::vector<double> partial(blocks * width, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      add(b * kSumRows, std::min(rows, (b + 1) * kSumRows), partial.data() + b * width);
  });
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t i = 0; i < width; ++i) out[i] += partial[b * width + i];
}

template <typename T>
inline float as_float(T v) { return static_cast<float>(v); }

template <typename T>
inline T from_float(float v) { return static_cast<T>(v); }

// Row conversions to and from float32, vectorised: float16 through F16C on x86, NEON's
// fcvtl/fcvtn on aarch64 (Cortex-A72/A76: baseline ARMv8-A) or the compiler's _Float16
// elsewhere, all rounding to nearest even like c10::Half.
inline void load_floats(const float* src, int64_t n, float* dst) {
  std::memcpy(dst, src, n * sizeof(float));
}

inline void load_floats(const at::Half* src, int64_t n, float* __restrict__ dst) {
  int64_t i = 0;
#ifdef __F16C__
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#elif defined(__ARM_NEON)
  const auto* h = reinterpret_cast<const uint16_t*>(src);
  for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h + i))));
#elif defined(__FLT16_MAX__)
  const auto* h = reinterpret_cast<const _Float16*>(src);
#pragma GCC ivdep
  for (; i < n; ++i) dst[i] = static_cast<float>(h[i]);
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void load_floats(const at::BFloat16* src, int64_t n, float* __restrict__ dst) {
  const auto* b = reinterpret_cast<const uint16_t*>(src);
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(static_cast<uint32_t>(b[i]) << 16);
}

// Power-of-two gradient codes (int8): 0 is 0, else sign * 2^(exp_max + 1 - |code|), |code|
// in 1..levels - the 5-bit (sign + 4-bit exponent) dY of METHODS.md in an int8 container.
inline void decode_po2(const int8_t* __restrict__ codes, int64_t n, int exp_max,
                       float* __restrict__ dst) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const int code = codes[i];
    const int magnitude = code < 0 ? -code : code;
    const uint32_t bits = (code < 0 ? 0x80000000u : 0u) |
                          (static_cast<uint32_t>(exp_max + 1 - magnitude + 127) << 23);
    dst[i] = code == 0 ? 0.0f : std::bit_cast<float>(bits);
  }
}

inline void load_floats(const int8_t* __restrict__ src, int64_t n, float* __restrict__ dst) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void store_floats(const float* src, int64_t n, float* dst) {
  std::memcpy(dst, src, n * sizeof(float));
}

inline void store_floats(const float* __restrict__ src, int64_t n, at::Half* dst) {
  int64_t i = 0;
#ifdef __F16C__
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
#elif defined(__ARM_NEON)
  auto* h = reinterpret_cast<uint16_t*>(dst);
  for (; i + 4 <= n; i += 4) vst1_u16(h + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(src + i))));
#elif defined(__FLT16_MAX__)
  auto* h = reinterpret_cast<_Float16*>(dst);
#pragma GCC ivdep
  for (; i < n; ++i) h[i] = static_cast<_Float16>(src[i]);
#endif
  for (; i < n; ++i) dst[i] = static_cast<at::Half>(src[i]);
}

inline void store_floats(const float* __restrict__ src, int64_t n, at::BFloat16* dst) {
  auto* b = reinterpret_cast<uint16_t*>(dst);  // round to nearest even, as c10 does
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = std::bit_cast<uint32_t>(src[i]);
    const uint32_t rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
    b[i] = std::isnan(src[i]) ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  }
}

// out[i] = flags[i] ? plus : minus, on the values' bits so that 16-bit types vectorise too.
template <typename T>
inline void select_signs(const uint8_t* __restrict__ flags, int64_t n, T plus, T minus,
                         T* __restrict__ out) {
  if constexpr (sizeof(T) == 2) {
    const uint16_t p = std::bit_cast<uint16_t>(plus), m = std::bit_cast<uint16_t>(minus);
    auto* o = reinterpret_cast<uint16_t*>(out);
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) o[i] = flags[i] ? p : m;
  } else {
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) out[i] = flags[i] ? plus : minus;
  }
}

// Power-of-two rounding in the log domain: sign * 2^e with e = round(log2|g|), clamped to
// exp_max, and 0 below exp_max - (levels - 1). With |g| = 1.m * 2^E, round(log2|g|) is
// E + 1 when 1.m >= sqrt(2), else E: exact, on the float's bits.
constexpr uint32_t kSqrt2Mantissa = 3474676;  // smallest m with 1 + m / 2^23 >= sqrt(2)

// Branch-free, so that loops over a row vectorise. Zero and subnormals (far below any
// exp_min in practice) give 0; infinities saturate to 2^exp_max.
inline float po2_round(float g, int exp_max, int exp_min) {
  const uint32_t bits = std::bit_cast<uint32_t>(g);
  const int biased = static_cast<int>((bits >> 23) & 0xFF);
  int e = biased - 127 + ((bits & 0x7FFFFF) >= kSqrt2Mantissa ? 1 : 0);
  e = e > exp_max ? exp_max : e;
  const uint32_t out = (bits & 0x80000000u) | (static_cast<uint32_t>(e + 127) << 23);
  return (biased == 0 || e < exp_min) ? 0.0f : std::bit_cast<float>(out);
}

// ---------------------------------------------------------------- forward

// sgn(x) as int8 +-1 (sgn(0) = +1), and optionally the packed sign bits (x >= 0) and the
// packed STE mask (|x| <= 1) of a (rows, K) float tensor (or int8 +-1: a packed-bit weight).
template <typename T>
void sign_pack_impl(const T* x, int64_t rows, int64_t k, int8_t* out, uint8_t* bits,
                    uint8_t* mask) {
  const int64_t width = packed_width(k);
  std::vector<uint8_t> pos_flags(padded(k), 0), inside_flags(padded(k), 0);
  uint8_t* __restrict__ pos = pos_flags.data();  // restrict pointers: see bn_forward_impl
  uint8_t* __restrict__ inside = inside_flags.data();
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * k;
    int8_t* __restrict__ orow = out + r * k;
    #pragma GCC ivdep
    for (int64_t j = 0; j < k; ++j) pos[j] = as_float(xr[j]) >= 0.0f;
    #pragma GCC ivdep
    for (int64_t j = 0; j < k; ++j) orow[j] = static_cast<int8_t>(2 * pos[j] - 1);
    if (bits) pack_flags(pos, k, bits + r * width);
    if (mask) {
      #pragma GCC ivdep
      for (int64_t j = 0; j < k; ++j) inside[j] = std::fabs(as_float(xr[j])) <= 1.0f;
      pack_flags(inside, k, mask + r * width);
    }
  }
}

std::vector<Tensor> sign_pack(const Tensor& x, bool want_bits, bool want_mask) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "sign_pack: expected a contiguous 2-d tensor");
  const int64_t rows = x.size(0), k = x.size(1);
  auto out = torch::empty({rows, k}, x.options().dtype(torch::kInt8));
  auto u8 = x.options().dtype(torch::kUInt8);
  Tensor bits = want_bits ? torch::empty({rows, packed_width(k)}, u8) : torch::empty({0}, u8);
  Tensor mask = want_mask ? torch::empty({rows, packed_width(k)}, u8) : torch::empty({0}, u8);
  uint8_t* bp = want_bits ? bits.data_ptr<uint8_t>() : nullptr;
  uint8_t* mp = want_mask ? mask.data_ptr<uint8_t>() : nullptr;
  if (x.scalar_type() == torch::kFloat) {
    sign_pack_impl(x.data_ptr<float>(), rows, k, out.data_ptr<int8_t>(), bp, mp);
  } else if (x.scalar_type() == torch::kBFloat16) {
    sign_pack_impl(x.data_ptr<at::BFloat16>(), rows, k, out.data_ptr<int8_t>(), bp, mp);
  } else if (x.scalar_type() == torch::kHalf) {
    sign_pack_impl(x.data_ptr<at::Half>(), rows, k, out.data_ptr<int8_t>(), bp, mp);
  } else if (x.scalar_type() == torch::kChar) {  // int8 +-1 of a packed-bit parameter
    sign_pack_impl(x.data_ptr<int8_t>(), rows, k, out.data_ptr<int8_t>(), bp, mp);
  } else {
    TORCH_CHECK(false, "sign_pack: unsupported dtype ", x.scalar_type());
  }
  return {out, bits, mask};
}

// sgn(w) (w >= 0 -> +1, else -1, NaN -> -1) as a tensor of dtype (int8 for the int8
// products, bfloat16/float for the backward's), read from a float16/float32 weight.
template <typename W, typename T>
void signs_impl(const W* w, int64_t n, T* out) {
  const T plus = from_float<T>(1.0f), minus = from_float<T>(-1.0f);
  const int64_t block = std::min<int64_t>(n, 4096);
  std::vector<float> values(block);
  std::vector<uint8_t> flags(block);
  float* __restrict__ wf = values.data();  // restrict pointers: see bn_forward_impl
  uint8_t* __restrict__ pos = flags.data();
  for (int64_t start = 0; start < n; start += block) {
    const int64_t count = std::min<int64_t>(block, n - start);
    load_floats(w + start, count, wf);
#pragma GCC ivdep
    for (int64_t i = 0; i < count; ++i) pos[i] = wf[i] >= 0.0f;
    select_signs(pos, count, plus, minus, out + start);
  }
}

template <typename W>
void signs_dispatch(const W* w, int64_t n, Tensor& out) {
  switch (out.scalar_type()) {
    case torch::kInt8: signs_impl(w, n, out.data_ptr<int8_t>()); break;
    case torch::kBFloat16: signs_impl(w, n, out.data_ptr<at::BFloat16>()); break;
    case torch::kFloat: signs_impl(w, n, out.data_ptr<float>()); break;
    default: TORCH_CHECK(false, "signs: unsupported dtype ", out.scalar_type());
  }
}

Tensor signs(const Tensor& w, torch::ScalarType dtype) {
  TORCH_CHECK(w.is_contiguous(), "signs: expected a contiguous tensor");
  auto out = torch::empty(w.sizes(), w.options().dtype(dtype));
  if (w.scalar_type() == torch::kHalf) {
    signs_dispatch(w.data_ptr<at::Half>(), w.numel(), out);
  } else if (w.scalar_type() == torch::kFloat) {
    signs_dispatch(w.data_ptr<float>(), w.numel(), out);
  } else if (w.scalar_type() == torch::kChar) {  // +-1 unpacked from packed bits
    signs_dispatch(w.data_ptr<int8_t>(), w.numel(), out);
  } else {
    TORCH_CHECK(false, "signs: weight must be float16, float32 or int8");
  }
  return out;
}

// Packed bits (rows, ceil(K/8)) -> +-1 values (rows, K) of dtype.
template <typename T>
void unpack_signs_impl(const uint8_t* bits, int64_t rows, int64_t k, T* out) {
  const int64_t width = packed_width(k);
  const T plus = from_float<T>(1.0f), minus = from_float<T>(-1.0f);
  std::vector<uint8_t> flags(padded(k));
  for (int64_t r = 0; r < rows; ++r) {
    expand_bits(bits + r * width, k, flags.data());
    select_signs(flags.data(), k, plus, minus, out + r * k);
  }
}

Tensor unpack_signs(const Tensor& bits, int64_t k, torch::ScalarType dtype) {
  const int64_t rows = bits.size(0);
  check_rows(bits, "unpack_signs bits", rows, packed_width(k));
  auto out = torch::empty({rows, k}, bits.options().dtype(dtype));
  const uint8_t* bp = bits.data_ptr<uint8_t>();
  switch (dtype) {
    case torch::kFloat: unpack_signs_impl(bp, rows, k, out.data_ptr<float>()); break;
    case torch::kBFloat16: unpack_signs_impl(bp, rows, k, out.data_ptr<at::BFloat16>()); break;
    case torch::kHalf: unpack_signs_impl(bp, rows, k, out.data_ptr<at::Half>()); break;
    case torch::kInt8: unpack_signs_impl(bp, rows, k, out.data_ptr<int8_t>()); break;
    default: TORCH_CHECK(false, "unpack_signs: unsupported dtype ", dtype);
  }
  return out;
}

// sum over rows of |z - mu| per channel (the L1 batch norm's sigma1 before / count).
Tensor abs_deviation(const Tensor& z, const Tensor& mu) {
  TORCH_CHECK(z.scalar_type() == torch::kHalf, "abs_deviation: z must be float16");
  const int64_t rows = z.size(0), c = z.size(1);
  check_rows(z, "abs_deviation z", rows, c);
  const at::Half* zp = z.data_ptr<at::Half>();
  const float* mp = mu.data_ptr<float>();
  std::vector<double> acc(c, 0.0);
  blocked_sums(rows, c, acc.data(), [&](int64_t first, int64_t last, double* part) {
    std::vector<float> zf(c);
    for (int64_t r = first; r < last; ++r) {
      load_floats(zp + r * c, c, zf.data());
#pragma GCC ivdep
      for (int64_t j = 0; j < c; ++j) part[j] += std::fabs(zf[j] - mp[j]);
    }
  });
  auto out = torch::empty({c}, z.options().dtype(torch::kDouble));
  std::copy(acc.begin(), acc.end(), out.data_ptr<double>());
  return out;
}

// The L1 batch norm's training statistics from float16 rows and their per-channel float64
// sums: mu = sums / rows and sigma1 = mean |z - mu| + eps, as float32 (2, C).
Tensor bn_statistics(const Tensor& z, const Tensor& sums, double eps) {
  const int64_t rows = z.size(0), c = z.size(1);
  auto stats = torch::empty({2, c}, z.options().dtype(torch::kFloat));
  float* mu = stats.data_ptr<float>();
  float* sigma1 = mu + c;
  const double* sp = sums.data_ptr<double>();
  for (int64_t ch = 0; ch < c; ++ch) mu[ch] = static_cast<float>(sp[ch] / rows);
  const Tensor dev = abs_deviation(z, stats[0]);
  const double* dp = dev.data_ptr<double>();
  for (int64_t ch = 0; ch < c; ++ch)
    sigma1[ch] = static_cast<float>(dp[ch] / rows) + static_cast<float>(eps);
  return stats;
}

// y = (z - mu) / sigma1 + beta; keeps the packed sign bits of y (when y_bits is given) and,
// with sign_output, the packed STE mask |y| <= 1 and writes +-1 to out; without, writes y.
// Returns sum |y| per channel.
template <typename O>
void bn_forward_impl(const at::Half* z, int64_t rows, int64_t c_in, const float* mu,
                     const float* sigma1, const float* beta, O* out, uint8_t* y_bits,
                     uint8_t* mask, bool sign_output, double* abs_y) {
  const int64_t width = packed_width(c_in);
  const O plus = from_float<O>(1.0f), minus = from_float<O>(-1.0f);
  blocked_sums(rows, c_in, abs_y, [&](int64_t first, int64_t last, double* abs_part) {
    // A uint8_t store may alias anything: with the channel count read through the lambda's
    // reference or the flags through a vector, the flag loops reloaded them every element
    // and ran scalar (3x slower on cnv). Locals and restrict pointers let them vectorise.
    const int64_t c = c_in;
    std::vector<float> values(c);
    std::vector<uint8_t> pos_flags(padded(c), 0), inside_flags(padded(c), 0);
    float* __restrict__ y = values.data();
    uint8_t* __restrict__ pos = pos_flags.data();
    uint8_t* __restrict__ inside = inside_flags.data();
    for (int64_t r = first; r < last; ++r) {
      O* orow = out ? out + r * c : nullptr;
      load_floats(z + r * c, c, y);
      #pragma GCC ivdep
      for (int64_t ch = 0; ch < c; ++ch) {
        const float v = (y[ch] - mu[ch]) / sigma1[ch];
        y[ch] = v + beta[ch];
      }
      #pragma GCC ivdep
      for (int64_t ch = 0; ch < c; ++ch) abs_part[ch] += std::fabs(y[ch]);
      #pragma GCC ivdep
      for (int64_t ch = 0; ch < c; ++ch) pos[ch] = y[ch] >= 0.0f;
      if (y_bits) pack_flags(pos, c, y_bits + r * width);
      if (sign_output) {
        if (orow) select_signs(pos, c, plus, minus, orow);
        if (mask) {
          #pragma GCC ivdep
          for (int64_t ch = 0; ch < c; ++ch) inside[ch] = std::fabs(y[ch]) <= 1.0f;
          pack_flags(inside, c, mask + r * width);
        }
      } else {
        #pragma GCC ivdep
        for (int64_t ch = 0; ch < c; ++ch) orow[ch] = from_float<O>(y[ch]);
      }
    }
  });
}

Tensor bn_forward(const Tensor& z, const Tensor& mu, const Tensor& sigma1, const Tensor& beta,
                  Tensor& out, const Tensor& y_bits, const Tensor& mask, bool sign_output) {
  TORCH_CHECK(z.scalar_type() == torch::kHalf, "bn_forward: z must be float16");
  const int64_t rows = z.size(0), c = z.size(1);
  check_rows(z, "bn_forward z", rows, c);
  const bool write_out = out.numel() > 0;  // a pooled block pools from y_bits instead
  if (write_out) check_rows(out, "bn_forward out", rows, c);
  uint8_t* yp = nullptr;
  uint8_t* mp = nullptr;
  if (y_bits.numel()) {
    check_rows(y_bits, "bn_forward y_bits", rows, packed_width(c));
    yp = y_bits.data_ptr<uint8_t>();
  }
  if (mask.numel()) {
    check_rows(mask, "bn_forward mask", rows, packed_width(c));
    mp = mask.data_ptr<uint8_t>();
  }
  std::vector<double> acc(c, 0.0);
  const auto* zp = z.data_ptr<at::Half>();
  const float* m = mu.data_ptr<float>();
  const float* s = sigma1.data_ptr<float>();
  const float* b = beta.data_ptr<float>();
  if (!write_out) {
    TORCH_CHECK(yp && sign_output, "bn_forward: without an output, y_bits must be kept");
    bn_forward_impl<float>(zp, rows, c, m, s, b, nullptr, yp, mp, sign_output, acc.data());
  } else if (out.scalar_type() == torch::kBFloat16) {
    bn_forward_impl(zp, rows, c, m, s, b, out.data_ptr<at::BFloat16>(), yp, mp, sign_output,
                    acc.data());
  } else if (out.scalar_type() == torch::kFloat) {
    bn_forward_impl(zp, rows, c, m, s, b, out.data_ptr<float>(), yp, mp, sign_output,
                    acc.data());
  } else {
    TORCH_CHECK(false, "bn_forward: out must be bfloat16 or float32");
  }
  auto sums = torch::empty({c}, z.options().dtype(torch::kDouble));
  std::copy(acc.begin(), acc.end(), sums.data_ptr<double>());
  return sums;
}

// 2x2 max-pool of the signs sgn(y) held as y_bits (rows of an (n, h, w) map): +1 where any
// of the window's four values is positive, else -1; the argmax is the first maximum in
// the window's row-major order (0..3), as torch's max_pool2d reports it. Windows past an
// odd edge are dropped (floor mode).
template <typename O>
void pool_signs_impl(const uint8_t* y_bits, int64_t n, int64_t h, int64_t w, int64_t c,
                     O* out, uint8_t* positions) {
  const int64_t width = packed_width(c), ho = h / 2, wo = w / 2;
  const O plus = from_float<O>(1.0f), minus = from_float<O>(-1.0f);
  std::vector<uint8_t> window[4];
  for (auto& flags : window) flags.resize(padded(c));
  std::vector<uint8_t> any(padded(c)), first(padded(c));
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t ph = 0; ph < ho; ++ph) {
      for (int64_t pw = 0; pw < wo; ++pw) {
        for (int k = 0; k < 4; ++k) {
          const int64_t row = (s * h + 2 * ph + (k >> 1)) * w + 2 * pw + (k & 1);
          expand_bits(y_bits + row * width, c, window[k].data());
        }
#pragma GCC ivdep
        for (int64_t ch = 0; ch < c; ++ch) {
          const uint8_t a = window[0][ch], b = window[1][ch], d = window[2][ch],
                        e = window[3][ch];
          any[ch] = a | b | d | e;
          first[ch] = a ? 0 : b ? 1 : d ? 2 : e ? 3 : 0;
        }
        const int64_t prow = (s * ho + ph) * wo + pw;
        select_signs(any.data(), c, plus, minus, out + prow * c);
        if (positions) std::memcpy(positions + prow * c, first.data(), c);
      }
    }
  }
}

void pool_signs(const Tensor& y_bits, int64_t n, int64_t h, int64_t w, Tensor& out,
                const Tensor& positions) {
  const int64_t c = out.size(1), pooled = n * (h / 2) * (w / 2);
  check_rows(y_bits, "pool_signs y_bits", n * h * w, packed_width(c));
  check_rows(out, "pool_signs out", pooled, c);
  uint8_t* pp = nullptr;
  if (positions.numel()) {
    check_rows(positions, "pool_signs positions", pooled, c);
    pp = positions.data_ptr<uint8_t>();
  }
  const uint8_t* yp = y_bits.data_ptr<uint8_t>();
  if (out.scalar_type() == torch::kBFloat16) {
    pool_signs_impl(yp, n, h, w, c, out.data_ptr<at::BFloat16>(), pp);
  } else if (out.scalar_type() == torch::kFloat) {
    pool_signs_impl(yp, n, h, w, c, out.data_ptr<float>(), pp);
  } else {
    TORCH_CHECK(false, "pool_signs: out must be bfloat16 or float32");
  }
}

// z rows (int32 from the int8 product, or float32) -> float16 rows, adding each channel's
// sum of the original values (float64) to sums.
template <typename T>
void store_rows_impl(const T* z, int64_t rows, int64_t c, at::Half* out, double* sums) {
  std::vector<float> zf(c);
  for (int64_t r = 0; r < rows; ++r) {
    const T* zr = z + r * c;
#pragma GCC ivdep
    for (int64_t ch = 0; ch < c; ++ch) {
      sums[ch] += static_cast<double>(zr[ch]);
      zf[ch] = static_cast<float>(zr[ch]);
    }
    store_floats(zf.data(), c, out + r * c);
  }
}

void store_rows(const Tensor& z, Tensor& out, Tensor& sums) {
  const int64_t rows = z.size(0), c = z.size(1);
  check_rows(z, "store_rows z", rows, c);
  check_rows(out, "store_rows out", rows, c);
  TORCH_CHECK(out.scalar_type() == torch::kHalf && sums.scalar_type() == torch::kDouble &&
              sums.numel() == c, "store_rows: float16 out and float64 (C,) sums expected");
  double* sp = sums.data_ptr<double>();
  if (z.scalar_type() == torch::kInt) {
    store_rows_impl(z.data_ptr<int32_t>(), rows, c, out.data_ptr<at::Half>(), sp);
  } else if (z.scalar_type() == torch::kFloat) {
    store_rows_impl(z.data_ptr<float>(), rows, c, out.data_ptr<at::Half>(), sp);
  } else {
    TORCH_CHECK(false, "store_rows: z must be int32 or float32");
  }
}

// A first (real-input) dense layer, x @ sgn(W)^T in float32, block by block of output
// rows: sgn(W) exists in float32 for one block at a time, never a full-size copy.
template <typename W>
void sign_block(const W* w, int64_t count, float* out) {
  if constexpr (std::is_same_v<W, at::Half>) {  // on the bits: +0, -0 and w > 0 but not NaN
    const auto* bits = reinterpret_cast<const uint16_t*>(w);
#pragma GCC ivdep
    for (int64_t i = 0; i < count; ++i) {
      const uint16_t magnitude = bits[i] & 0x7FFF;
      const bool positive = (!(bits[i] & 0x8000) || magnitude == 0) && magnitude <= 0x7C00;
      out[i] = positive ? 1.0f : -1.0f;
    }
  } else {
#pragma GCC ivdep
    for (int64_t i = 0; i < count; ++i) out[i] = w[i] >= 0.0f ? 1.0f : -1.0f;
  }
}

Tensor dense_sign_forward(const Tensor& x, const Tensor& weight, int64_t block_rows) {
  const int64_t out_features = weight.size(0), k = weight.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && weight.is_contiguous(),
              "dense_sign_forward: shapes do not match");
  auto z = torch::empty({x.size(0), out_features}, x.options().dtype(torch::kFloat));
  const Tensor xf = x.to(torch::kFloat).contiguous();
  Tensor signs = torch::empty({std::min(block_rows, out_features), k}, xf.options());
  for (int64_t o = 0; o < out_features; o += block_rows) {
    const int64_t o2 = std::min(out_features, o + block_rows);
    Tensor block = signs.narrow(0, 0, o2 - o);
    float* sp = block.data_ptr<float>();
    if (weight.scalar_type() == torch::kHalf) {
      sign_block(weight.data_ptr<at::Half>() + o * k, (o2 - o) * k, sp);
    } else if (weight.scalar_type() == torch::kFloat) {
      sign_block(weight.data_ptr<float>() + o * k, (o2 - o) * k, sp);
    } else if (weight.scalar_type() == torch::kChar) {
      sign_block(weight.data_ptr<int8_t>() + o * k, (o2 - o) * k, sp);
    } else {
      TORCH_CHECK(false, "dense_sign_forward: weight must be float16, float32 or int8");
    }
    z.slice(1, o, o2).copy_(xf.mm(block.t()));
  }
  return z;
}

// ---------------------------------------------------------------- backward

// Where the gradient of the batch norm's output y comes from: the block's output gradient,
// optionally pooled after the activation (2x2 windows, argmax position 0..3 per window),
// rounded to a power of two, and masked by the STE.
template <typename G>
struct GradSource {
  const G* grad;        // rows of the output gradient (pooled rows when pooled), c wide
  int64_t c;            // channels
  int64_t h, w;         // y's spatial size per sample (1 x 1 for dense)
  int64_t ho, wo;       // the pooled size when pooled after the activation
  const uint8_t* pool;  // argmax positions (pooled rows, c), or null
  const uint8_t* mask;  // packed STE mask rows of y, or null (no sign at the output)
  bool po2;
  int exp_max, exp_min;

  // dL/dy for y's row `r` (sample-major, then h, w), all channels, into g[0..c);
  // flags is padded(c) bytes of scratch.
  inline void row(int64_t r, float* g, uint8_t* flags) const {
    const G* src = grad + r * c;
    const uint8_t* prow = nullptr;
    uint8_t code = 0;
    if (pool) {
      const int64_t hw = h * w, n = r / hw, yh = (r % hw) / w, yw = (r % hw) % w;
      const int64_t ph = yh >> 1, pw = yw >> 1;
      if (ph >= ho || pw >= wo) {
        std::fill(g, g + c, 0.0f);
        return;
      }
      const int64_t pooled = (n * ho + ph) * wo + pw;
      src = grad + pooled * c;
      prow = pool + pooled * c;
      code = static_cast<uint8_t>((yh & 1) << 1 | (yw & 1));
    }
    if constexpr (std::is_same_v<G, int8_t>) {
      decode_po2(src, c, exp_max, g);  // already powers of two: po2_round below keeps them
    } else {
      load_floats(src, c, g);
    }
    if (prow) {
      #pragma GCC ivdep
      for (int64_t ch = 0; ch < c; ++ch) g[ch] = prow[ch] == code ? g[ch] : 0.0f;
    }
    if (po2) {
      #pragma GCC ivdep
      for (int64_t ch = 0; ch < c; ++ch) g[ch] = po2_round(g[ch], exp_max, exp_min);
    }
    if (mask) {
      expand_bits(mask + r * packed_width(c), c, flags);
      #pragma GCC ivdep
      for (int64_t ch = 0; ch < c; ++ch) g[ch] = flags[ch] ? g[ch] : 0.0f;
    }
  }
};

template <typename G>
GradSource<G> grad_source(const Tensor& grad, const Tensor& pool, const Tensor& mask,
                          int64_t rows, int64_t c, int64_t h, int64_t w, bool po2,
                          double exp_max, int64_t levels) {
  GradSource<G> src{grad.data_ptr<G>(), c, h, w, h / 2, w / 2, nullptr, nullptr, po2,
                    static_cast<int>(exp_max), static_cast<int>(exp_max - (levels - 1))};
  if (pool.numel()) {
    const int64_t pooled_rows = rows / (h * w) * src.ho * src.wo;
    check_rows(pool, "pool positions", pooled_rows, c);
    check_rows(grad, "grad_out", pooled_rows, c);
    src.pool = pool.data_ptr<uint8_t>();
  } else {
    check_rows(grad, "grad_out", rows, c);
  }
  if (mask.numel()) {
    check_rows(mask, "mask", rows, packed_width(c));
    src.mask = mask.data_ptr<uint8_t>();
  }
  return src;
}

template <typename G>
void bn_backward_sums_impl(const GradSource<G>& src, const uint8_t* y_bits, int64_t rows,
                           const float* sigma1, double* out) {
  const int64_t c = src.c, width = packed_width(c);
  blocked_sums(rows, 4 * c, out, [&](int64_t first, int64_t last, double* part) {
    double* d_beta = part;
    double* sum_g = part + c;
    double* sum_gy = part + 2 * c;
    double* sum_sgn = part + 3 * c;
    std::vector<float> g(c);
    std::vector<uint8_t> flags(padded(c)), pos(padded(c));
    std::vector<float> sgn(c);
    for (int64_t r = first; r < last; ++r) {
      src.row(r, g.data(), flags.data());
      expand_bits(y_bits + r * width, c, pos.data());
#pragma GCC ivdep
      for (int64_t ch = 0; ch < c; ++ch) sgn[ch] = pos[ch] ? 1.0f : -1.0f;
#pragma GCC ivdep
      for (int64_t ch = 0; ch < c; ++ch) {
        const float scaled = g[ch] / sigma1[ch];
        d_beta[ch] += g[ch];
        sum_g[ch] += scaled;
        sum_gy[ch] += sgn[ch] * scaled;
        sum_sgn[ch] += sgn[ch];
      }
    }
  });
}

// Per-channel sums the batch norm's backward needs: (d_beta, sum g/sigma1,
// sum sgn(y) g/sigma1, sum sgn(y)) as a (4, C) float64 tensor.
Tensor bn_backward_sums(const Tensor& grad, const Tensor& pool, const Tensor& mask,
                        const Tensor& y_bits, const Tensor& sigma1, int64_t h, int64_t w,
                        bool po2, double exp_max, int64_t levels) {
  const int64_t rows = y_bits.size(0), c = sigma1.size(0);
  check_rows(y_bits, "y_bits", rows, packed_width(c));
  auto out = torch::zeros({4, c}, sigma1.options().dtype(torch::kDouble));
  const uint8_t* yp = y_bits.data_ptr<uint8_t>();
  const float* sp = sigma1.data_ptr<float>();
  if (grad.scalar_type() == torch::kChar) {
    bn_backward_sums_impl(grad_source<int8_t>(grad, pool, mask, rows, c, h, w, po2, exp_max,
                                              levels),
                          yp, rows, sp, out.data_ptr<double>());
  } else if (grad.scalar_type() == torch::kBFloat16) {
    bn_backward_sums_impl(grad_source<at::BFloat16>(grad, pool, mask, rows, c, h, w, po2,
                                                    exp_max, levels),
                          yp, rows, sp, out.data_ptr<double>());
  } else if (grad.scalar_type() == torch::kFloat) {
    bn_backward_sums_impl(grad_source<float>(grad, pool, mask, rows, c, h, w, po2, exp_max,
                                             levels),
                          yp, rows, sp, out.data_ptr<double>());
  } else {
    TORCH_CHECK(false, "bn_backward_sums: grad must be bfloat16 or float32");
  }
  return out;
}

template <typename G, typename D>
void bn_backward_dz_impl(const GradSource<G>& src, const uint8_t* y_bits, int64_t first,
                         int64_t last, const float* sigma1, const float* shift,
                         const float* slope, const uint8_t* pool_bn, int64_t h2, int64_t w2,
                         D* dz) {
  const int64_t c = src.c, width = packed_width(c), hw = src.h * src.w;
  // rows are independent (each writes its own dz row, or its own un-pooled window)
  at::parallel_for(first, last, kSumRows, [&](int64_t r0, int64_t r1) {
    std::vector<float> g(c);
    std::vector<uint8_t> flags(padded(c)), pos(padded(c));
    for (int64_t r = r0; r < r1; ++r) {
      src.row(r, g.data(), flags.data());
      expand_bits(y_bits + r * width, c, pos.data());
      #pragma GCC ivdep
      for (int64_t ch = 0; ch < c; ++ch) {
        const float signed_slope = pos[ch] ? slope[ch] : -slope[ch];
        g[ch] = (g[ch] / sigma1[ch] - shift[ch]) - signed_slope;
      }
      if (!pool_bn) {
        store_floats(g.data(), c, dz + (r - first) * c);
        continue;
      }
      const int64_t n = r / hw - first / hw, yh = (r % hw) / src.w, yw = (r % hw) % src.w;
      const uint8_t* prow = pool_bn + r * c;
      #pragma GCC ivdep
      for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t zh = 2 * yh + (prow[ch] >> 1), zw = 2 * yw + (prow[ch] & 1);
        dz[((n * h2 + zh) * w2 + zw) * c + ch] = static_cast<D>(g[ch]);
      }
    }
  });
}

template <typename G>
void bn_backward_dz_out(const GradSource<G>& src, const uint8_t* y_bits, int64_t first,
                        int64_t last, const float* sigma1, const float* shift,
                        const float* slope, const uint8_t* pool_bn, int64_t h2, int64_t w2,
                        Tensor& dz) {
  if (dz.scalar_type() == torch::kBFloat16) {
    bn_backward_dz_impl(src, y_bits, first, last, sigma1, shift, slope, pool_bn, h2, w2,
                        dz.data_ptr<at::BFloat16>());
  } else if (dz.scalar_type() == torch::kFloat) {
    bn_backward_dz_impl(src, y_bits, first, last, sigma1, shift, slope, pool_bn, h2, w2,
                        dz.data_ptr<float>());
  } else {
    TORCH_CHECK(false, "bn_backward_dz: dz must be bfloat16 or float32");
  }
}

// dL/dz for y's rows [first, last): g / sigma1 - shift - sgn(y) slope, per channel, written
// to dz (rows of z; un-pooled to (h2, w2) through pool_bn's argmax positions when the block
// pools before its batch norm, zeros elsewhere).
void bn_backward_dz(const Tensor& grad, const Tensor& pool, const Tensor& mask,
                    const Tensor& y_bits, const Tensor& sigma1, const Tensor& shift,
                    const Tensor& slope, int64_t h, int64_t w, bool po2, double exp_max,
                    int64_t levels, int64_t first, int64_t last, const Tensor& pool_bn,
                    int64_t h2, int64_t w2, Tensor& dz) {
  const int64_t rows = y_bits.size(0), c = sigma1.size(0);
  check_rows(y_bits, "y_bits", rows, packed_width(c));
  TORCH_CHECK(0 <= first && first <= last && last <= rows && first % (h * w) == 0 &&
              last % (h * w) == 0, "bn_backward_dz: rows must cover whole samples");
  const uint8_t* pbn = nullptr;
  if (pool_bn.numel()) {
    check_rows(pool_bn, "pool_bn", rows, c);
    pbn = pool_bn.data_ptr<uint8_t>();
    check_rows(dz, "dz", (last - first) / (h * w) * h2 * w2, c);
    dz.zero_();
  } else {
    check_rows(dz, "dz", last - first, c);
  }
  const uint8_t* yp = y_bits.data_ptr<uint8_t>();
  const float* sp = sigma1.data_ptr<float>();
  const float* sh = shift.data_ptr<float>();
  const float* sl = slope.data_ptr<float>();
  if (grad.scalar_type() == torch::kChar) {
    bn_backward_dz_out(grad_source<int8_t>(grad, pool, mask, rows, c, h, w, po2, exp_max,
                                           levels),
                       yp, first, last, sp, sh, sl, pbn, h2, w2, dz);
  } else if (grad.scalar_type() == torch::kBFloat16) {
    bn_backward_dz_out(grad_source<at::BFloat16>(grad, pool, mask, rows, c, h, w, po2, exp_max,
                                                 levels),
                       yp, first, last, sp, sh, sl, pbn, h2, w2, dz);
  } else if (grad.scalar_type() == torch::kFloat) {
    bn_backward_dz_out(grad_source<float>(grad, pool, mask, rows, c, h, w, po2, exp_max,
                                          levels),
                       yp, first, last, sp, sh, sl, pbn, h2, w2, dz);
  } else {
    TORCH_CHECK(false, "bn_backward_dz: grad must be bfloat16 or float32");
  }
}

// Packed sgn(dz^T x), block by block of `block_rows` output rows: no full-size dW exists.
Tensor dense_sign_dw(const Tensor& dz, const Tensor& x, int64_t block_rows) {
  const int64_t out_features = dz.size(1), k = x.size(1), width = packed_width(k);
  auto packed = torch::empty({out_features, width}, dz.options().dtype(torch::kUInt8));
  uint8_t* pp = packed.data_ptr<uint8_t>();
  std::vector<uint8_t> flags(padded(k), 0);
  for (int64_t o = 0; o < out_features; o += block_rows) {
    const int64_t o2 = std::min(out_features, o + block_rows);
    // dW >= 0 as 0/1 bytes straight from the product, in its own dtype (no float32 copy)
    const Tensor positive = dz.slice(1, o, o2).t().mm(x).ge(0).contiguous();
    const auto* flags_in = reinterpret_cast<const uint8_t*>(positive.data_ptr<bool>());
    for (int64_t r = 0; r < o2 - o; ++r) {
      const uint8_t* row = flags_in + r * k;
      if (k % 8 == 0) {
        pack_flags(row, k, pp + (o + r) * width);
      } else {  // pack_flags reads whole words: pad the row's last byte with zeros
        std::memcpy(flags.data(), row, k);
        pack_flags(flags.data(), k, pp + (o + r) * width);
      }
    }
  }
  return packed;
}

// ---------------------------------------------------------------- optimizer

// One LowMemAdam update of a parameter with 16-bit moments, from either its packed 1-bit
// gradient (unit signs) or its real gradient divided by `scale`.
template <typename P, typename S, typename G>
void adam_impl(P* p, S* m, S* v, int64_t numel, const uint8_t* bits, int64_t per_row,
               const G* grad, float scale, float b1, float b2, float step_size, float root_bc2,
               float eps) {
  const int64_t width = packed_width(per_row);
  std::vector<float> g(per_row), pf(per_row), mf(per_row), vf(per_row);
  std::vector<uint8_t> flags(padded(per_row));
  float* __restrict__ gp = g.data();
  float* __restrict__ pp = pf.data();
  float* __restrict__ mp = mf.data();
  float* __restrict__ vp = vf.data();
  for (int64_t start = 0; start < numel; start += per_row) {
    const int64_t count = std::min(per_row, numel - start);
    if (bits) {
      expand_bits(bits + (start / per_row) * width, per_row, flags.data());
#pragma GCC ivdep
      for (int64_t i = 0; i < count; ++i) gp[i] = flags[i] ? 1.0f : -1.0f;
    } else {
      load_floats(grad + start, count, gp);
      if (scale != 1.0f) {
#pragma GCC ivdep
        for (int64_t i = 0; i < count; ++i) gp[i] = gp[i] / scale;
      }
    }
    load_floats(p + start, count, pp);
    load_floats(m + start, count, mp);
    load_floats(v + start, count, vp);
#pragma GCC ivdep
    for (int64_t i = 0; i < count; ++i) {
      mp[i] = mp[i] * b1 + (1.0f - b1) * gp[i];
      vp[i] = vp[i] * b2 + (1.0f - b2) * (gp[i] * gp[i]);
      pp[i] = pp[i] - step_size * (mp[i] / (std::sqrt(vp[i]) / root_bc2 + eps));
    }
    store_floats(mp, count, m + start);
    store_floats(vp, count, v + start);
    store_floats(pp, count, p + start);
  }
}

constexpr int64_t kAdamRow = 4096;  // elements per pass over a real gradient

template <typename P, typename S>
void adam_grad_dispatch(Tensor& p, Tensor& m, Tensor& v, const Tensor& bits, int64_t per_row,
                        const Tensor& grad, float scale, float b1, float b2, float step_size,
                        float root_bc2, float eps) {
  P* pp = p.data_ptr<P>();
  S* mp = m.data_ptr<S>();
  S* vp = v.data_ptr<S>();
  const int64_t numel = p.numel();
  if (bits.numel()) {
    adam_impl<P, S, float>(pp, mp, vp, numel, bits.data_ptr<uint8_t>(), per_row, nullptr, scale,
                           b1, b2, step_size, root_bc2, eps);
  } else if (grad.scalar_type() == torch::kFloat) {
    adam_impl(pp, mp, vp, numel, nullptr, kAdamRow, grad.data_ptr<float>(), scale, b1, b2, step_size,
              root_bc2, eps);
  } else if (grad.scalar_type() == torch::kHalf) {
    adam_impl(pp, mp, vp, numel, nullptr, kAdamRow, grad.data_ptr<at::Half>(), scale, b1, b2,
              step_size, root_bc2, eps);
  } else if (grad.scalar_type() == torch::kBFloat16) {
    adam_impl(pp, mp, vp, numel, nullptr, kAdamRow, grad.data_ptr<at::BFloat16>(), scale, b1, b2,
              step_size, root_bc2, eps);
  } else {
    TORCH_CHECK(false, "adam_update: unsupported gradient dtype ", grad.scalar_type());
  }
}

void adam_update(Tensor& p, Tensor& m, Tensor& v, const Tensor& bits, int64_t per_row,
                 const Tensor& grad, double scale, double b1, double b2, double step_size,
                 double root_bc2, double eps) {
  TORCH_CHECK(p.is_contiguous() && m.is_contiguous() && v.is_contiguous() &&
              m.numel() == p.numel() && v.numel() == p.numel() &&
              m.scalar_type() == v.scalar_type(), "adam_update: bad parameter or state");
  TORCH_CHECK(bits.numel() || (grad.is_contiguous() && grad.numel() == p.numel()),
              "adam_update: bad gradient");
  const auto args = std::make_tuple(static_cast<float>(scale), static_cast<float>(b1),
                                    static_cast<float>(b2), static_cast<float>(step_size),
                                    static_cast<float>(root_bc2), static_cast<float>(eps));
  auto run = [&](auto p_tag, auto s_tag) {
    using P = decltype(p_tag);
    using S = decltype(s_tag);
    adam_grad_dispatch<P, S>(p, m, v, bits, per_row, grad, std::get<0>(args), std::get<1>(args),
                             std::get<2>(args), std::get<3>(args), std::get<4>(args),
                             std::get<5>(args));
  };
  const bool half_state = m.scalar_type() == torch::kHalf;
  TORCH_CHECK(half_state || m.scalar_type() == torch::kFloat,
              "adam_update: state must be float16 or float32");
  if (p.scalar_type() == torch::kHalf) {
    half_state ? run(at::Half{}, at::Half{}) : run(at::Half{}, float{});
  } else if (p.scalar_type() == torch::kFloat) {
    half_state ? run(float{}, at::Half{}) : run(float{}, float{});
  } else if (p.scalar_type() == torch::kBFloat16) {
    half_state ? run(at::BFloat16{}, at::Half{}) : run(at::BFloat16{}, float{});
  } else {
    TORCH_CHECK(false, "adam_update: unsupported parameter dtype ", p.scalar_type());
  }
}

// A gradient rounded to powers of two and held as int8 codes (see decode_po2). Blocks of
// values are independent: split over torch's pool, the codes do not depend on the threads.
template <typename G>
void po2_encode_impl(const G* g, int64_t n, int exp_max, int levels, int8_t* codes) {
  constexpr int64_t kBlock = 4096;
  const int exp_min = exp_max - (levels - 1);
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    // locals, not the lambda's references: an int8 store may alias them (see bn_forward_impl)
    const int top = exp_max, bottom = exp_min;
    float buffer[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * kBlock, count = std::min<int64_t>(kBlock, n - start);
      load_floats(g + start, count, buffer);
      int8_t* __restrict__ out = codes + start;
#pragma GCC ivdep
      for (int64_t i = 0; i < count; ++i) {
        const float q = po2_round(buffer[i], top, bottom);
        const uint32_t bits = std::bit_cast<uint32_t>(q);
        const int magnitude = top + 1 - (static_cast<int>((bits >> 23) & 0xFF) - 127);
        out[i] = static_cast<int8_t>(q == 0.0f ? 0 : (q < 0.0f ? -magnitude : magnitude));
      }
    }
  });
}

// Zeroes, in place, the values of rows (rows, C) whose packed mask bit is 0: the
// straight-through estimator's |x| <= 1 on a block's input, applied to its dX rows. Works
// on the values' bits (16-bit types as uint16: +0.0 is all zero bits in each).
template <typename T>
void mask_rows_impl(T* values, const uint8_t* mask, int64_t rows, int64_t c) {
  at::parallel_for(0, rows, kSumRows, [&](int64_t r0, int64_t r1) {
    const int64_t channels = c, width = packed_width(c);
    std::vector<uint8_t> flag_storage(padded(channels));
    uint8_t* __restrict__ flags = flag_storage.data();
    for (int64_t r = r0; r < r1; ++r) {
      expand_bits(mask + r * width, channels, flags);
      T* __restrict__ row = values + r * channels;
#pragma GCC ivdep
      for (int64_t ch = 0; ch < channels; ++ch) row[ch] = flags[ch] ? row[ch] : T{};
    }
  });
}

void mask_rows(Tensor& values, const Tensor& mask) {
  const int64_t rows = values.size(0), c = values.size(1);
  check_rows(values, "mask_rows values", rows, c);
  check_rows(mask, "mask_rows mask", rows, packed_width(c));
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  if (values.scalar_type() == torch::kFloat) {
    mask_rows_impl(values.data_ptr<float>(), mp, rows, c);
  } else if (values.element_size() == 2 && values.is_floating_point()) {
    mask_rows_impl(static_cast<uint16_t*>(values.data_ptr()), mp, rows, c);
  } else {
    TORCH_CHECK(false, "mask_rows: values must be float32, bfloat16 or float16");
  }
}

Tensor po2_encode(const Tensor& grad, double exp_max, int64_t levels) {
  TORCH_CHECK(grad.is_contiguous(), "po2_encode: expected a contiguous gradient");
  auto codes = torch::empty(grad.sizes(), grad.options().dtype(torch::kInt8));
  const int e = static_cast<int>(exp_max);
  if (grad.scalar_type() == torch::kBFloat16) {
    po2_encode_impl(grad.data_ptr<at::BFloat16>(), grad.numel(), e, levels,
                    codes.data_ptr<int8_t>());
  } else if (grad.scalar_type() == torch::kFloat) {
    po2_encode_impl(grad.data_ptr<float>(), grad.numel(), e, levels, codes.data_ptr<int8_t>());
  } else {
    TORCH_CHECK(false, "po2_encode: gradient must be bfloat16 or float32");
  }
  return codes;
}

// Codes made relative to exp_max - shift, re-based to exp_max (shift >= 0): exact, since
// a value kept under the lower exponent window is kept under the higher one if it still
// fits its levels, and one dropped under the lower is dropped under the higher too.
void po2_rebase(Tensor& codes, int64_t shift, int64_t levels) {
  TORCH_CHECK(codes.scalar_type() == torch::kChar && codes.is_contiguous() && shift >= 0,
              "po2_rebase: contiguous int8 codes and a non-negative shift expected");
  int8_t* cp = codes.data_ptr<int8_t>();
  const int64_t n = codes.numel();
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const int code = cp[i];
    const int magnitude = (code < 0 ? -code : code) + static_cast<int>(shift);
    const int kept = code == 0 || magnitude > levels ? 0 : magnitude;
    cp[i] = static_cast<int8_t>(code < 0 ? -kept : kept);
  }
}

// ---------------------------------------------------------------- whole dense blocks

// A dense block's forward in one call (what trainers.lowmem_fused does step by step for
// conv blocks): int8 product on +-1 input (float32 on a first layer's real input), float16 z
// with its sums, batch-norm statistics and running update, then the fused apply; with
// `bits`, a hidden layer's product is XNOR-popcount of sign bits (bit_kernels.cpp). Returns
// {out, packed input bits (or empty), y_bits, mask, float16 (sigma1, mean|y|)}.
std::vector<Tensor> dense_forward(const Tensor& x, const Tensor& weight, const Tensor& beta,
                                  Tensor& running_mean, Tensor& running_sigma1, double momentum,
                                  double eps, bool training, bool save, bool first,
                                  bool pack_input, bool sign_output, bool bf16_out, bool int8,
                                  bool bits, int64_t sign_block_rows) {
  const auto u8 = x.options().dtype(torch::kUInt8);
  const Tensor empty = torch::empty({0}, u8);
  Tensor z, x_bits = empty;
  if (!first) {
    auto packed = sign_pack(x.contiguous(), pack_input || bits, false);
    x_bits = pack_input ? packed[1] : empty;
    if (bits) {  // XNOR-popcount of the input's sign bits with sgn(W)'s
      const Tensor w_bits = sign_pack(weight.contiguous(), true, false)[1];
      z = bit_conv(packed[1], x.size(0), 1, 1, x.size(1), w_bits, 1, 1, 1, 1, 0, 0);
    } else if (int8) {
      z = at::_int_mm(packed[0], signs(weight.contiguous(), torch::kInt8).t());
    }
  }
  if (!z.defined()) z = dense_sign_forward(x, weight, sign_block_rows);  // real or fp32 path
  const int64_t rows = z.size(0), c = z.size(1);
  Tensor z16 = torch::empty({rows, c}, x.options().dtype(torch::kHalf));
  Tensor sums = torch::zeros({c}, x.options().dtype(torch::kDouble));
  store_rows(z.contiguous(), z16, sums);
  Tensor mu, sigma1;
  if (training) {
    const Tensor stats = bn_statistics(z16, sums, eps);
    mu = stats[0];
    sigma1 = stats[1];
    running_mean.lerp_(mu.to(running_mean.scalar_type()), 1 - momentum);
    running_sigma1.lerp_(sigma1.to(running_sigma1.scalar_type()), 1 - momentum);
  } else {
    mu = running_mean.to(torch::kFloat).contiguous();
    sigma1 = running_sigma1.to(torch::kFloat).contiguous();
  }
  Tensor y_bits = save ? torch::empty({rows, packed_width(c)}, u8) : empty;
  Tensor mask = save && sign_output ? torch::empty({rows, packed_width(c)}, u8) : empty;
  Tensor out = torch::empty(
      {rows, c}, x.options().dtype(bf16_out && sign_output ? torch::kBFloat16 : torch::kFloat));
  const Tensor abs_y = bn_forward(z16, mu.contiguous(), sigma1.contiguous(),
                                  beta.to(torch::kFloat).contiguous(), out, y_bits, mask,
                                  sign_output);
  const Tensor stats = at::stack({sigma1, (abs_y / rows).to(torch::kFloat)}).to(torch::kHalf);
  return {out, x_bits, y_bits, mask, stats};
}

// A dense block's backward in one call: batch-norm sums and dz (float32 on a first layer,
// else in dtype), the 1-bit dW (or the full dW with binary_dw off) and dX.
// Returns {grad_x (or empty), packed dW or dW, d_beta (float64)}.
// dX = dz sgn(W), with sgn(W) made a block of input columns at a time (at most
// `block_elements` values): a wide layer's full sign matrix is never held. Each column of dX
// is still one product over all of W's rows, as in a single product.
Tensor dense_grad_x(const Tensor& dz, const Tensor& weight, torch::ScalarType dtype,
                    int64_t block_elements) {
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t cols = std::max<int64_t>(8, block_elements / std::max<int64_t>(out, 1));
  if (cols >= in) return dz.mm(signs(weight.contiguous(), dtype));
  Tensor grad_x = torch::empty({dz.size(0), in}, dz.options());
  for (int64_t c0 = 0; c0 < in; c0 += cols) {
    const int64_t c1 = std::min(in, c0 + cols);
    grad_x.slice(1, c0, c1).copy_(dz.mm(signs(weight.slice(1, c0, c1).contiguous(), dtype)));
  }
  return grad_x;
}

std::vector<Tensor> dense_backward(const Tensor& grad_out, const Tensor& x_saved, bool x_packed,
                                   int64_t in_features, const Tensor& weight,
                                   const Tensor& y_bits, const Tensor& mask,
                                   const Tensor& stats, bool first, bool need_x, bool po2,
                                   int64_t levels, bool binary_dw, int64_t dw_block_rows,
                                   torch::ScalarType dtype, double coded_exp_max,
                                   int64_t dx_block_elements) {
  const Tensor sigma1 = stats[0].to(torch::kFloat).contiguous();
  const Tensor mean_abs_y = stats[1].to(torch::kFloat).contiguous();
  Tensor g = grad_out.contiguous();
  const bool coded = g.scalar_type() == torch::kChar;  // po2 codes from the block above
  if (!coded && g.scalar_type() != torch::kBFloat16 && g.scalar_type() != torch::kFloat)
    g = g.to(torch::kFloat);
  double exp_max = coded ? coded_exp_max : 0.0;
  if (po2 && !coded && g.numel()) {
    const double peak = g.abs().max().item<double>();
    exp_max = peak > 0 ? std::floor(std::log2(peak) + 0.5) : 0.0;
  }
  const Tensor empty = torch::empty({0}, y_bits.options());
  const int64_t rows = y_bits.size(0), c = sigma1.size(0);
  const Tensor sums = bn_backward_sums(g, empty, mask, y_bits, sigma1, 1, 1, po2, exp_max,
                                       levels);
  // shift and slope as trainers.lowmem_fused computes them (float32, one op at a time)
  Tensor shift = torch::empty({c}, sigma1.options()), slope = torch::empty({c}, sigma1.options());
  const double* sp = sums.data_ptr<double>();
  const float* ma = mean_abs_y.data_ptr<float>();
  for (int64_t ch = 0; ch < c; ++ch) {
    const float sl = ma[ch] * static_cast<float>(sp[2 * c + ch] / rows);
    const float prod = static_cast<float>(sp[3 * c + ch] / rows) * sl;
    slope.data_ptr<float>()[ch] = sl;
    shift.data_ptr<float>()[ch] = static_cast<float>(sp[c + ch] / rows) - prod;
  }
  const auto wd = first ? torch::kFloat : dtype;
  Tensor dz = torch::empty({rows, c}, sigma1.options().dtype(wd));
  bn_backward_dz(g, empty, mask, y_bits, sigma1, shift, slope, 1, 1, po2, exp_max, levels, 0,
                 rows, empty, 1, 1, dz);
  const Tensor x_in = x_packed ? unpack_signs(x_saved, in_features, wd) : x_saved.to(wd);
  const Tensor dw = binary_dw ? dense_sign_dw(dz, x_in, dw_block_rows)
                              : dz.t().mm(x_in).to(torch::kFloat);
  return {need_x ? dense_grad_x(dz.to(dtype), weight, dtype, dx_block_elements) : empty, dw,
          sums[0]};
}

}  // namespace

void register_bop_kernels(pybind11::module& m);  // bop_kernels.cpp
void register_standard_kernels(pybind11::module& m);  // standard_kernels.cpp
void register_bit_kernels(pybind11::module& m);  // bit_kernels.cpp

// The instruction-set extensions this build was compiled for (what `measure` reports).
std::string simd_features() {
  std::string found;
  auto add = [&found](const char* name) { found += found.empty() ? name : std::string(" ") + name; };
#ifdef __AVX512F__
  add("avx512f");
#endif
#ifdef __AVX2__
  add("avx2");
#endif
#ifdef __F16C__
  add("f16c");
#endif
#ifdef __ARM_NEON
  add("neon");
#endif
#ifdef __ARM_FEATURE_FP16_VECTOR_ARITHMETIC
  add("fp16");
#endif
#ifdef __ARM_FEATURE_DOTPROD
  add("dotprod");
#endif
#ifdef __ARM_FEATURE_MATMUL_INT8
  add("i8mm");
#endif
#ifdef __ARM_FEATURE_BF16
  add("bf16");
#endif
#ifdef __ARM_FEATURE_SVE
  add("sve");
#endif
  return found.empty() ? "none" : found;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_bop_kernels(m);
  register_standard_kernels(m);
  register_bit_kernels(m);
  m.def("simd_features", &simd_features, "instruction-set extensions compiled in");
  m.def("sign_pack", &sign_pack, "int8 signs (+ packed sign bits and |x| <= 1 mask) of rows");
  m.def("unpack_signs", &unpack_signs, "packed bits -> +-1 rows of a dtype");
  m.def("signs", &signs, "sgn(w) as +-1 of a dtype");
  m.def("bn_statistics", &bn_statistics, "mu and sigma1 of float16 rows from their sums");
  m.def("bn_forward", &bn_forward, "L1 batch norm apply + sign + packed bits, fused");
  m.def("pool_signs", &pool_signs, "2x2 max-pool of packed signs, with argmax positions");
  m.def("store_rows", &store_rows, "z rows -> float16 rows plus per-channel sums");
  m.def("dense_sign_forward", &dense_sign_forward, "x @ sgn(W)^T block by block, float32");
  m.def("po2_encode", &po2_encode, "power-of-two gradient as int8 codes");
  m.def("mask_rows", &mask_rows, "zero rows' values in place where a packed mask bit is 0");
  m.def("po2_rebase", &po2_rebase, "re-base int8 power-of-two codes to a higher exponent");
  m.def("dense_forward", &dense_forward, "a dense low-memory block's forward, whole");
  m.def("dense_backward", &dense_backward, "a dense low-memory block's backward, whole");
  m.def("bn_backward_sums", &bn_backward_sums, "per-channel sums of the batch-norm backward");
  m.def("bn_backward_dz", &bn_backward_dz, "dL/dz of a low-memory block, rows [first, last)");
  m.def("dense_sign_dw", &dense_sign_dw, "packed sgn(dz^T x), block by block");
  m.def("adam_update", &adam_update, "one LowMemAdam update of one parameter");
}
