// A binary convolution on packed sign bits: XNOR and popcount, exact (the forward of a
// low-memory block whose input is +-1).
//
// A product of +-1 vectors of length C is C - 2 * popcount(a XOR b) when a and b hold their
// signs as bits (1 = +1). The block's input already exists as packed sign-bit rows
// (channels-last: row = one position, bit j of byte b = channel 8b + j, padding bits 0), so
// the layer needs neither an unpacked float32 input nor im2col columns: for each output
// position the kh x kw input rows are gathered into one bit string of kh*kw*ceil(C/8) bytes
// (zero-padded to whole 64-bit words), and each output channel is one XOR-popcount pass
// against that channel's weight bits, laid out the same way: 64 multiply-adds a word, where
// the float32 product of the same layer moves 32x the input bytes.
//
// Zero padding of the convolution: a tap outside the image contributes 0, not +-1. Its
// gathered bits are 0, so the pass counts popcount(w_tap) for it; that count (per output
// channel and tap, computed once a call) is taken back off, and the tap's C is not counted.
// Output: int32 rows (n * ho * wo, out_channels), the int8 product's layout; rows are split
// over torch's thread pool (at::parallel_for), each row's sums are integers, so the result
// does not depend on the thread count.

#include "torch_lite.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace {

using torch::Tensor;

inline int64_t packed_width(int64_t features) { return (features + 7) / 8; }
inline int64_t whole_words(int64_t bytes) { return (bytes + 7) / 8; }

struct ConvShape {
  int64_t n, h, w, c, out, kh, kw, sh, sw, ph, pw, ho, wo, cb, words;
  int64_t taps() const { return kh * kw; }
};

// Output channels are counted a vector at a time: the weights are stored word-major,
// (words, out_pad) with out_pad a multiple of kLanes, so a vector holds word k of kLanes
// consecutive output channels, XORed with the input's word k broadcast. Per-byte counts
// accumulate in 8-bit lanes (at most 8 a word, so a flush every kFlushWords words) and are
// summed into one 64-bit count per channel (AVX2: vpshufb nibble counts + vpsadbw; NEON:
// vcnt + pairwise widening adds); elsewhere one scalar popcount per word and channel.
#if defined(__AVX2__)
constexpr int64_t kLanes = 16;  // four 256-bit vectors of four 64-bit words
#elif defined(__ARM_NEON)
constexpr int64_t kLanes = 8;   // four 128-bit vectors of two 64-bit words
#else
constexpr int64_t kLanes = 4;
#endif
constexpr int64_t kFlushWords = 31;  // 31 * 8 = 248 < 256

