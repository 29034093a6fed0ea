// Helpers that let the compiler vectorize the CPU kernels' element loops.
//
// The loops are written once as inline templates and instantiated inside small non-template
// functions marked FFKERN_CLONES: on x86-64 Linux with GCC that attribute (target_clones) compiles
// one copy per instruction set and picks the best at load time, so a portable build (no -march)
// still uses AVX2 / AVX-512 where the CPU has them. Elsewhere it expands to nothing.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FFKERN_CLONES __attribute__((target_clones("default", "avx2", "arch=x86-64-v4")))
#else
#define FFKERN_CLONES
#endif

#if defined(__GNUC__)
#define FFKERN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FFKERN_ALWAYS_INLINE inline
#endif

namespace ffkern {
namespace simd {

// exp for float32 that the compiler can vectorize (std::exp is an opaque library call).
// x = k ln2 + r with k = round(x / ln2) and |r| <= ln2 / 2 (ln2 split in two parts so that r is
// exact to float precision); e^r by its Taylor polynomial to degree 7 (truncation < 6e-9
// relative, below float32 rounding); 2^k built in the exponent bits. Measured against the
// correctly rounded exp over [-87.2, 88] (8.4M points): at most 1 ulp off. Below -87.3 the result would be denormal: it returns 0 there (the absolute
// error is < 1.2e-38); above 88 it returns +inf; NaN stays NaN.
FFKERN_ALWAYS_INLINE float exp(float x) {
  constexpr float kLo = -87.3f, kHi = 88.0f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;         // ln 2 rounded to 12 significant bits
  constexpr float kLn2Lo = 1.428606765330187045e-06f;  // ln 2 - kLn2Hi
  constexpr float kRound = 12582912.0f;                // 1.5 * 2^23: adding it rounds to an integer
  float xc = x > kHi ? kHi : x;
  xc = xc < kLo ? kLo : xc;
  xc = (xc == xc) ? xc : 0.0f;  // keep NaN out of the integer conversion
  const float kf = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - kf * kLn2Hi) - kf * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;  // 2^k, k in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = x < kLo ? 0.0f : y;
  y = x > kHi ? std::numeric_limits<float>::infinity() : y;
  return (x == x) ? y : x;
}

// exp for arguments known to be <= 0 up to rounding (l - max, l - L in the SupCon loops): the same
// polynomial without the overflow clamp and its select (x < 88 is all that is needed).
FFKERN_ALWAYS_INLINE float exp_nonpositive(float x) {
  constexpr float kLo = -87.3f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.428606765330187045e-06f;
  constexpr float kRound = 12582912.0f;
  float xc = x < kLo ? kLo : x;
  xc = (xc == xc) ? xc : 0.0f;  // keep NaN out of the integer conversion
  const float kf = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - kf * kLn2Hi) - kf * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = x < kLo ? 0.0f : p * scale;
  return (x == x) ? y : x;
}

// float64 keeps the library exp (exact to the last ulp; used by gradcheck).
FFKERN_ALWAYS_INLINE double exp(double x) { return std::exp(x); }
FFKERN_ALWAYS_INLINE double exp_nonpositive(double x) { return std::exp(x); }

// float32 -> bfloat16 bits, rounded to nearest even (as c10::BFloat16 rounds); NaN stays a quiet
// NaN. Integer ops only, so that a conversion loop vectorizes.
FFKERN_ALWAYS_INLINE uint16_t to_bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
  return (x != x) ? static_cast<uint16_t>((u >> 16) | 0x40u) : static_cast<uint16_t>(rounded >> 16);
}


}  // namespace simd
}  // namespace ffkern
