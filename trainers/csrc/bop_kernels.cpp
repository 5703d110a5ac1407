// Bop's update with momentum stored in a custom floating-point format (trainers/bop/).
//
// One pass per block of weights: decode each stored momentum, update it, round it back into
// the format (nearest-even, subnormals or flush, saturation or infinity: the rules of
// trainers.bop.fpformat.FloatFormat), store its code in place, flip the weight where
// w * m > tau, and count the lost updates. The PyTorch path needs float64/int64 temporaries of
// the block and encodes twice (once to round, once to store); this needs none. Arithmetic is
// the PyTorch path's: float32, gamma and tau rounded to float32, no fused multiply-add.
//
// Codes are the IEEE layout (sign, exponent, mantissa). Storage: uint8 codes (8-bit formats),
// int16 codes (16-bit formats), else an MSB-first bitstream of `bits` bits a code; float32
// momentum when there is no format.

#include "torch_lite.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

using torch::Tensor;

struct Format {
  int e_bits, m_bits, bias;
  bool saturate, subnormals;
  int bits() const { return 1 + e_bits + m_bits; }
  int min_exponent() const { return 1 - bias; }
  int max_exponent() const { return (1 << e_bits) - 2 - bias; }
  int64_t inf_code() const { return static_cast<int64_t>((1 << e_bits) - 1) << m_bits; }
  // Exponent field difference to float32's, in place in a code: code + rebias = float32 bits
  // (shifted right by 23 - m_bits) for values normal in both.
  int64_t rebias() const { return static_cast<int64_t>(127 - bias) << m_bits; }
};

// Round-half-even of sig * 2^shift for a 24-bit significand.
inline int64_t scaled_round(uint64_t sig, int shift, int64_t cap) {
  if (shift >= 0) return shift > 40 ? cap : std::min<int64_t>(sig << shift, cap);
  const int r = -shift;
  if (r > 40) return 0;
  const uint64_t q = sig >> r, rem = sig & ((uint64_t{1} << r) - 1), half = uint64_t{1} << (r - 1);
  return std::min<int64_t>(q + (rem > half || (rem == half && (q & 1))), cap);
}

// The code of a float32 value in the format (FloatFormat.to_codes, exactly): every case.
inline int64_t to_code_general(float x, const Format& f) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const int64_t sign = static_cast<int64_t>(bits >> 31) << (f.e_bits + f.m_bits);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  const int64_t inf_code = f.inf_code();
  if (magnitude > 0x7F800000u)
    return sign | (f.m_bits > 0 ? inf_code | (int64_t{1} << (f.m_bits - 1)) : inf_code);
  if (magnitude == 0x7F800000u) return sign | inf_code;
  if (magnitude == 0) return sign;
  const int field = static_cast<int>(magnitude >> 23);
  const uint64_t sig = field ? (magnitude & 0x7FFFFFu) | 0x800000u : magnitude;
  const int unit = field ? field - 150 : -149;  // |x| = sig * 2^unit
  const int exponent = (63 - std::countl_zero(sig)) + unit;
  const int target = std::clamp(exponent, f.min_exponent(), f.max_exponent() + 1);
  const int64_t steps =
      scaled_round(sig, unit + f.m_bits - target, int64_t{1} << (f.m_bits + 2));
  int64_t code = (static_cast<int64_t>(target + f.bias) << f.m_bits) + steps -
                 (int64_t{1} << f.m_bits);
  if (code >= inf_code) code = f.saturate ? inf_code - 1 : inf_code;
  if (!f.subnormals && code < (int64_t{1} << f.m_bits)) code = 0;
  return sign | code;
}

// 2^e as a float32, for e in [-149, 127].
inline float pow2f(int e) {
  return e >= -126 ? std::bit_cast<float>(static_cast<uint32_t>(e + 127) << 23)
                   : std::bit_cast<float>(uint32_t{1} << (e + 149));
}