// differ[0..kLanes) = popcount(x XOR w) over `words` words for kLanes output channels whose
// word k sits at w + k * out_pad.
inline void popcount_lanes(const uint64_t* x, const uint64_t* w, int64_t words,
                           int64_t out_pad, int64_t* differ) {
#if defined(__AVX2__)
  const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
  auto count = [&](__m256i v) {
    const __m256i lo = _mm256_and_si256(v, low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    return _mm256_add_epi8(_mm256_shuffle_epi8(table, lo), _mm256_shuffle_epi8(table, hi));
  };
  __m256i t0 = zero, t1 = zero, t2 = zero, t3 = zero;
  for (int64_t k0 = 0; k0 < words; k0 += kFlushWords) {
    __m256i a0 = zero, a1 = zero, a2 = zero, a3 = zero;
    const int64_t k1 = std::min(words, k0 + kFlushWords);
    for (int64_t k = k0; k < k1; ++k) {
      const __m256i v = _mm256_set1_epi64x(static_cast<long long>(x[k]));
      const auto* row = reinterpret_cast<const __m256i*>(w + k * out_pad);
      a0 = _mm256_add_epi8(a0, count(_mm256_xor_si256(v, _mm256_loadu_si256(row))));
      a1 = _mm256_add_epi8(a1, count(_mm256_xor_si256(v, _mm256_loadu_si256(row + 1))));
      a2 = _mm256_add_epi8(a2, count(_mm256_xor_si256(v, _mm256_loadu_si256(row + 2))));
      a3 = _mm256_add_epi8(a3, count(_mm256_xor_si256(v, _mm256_loadu_si256(row + 3))));
    }
    t0 = _mm256_add_epi64(t0, _mm256_sad_epu8(a0, zero));
    t1 = _mm256_add_epi64(t1, _mm256_sad_epu8(a1, zero));
    t2 = _mm256_add_epi64(t2, _mm256_sad_epu8(a2, zero));
    t3 = _mm256_add_epi64(t3, _mm256_sad_epu8(a3, zero));
  }
  auto* out = reinterpret_cast<__m256i*>(differ);
  _mm256_storeu_si256(out, t0);
  _mm256_storeu_si256(out + 1, t1);
  _mm256_storeu_si256(out + 2, t2);
  _mm256_storeu_si256(out + 3, t3);
#elif defined(__ARM_NEON)
  uint64x2_t t[4] = {vdupq_n_u64(0), vdupq_n_u64(0), vdupq_n_u64(0), vdupq_n_u64(0)};
  for (int64_t k0 = 0; k0 < words; k0 += kFlushWords) {
    uint8x16_t a[4] = {vdupq_n_u8(0), vdupq_n_u8(0), vdupq_n_u8(0), vdupq_n_u8(0)};
    const int64_t k1 = std::min(words, k0 + kFlushWords);
    for (int64_t k = k0; k < k1; ++k) {
      const uint8x16_t v = vreinterpretq_u8_u64(vdupq_n_u64(x[k]));
      const uint64_t* row = w + k * out_pad;
      for (int q = 0; q < 4; ++q)
        a[q] = vaddq_u8(a[q], vcntq_u8(veorq_u8(v, vreinterpretq_u8_u64(vld1q_u64(row + 2 * q)))));
    }
    for (int q = 0; q < 4; ++q) t[q] = vaddq_u64(t[q], vpaddlq_u32(vpaddlq_u16(vpaddlq_u8(a[q]))));
  }
  for (int q = 0; q < 4; ++q) vst1q_s64(differ + 2 * q, vreinterpretq_s64_u64(t[q]));
#else
  for (int64_t q = 0; q < kLanes; ++q) {
    int64_t a = 0;
    for (int64_t k = 0; k < words; ++k) a += std::popcount(x[k] ^ w[k * out_pad + q]);
    differ[q] = a;
  }
#endif
}

inline int64_t lanes_of(int64_t out) { return (out + kLanes - 1) / kLanes * kLanes; }

// Weight bits word-major, (words, out_pad): word k of channel o at k * out_pad + o; tap t's
// packed channels start at byte t * cb of a channel's bit string, the rest is 0, and so are
// the padding channels.
std::vector<uint64_t> weight_words(const Tensor& w_bits, const ConvShape& s) {
  const int64_t out_pad = lanes_of(s.out);
  std::vector<uint64_t> channel(s.words), words(s.words * out_pad, 0);
  const uint8_t* src = w_bits.data_ptr<uint8_t>();
  for (int64_t o = 0; o < s.out; ++o) {
    std::fill(channel.begin(), channel.end(), 0);
    std::memcpy(reinterpret_cast<uint8_t*>(channel.data()), src + o * s.taps() * s.cb,
                s.taps() * s.cb);
    for (int64_t k = 0; k < s.words; ++k) words[k * out_pad + o] = channel[k];
  }
  return words;
}

// popcount of each (output channel, tap) weight bit string: what an out-of-image tap adds.
std::vector<int32_t> tap_counts(const Tensor& w_bits, const ConvShape& s) {
  std::vector<int32_t> counts(s.out * s.taps(), 0);
  const uint8_t* src = w_bits.data_ptr<uint8_t>();
  for (int64_t o = 0; o < s.out; ++o)
    for (int64_t t = 0; t < s.taps(); ++t) {
      const uint8_t* tap = src + (o * s.taps() + t) * s.cb;
      int32_t sum = 0;
      for (int64_t b = 0; b < s.cb; ++b) sum += std::popcount(static_cast<unsigned>(tap[b]));
      counts[o * s.taps() + t] = sum;
    }
  return counts;
}

void conv_rows(const uint8_t* x, const ConvShape& s, const uint64_t* weights,
               const int32_t* counts, int64_t first, int64_t last, int32_t* out) {
  const int64_t out_pad = lanes_of(s.out);
  std::vector<uint64_t> gathered(s.words);
  std::vector<int64_t> outside;  // taps of this row outside the image
  int64_t differ[kLanes];
  for (int64_t r = first; r < last; ++r) {
    const int64_t img = r / (s.ho * s.wo), pos = r % (s.ho * s.wo);
    const int64_t oi = pos / s.wo, oj = pos % s.wo;
    std::fill(gathered.begin(), gathered.end(), 0);
    outside.clear();
    auto* bytes = reinterpret_cast<uint8_t*>(gathered.data());
    for (int64_t ki = 0; ki < s.kh; ++ki)
      for (int64_t kj = 0; kj < s.kw; ++kj) {
        const int64_t i = oi * s.sh - s.ph + ki, j = oj * s.sw - s.pw + kj;
        const int64_t t = ki * s.kw + kj;
        if (i < 0 || i >= s.h || j < 0 || j >= s.w) {
          outside.push_back(t);
          continue;
        }
        std::memcpy(bytes + t * s.cb, x + ((img * s.h + i) * s.w + j) * s.cb, s.cb);
      }
    const int64_t inside_values = (s.taps() - static_cast<int64_t>(outside.size())) * s.c;
    int32_t* orow = out + r * s.out;
    for (int64_t o0 = 0; o0 < s.out; o0 += kLanes) {
      popcount_lanes(gathered.data(), weights + o0, s.words, out_pad, differ);
      for (int64_t q = 0; q < kLanes && o0 + q < s.out; ++q) {
        int64_t d = differ[q];
        for (int64_t t : outside) d -= counts[(o0 + q) * s.taps() + t];
        orow[o0 + q] = static_cast<int32_t>(inside_values - 2 * d);
      }
    }
  }
}

// +-1.0f for each bit of a byte (bit j = value j, 1 = +1): eight columns a table lookup.
struct SignFloats {
  float values[256][8];
  SignFloats() {
    for (int byte = 0; byte < 256; ++byte)
      for (int j = 0; j < 8; ++j) values[byte][j] = (byte >> j) & 1 ? 1.0f : -1.0f;
  }
};
const SignFloats kSignFloats;

// im2col columns of output rows [first, last) straight from the input's sign bits: row r - first
// of cols is (kh, kw, c) +-1.0f values, 0 for a tap outside the image (zero padding).
void sign_columns(const uint8_t* x, const ConvShape& s, int64_t first, int64_t last,
                  float* cols) {
  const int64_t k = s.taps() * s.c, whole = s.c / 8, tail = s.c % 8;
  for (int64_t r = first; r < last; ++r) {
    const int64_t img = r / (s.ho * s.wo), pos = r % (s.ho * s.wo);
    const int64_t oi = pos / s.wo, oj = pos % s.wo;
    float* row = cols + (r - first) * k;
    for (int64_t ki = 0; ki < s.kh; ++ki)
      for (int64_t kj = 0; kj < s.kw; ++kj) {
        const int64_t i = oi * s.sh - s.ph + ki, j = oj * s.sw - s.pw + kj;
        float* dst = row + (ki * s.kw + kj) * s.c;
        if (i < 0 || i >= s.h || j < 0 || j >= s.w) {
          std::fill(dst, dst + s.c, 0.0f);
          continue;
        }
        const uint8_t* src = x + ((img * s.h + i) * s.w + j) * s.cb;
        for (int64_t b = 0; b < whole; ++b)  // a fixed size: one vector move, not a call
          std::memcpy(dst + 8 * b, kSignFloats.values[src[b]], 8 * sizeof(float));
        if (tail) std::memcpy(dst + 8 * whole, kSignFloats.values[src[whole]], tail * sizeof(float));
      }
  }
}

}  // namespace

// x_bits: (n * h * w, ceil(c / 8)) packed sign-bit rows; w_bits: (out, kh * kw * ceil(c / 8))
// packed sgn(W) per tap in (kh, kw) order. Returns int32 rows (n * ho * wo, out).
at::Tensor bit_conv(const at::Tensor& x_bits, int64_t n, int64_t h, int64_t w, int64_t c,
                    const at::Tensor& w_bits, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                    int64_t ph, int64_t pw) {
  TORCH_CHECK(x_bits.scalar_type() == torch::kUInt8 && w_bits.scalar_type() == torch::kUInt8,
              "bit_conv: packed bits must be uint8");
  TORCH_CHECK(x_bits.is_contiguous() && w_bits.is_contiguous() && x_bits.dim() == 2 &&
                  w_bits.dim() == 2,
              "bit_conv: expected contiguous 2-d bit rows");
  ConvShape s{n, h, w, c, w_bits.size(0), kh, kw, sh, sw, ph, pw, 0, 0, packed_width(c), 0};
  TORCH_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0 && ph >= 0 && pw >= 0,
              "bit_conv: bad kernel, stride or padding");
  s.ho = (h + 2 * ph - kh) / sh + 1;
  s.wo = (w + 2 * pw - kw) / sw + 1;
  s.words = whole_words(s.taps() * s.cb);
  TORCH_CHECK(x_bits.size(0) == n * h * w && x_bits.size(1) == s.cb,
              "bit_conv: x_bits must be (", n * h * w, ", ", s.cb, "), got ", x_bits.sizes());
  TORCH_CHECK(w_bits.size(1) == s.taps() * s.cb, "bit_conv: w_bits must be (out, ",
              s.taps() * s.cb, "), got ", w_bits.sizes());
  TORCH_CHECK(s.ho > 0 && s.wo > 0, "bit_conv: empty output");
  const auto weights = weight_words(w_bits, s);
  const auto counts = tap_counts(w_bits, s);
  auto out = torch::empty({n * s.ho * s.wo, s.out}, x_bits.options().dtype(torch::kInt));
  const uint8_t* xp = x_bits.data_ptr<uint8_t>();
  int32_t* op = out.data_ptr<int32_t>();
  at::parallel_for(0, n * s.ho * s.wo, 16, [&](int64_t first, int64_t last) {
    conv_rows(xp, s, weights.data(), counts.data(), first, last, op);
  });
  return out;
}