// The float32 value of a code (FloatFormat.from_codes): an integer times a power of two,
// both float32, whose product is exact (the formats lie within float32's range).
inline float from_code_general(int64_t code, const Format& f) {
  const int64_t e_mask = (int64_t{1} << f.e_bits) - 1;
  const int64_t field = (code >> f.m_bits) & e_mask;
  const int64_t mantissa = code & ((int64_t{1} << f.m_bits) - 1);
  float value;
  if (field == e_mask) {
    value = mantissa == 0 ? INFINITY : NAN;
  } else if (field == 0) {
    value = static_cast<float>(mantissa) * pow2f(f.min_exponent() - f.m_bits);
  } else {
    value = static_cast<float>(mantissa + (int64_t{1} << f.m_bits)) *
            pow2f(static_cast<int>(field) - f.bias - f.m_bits);
  }
  return (code >> (f.e_bits + f.m_bits)) & 1 ? -value : value;
}

// The common case, normal in both float32 and the format: re-bias the exponent and round the
// float32 bits to nearest-even in integer arithmetic (no branch on the data but the range).
inline int64_t to_code(float x, const Format& f) {
  const uint32_t bits = std::bit_cast<uint32_t>(x), magnitude = bits & 0x7FFFFFFFu;
  const int shift = 23 - f.m_bits;
  const uint32_t low = static_cast<uint32_t>(std::max(f.min_exponent() + 127, 1)) << 23;
  const uint32_t high = static_cast<uint32_t>(f.max_exponent() + 128) << 23;
  if (magnitude < low || magnitude >= high || shift == 0) return to_code_general(x, f);
  const uint32_t rounded = magnitude + ((1u << (shift - 1)) - 1) + ((magnitude >> shift) & 1);
  int64_t code = static_cast<int64_t>(rounded >> shift) - f.rebias();
  if (code >= f.inf_code()) code = f.saturate ? f.inf_code() - 1 : f.inf_code();
  return code | (static_cast<int64_t>(bits >> 31) << (f.e_bits + f.m_bits));
}

inline float from_code(int64_t code, const Format& f) {
  const int64_t body = code & ((int64_t{1} << (f.e_bits + f.m_bits)) - 1);
  const int64_t field = body >> f.m_bits;
  if (field == 0 || field == (int64_t{1} << f.e_bits) - 1 || field - f.bias + 127 < 1)
    return from_code_general(code, f);
  const uint32_t sign = static_cast<uint32_t>(code >> (f.e_bits + f.m_bits)) << 31;
  return std::bit_cast<float>(sign | static_cast<uint32_t>((body + f.rebias()) << (23 - f.m_bits)));
}

// Codes of `width` bits, MSB first, packed back to back; element i starts at bit i * width.
// A code reads and writes only the bytes its bits lie in.
struct Bitstream {
  uint8_t* bytes;
  int width;
  struct Span {
    int64_t first;
    int count, shift;  // bytes covered; the code's shift within them read big-endian
  };
  Span span(int64_t i) const {
    const int64_t bit = i * width, last = (bit + width - 1) >> 3;
    const int count = static_cast<int>(last - (bit >> 3)) + 1;
    return {bit >> 3, count, 8 * count - static_cast<int>(bit & 7) - width};
  }
  uint32_t read(const Span& s) const {
    uint32_t v = 0;
    for (int k = 0; k < s.count; ++k) v = (v << 8) | bytes[s.first + k];
    return v;
  }
  int64_t get(int64_t i) const {
    const Span s = span(i);
    return (read(s) >> s.shift) & ((1u << width) - 1);
  }
  void set(int64_t i, int64_t code) const {
    const Span s = span(i);
    const uint32_t mask = ((1u << width) - 1) << s.shift;
    const uint32_t v = (read(s) & ~mask) | ((static_cast<uint32_t>(code) << s.shift) & mask);
    for (int k = 0; k < s.count; ++k)
      bytes[s.first + k] = static_cast<uint8_t>(v >> (8 * (s.count - 1 - k)));
  }
};

struct Counts {
  int64_t attempted = 0, lost = 0, flips = 0;
};