// dW of a convolution whose input is +-1 held as packed sign bits: adds dz^T cols to dw, where
// dz is (rows, out) float32 for output rows [row0, row0 + rows) (channels-last, over all n
// samples) and cols their im2col columns, made from the bits block_rows rows at a time into
// one reused buffer; dw is (out, kh * kw * c), taps major. No unpacked input, no whole
// columns: the float32 product sees large blocks (oneDNN's weight gradient on a few
// channels-last samples at a time ran at half this speed on cnv's 64-channel layers).
void sign_conv_dw(const at::Tensor& x_bits, int64_t n, int64_t h, int64_t w, int64_t c,
                  int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                  int64_t row0, const at::Tensor& dz, at::Tensor& dw, int64_t block_rows) {
  TORCH_CHECK(x_bits.scalar_type() == torch::kUInt8 && x_bits.is_contiguous() &&
                  x_bits.dim() == 2,
              "sign_conv_dw: x_bits must be contiguous uint8 rows");
  TORCH_CHECK(dz.scalar_type() == torch::kFloat && dw.scalar_type() == torch::kFloat &&
                  dz.dim() == 2 && dw.dim() == 2 && dw.is_contiguous(),
              "sign_conv_dw: dz and dw must be float32 matrices (dw contiguous)");
  ConvShape s{n, h, w, c, dz.size(1), kh, kw, sh, sw, ph, pw, 0, 0, packed_width(c), 0};
  TORCH_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0 && ph >= 0 && pw >= 0 && block_rows > 0,
              "sign_conv_dw: bad kernel, stride, padding or block");
  s.ho = (h + 2 * ph - kh) / sh + 1;
  s.wo = (w + 2 * pw - kw) / sw + 1;
  const int64_t k = s.taps() * c, rows = dz.size(0);
  TORCH_CHECK(x_bits.size(0) == n * h * w && x_bits.size(1) == s.cb,
              "sign_conv_dw: x_bits must be (", n * h * w, ", ", s.cb, "), got ", x_bits.sizes());
  TORCH_CHECK(dw.size(0) == s.out && dw.size(1) == k, "sign_conv_dw: dw must be (", s.out,
              ", ", k, "), got ", dw.sizes());
  TORCH_CHECK(row0 >= 0 && row0 + rows <= n * s.ho * s.wo, "sign_conv_dw: rows [", row0, ", ",
              row0 + rows, ") outside the ", n * s.ho * s.wo, " output rows");
  const int64_t block = std::min(block_rows, rows);
  auto cols = torch::empty({block, k}, dz.options());
  const uint8_t* xp = x_bits.data_ptr<uint8_t>();
  float* cp = cols.data_ptr<float>();
  for (int64_t r = 0; r < rows; r += block) {
    const int64_t len = std::min(block, rows - r);
    at::parallel_for(row0 + r, row0 + r + len, 16, [&](int64_t first, int64_t last) {
      sign_columns(xp, s, first, last, cp + (first - row0 - r) * k);
    });
    dw.addmm_(dz.narrow(0, r, len).t(), cols.narrow(0, 0, len));
  }
}

void register_bit_kernels(pybind11::module& m) {
  m.def("bit_conv", &bit_conv,
        "exact binary convolution of packed sign-bit rows by XNOR-popcount, int32 rows");
  m.def("sign_conv_dw", &sign_conv_dw,
        "adds a convolution's dW from dz rows and the input's packed sign bits (im2col blocks)");
}