// `load(i)` / `store(i, m)` read and write the stored momentum (store returns the value kept).
template <typename Load, typename Store>
Counts update(float* w, const float* g, int64_t n, float gamma, float tau, Load load,
              Store store) {
  Counts counts;
  for (int64_t i = 0; i < n; ++i) {
    const float old = load(i);
    const float step = gamma * (g[i] - old);
    const float kept = store(i, old + step);
    const bool flip = w[i] * kept > tau;
    counts.attempted += step != 0.0f;
    counts.lost += step != 0.0f && kept == old;
    counts.flips += flip;
    w[i] = flip ? -w[i] : w[i];
  }
  return counts;
}

// One Bop step over a block: w and g float32 (w updated in place), storage from its first
// element. No format (e_bits == 0): storage is float32 momentum.
std::tuple<int64_t, int64_t, int64_t> bop_update(Tensor& w, const Tensor& g, Tensor& storage,
                                                 int64_t e_bits, int64_t m_bits, int64_t bias,
                                                 bool saturate, bool subnormals, double gamma,
                                                 double tau) {
  TORCH_CHECK(w.scalar_type() == torch::kFloat && g.scalar_type() == torch::kFloat &&
                  w.is_contiguous() && g.is_contiguous() && w.numel() == g.numel(),
              "bop_update: weights and gradient must be contiguous float32 of one size");
  TORCH_CHECK(storage.is_contiguous(), "bop_update: storage must be contiguous");
  const int64_t n = w.numel();
  float* wp = w.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float gamma_f = static_cast<float>(gamma), tau_f = static_cast<float>(tau);
  Counts c;
  if (e_bits == 0) {
    TORCH_CHECK(storage.scalar_type() == torch::kFloat && storage.numel() >= n,
                "bop_update: float32 momentum expected");
    float* m = storage.data_ptr<float>();
    c = update(wp, gp, n, gamma_f, tau_f, [m](int64_t i) { return m[i]; },
                   [m](int64_t i, float v) { return m[i] = v; });
  } else {
    const Format f{static_cast<int>(e_bits), static_cast<int>(m_bits), static_cast<int>(bias),
                   saturate, subnormals};
    auto round_into = [f](float v, auto put) {
      const int64_t code = to_code(v, f);
      put(code);
      return from_code(code, f);
    };
    if (f.bits() == 8 || f.bits() == 16) {
      const bool wide = f.bits() == 16;
      TORCH_CHECK(storage.scalar_type() == (wide ? torch::kShort : torch::kByte) &&
                      storage.numel() >= n,
                  "bop_update: storage does not match the format's container");
      auto* p8 = static_cast<uint8_t*>(storage.data_ptr());
      auto* p16 = static_cast<uint16_t*>(storage.data_ptr());
      c = update(
          wp, gp, n, gamma_f, tau_f,
          [=](int64_t i) { return from_code(wide ? p16[i] : p8[i], f); },
          [=](int64_t i, float v) {
            return round_into(v, [=](int64_t code) {
              wide ? void(p16[i] = static_cast<uint16_t>(code))
                   : void(p8[i] = static_cast<uint8_t>(code));
            });
          });
    } else {
      TORCH_CHECK(storage.scalar_type() == torch::kByte &&
                      storage.numel() * 8 >= n * static_cast<int64_t>(f.bits()),
                  "bop_update: bitstream storage too short");
      const Bitstream stream{storage.data_ptr<uint8_t>(), f.bits()};
      c = update(
          wp, gp, n, gamma_f, tau_f, [=](int64_t i) { return from_code(stream.get(i), f); },
          [=](int64_t i, float v) {
            return round_into(v, [&](int64_t code) { stream.set(i, code); });
          });
    }
  }
  return {c.attempted, c.lost, c.flips};
}

}  // namespace

void register_bop_kernels(pybind11::module& m) {
  m.def("bop_update", &bop_update,
        "one Bop step over a block: momentum decoded, updated, re-encoded in place; "
        "weights flipped; (attempted, lost, flips)");
}
