// Element loops of the CPU SupCon kernels (supcon_cpu.cpp), kept free of torch headers so that
// their vectorization can be inspected on their own (g++ -O3 -fopenmp -fopt-info-vec).
#pragma once

#include <cstdint>
#include <limits>

#include "simd.h"

namespace ffkern {
namespace cpu {

constexpr int64_t kColBlock = 1024;  // columns of a similarity tile

template <typename T>
struct RowStats {
  T max = -std::numeric_limits<T>::infinity();  // running max of the logits l_ij seen so far
  T sum = 0;                                    // sum of exp(l_ij - max) seen so far
  T pos_sum = 0;                                // sum of l_ij over positives
  int64_t npos = 0, nclip = 0;
};

// ---- element loops (vectorized: see simd.h) ----------------------------------------------------

// Pass 1 over columns [j0, j1) of one anchor's tile row: s_ij -> l_ij in place,
//   t_ij = min(s_ij + m, 1) on positives, s_ij otherwise;  l_ij = t_ij / tau, as t_ij * (1 / tau):
// a vector division costs about as much as the exp (measured: 0.2 of 0.7 ns per element), the
// product differs from the quotient by at most an ulp.
template <typename T>
FFKERN_ALWAYS_INLINE void logits_range(T* l, const int32_t* y, int64_t j0, int64_t j1, int32_t yi, T margin,
                                       T inv_tau, T& tile_max, T& pos_sum, int64_t& npos, int64_t& nclip) {
  // Branch-free body (selects, '&' instead of '&&', 32-bit labels and counters next to 32-bit
  // floats) so that it vectorizes.
  T mx = tile_max, ps = 0;
  int32_t np = 0, nc = 0;  // a range has at most kColBlock columns
#pragma omp simd reduction(max : mx) reduction(+ : ps, np, nc)
  for (int64_t j = j0; j < j1; ++j) {
    const T s = l[j];
    const bool pos = y[j] == yi;
    const T sm = s + margin;
    const T t = pos ? (T(1) < sm ? T(1) : sm) : s;  // torch.clamp(s + m, max=1) on positives
    const T v = t * inv_tau;
    l[j] = v;
    mx = v > mx ? v : mx;
    ps += pos ? v : T(0);
    np += pos ? 1 : 0;
    nc += (pos & (sm >= T(1))) ? 1 : 0;  // SPEC 1.4 counts s + m >= 1 as clipped
  }
  tile_max = mx;
  pos_sum += ps;
  npos += np;
  nclip += nc;
}

// Pass 2: sum_j exp(l_ij - shift) over a whole tile row (the self column holds -inf -> 0).
template <typename T>
FFKERN_ALWAYS_INLINE T sum_exp(const T* l, int64_t cols, T shift) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < cols; ++j) acc += simd::exp_nonpositive(l[j] - shift);
  return acc;
}

// Backward over columns [j0, j1): s_kj -> G_kj + G_jk in place (SPEC 1.3),
//   G_kj + G_jk = kappa_kj (a_k p_kj + a_j p_jk - (b_k + b_j) M_kj),
//   p_kj = exp(l_kj - lse_k), p_jk = exp(l_kj - lse_j) (l is symmetric),
//   kappa_kj = 0 for a clipped positive (s + m > 1 strictly: at equality torch.clamp passes).
template <typename T>
FFKERN_ALWAYS_INLINE void pair_term_range(T* l, const int32_t* y, const T* lse_c, const T* a_c, const T* b_c,
                                          int64_t j0, int64_t j1, int32_t yk, T lse_k, T a_k, T b_k, T margin,
                                          T inv_tau) {
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    const T s = l[j];
    const bool pos = y[j] == yk;
    const T sm = s + margin;
    const T t = pos ? (T(1) < sm ? T(1) : sm) : s;
    const T v = t * inv_tau;
    const T g = a_k * simd::exp(v - lse_k) + a_c[j] * simd::exp(v - lse_c[j]) - (pos ? b_k + b_c[j] : T(0));
    l[j] = (pos & (sm > T(1))) ? T(0) : g;
  }
}

// The same pair term with one exp per pair instead of two, for a tile whose lse values (rows and
// columns) lie within kOneExpSpread of their maximum L:
//   a_k p_kj + a_j p_jk = exp(l_kj - L) (alpha_k + alpha_j),  alpha_i = a_i exp(L - lse_i),
// precomputed per tile (rows + columns exps instead of rows x columns). exp(l - L) <= 1 since
// l_kj <= lse_k <= L; it reaches fp32's subnormal range only where p < e^(-87 + spread), a term
// far below rounding of the others; alpha_i <= a_i e^spread cannot overflow.
template <typename T>
FFKERN_ALWAYS_INLINE void pair_term_one_exp_range(T* l, const int32_t* y, const T* alpha_c, const T* b_c, int64_t j0,
                                                  int64_t j1, int32_t yk, T alpha_k, T b_k, T lse_max, T margin,
                                                  T inv_tau) {
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    const T s = l[j];
    const bool pos = y[j] == yk;
    const T sm = s + margin;
    const T t = pos ? (T(1) < sm ? T(1) : sm) : s;
    const T v = t * inv_tau;
    const T g = simd::exp_nonpositive(v - lse_max) * (alpha_k + alpha_c[j]) - (pos ? b_k + b_c[j] : T(0));
    l[j] = (pos & (sm > T(1))) ? T(0) : g;
  }
}

// Largest spread max(lse) - min(lse) over a tile for which the one-exp form is used (see above).
constexpr double kOneExpSpread = 40.0;

// Non-template entry points, one per type, each compiled once per instruction set (FFKERN_CLONES).
// static: the header is meant for one translation unit (supcon_cpu.cpp) and a vectorization probe.
#define FFKERN_DEFINE_LOOPS(T)                                                                            \
  static FFKERN_CLONES void logits_loop(T* l, const int32_t* y, int64_t j0, int64_t j1, int32_t yi,       \
                                        T margin, T inv_tau, T* tile_max, T* pos_sum, int64_t* npos,      \
                                        int64_t* nclip) {                                                 \
    logits_range<T>(l, y, j0, j1, yi, margin, inv_tau, *tile_max, *pos_sum, *npos, *nclip);               \
  }                                                                                                       \
  static FFKERN_CLONES T sum_exp_loop(const T* l, int64_t cols, T shift) {                                \
    return sum_exp<T>(l, cols, shift);                                                                    \
  }                                                                                                       \
  static FFKERN_CLONES void pair_term_loop(T* l, const int32_t* y, const T* lse_c, const T* a_c,          \
                                           const T* b_c, int64_t j0, int64_t j1, int32_t yk, T lse_k,     \
                                           T a_k, T b_k, T margin, T inv_tau) {                           \
    pair_term_range<T>(l, y, lse_c, a_c, b_c, j0, j1, yk, lse_k, a_k, b_k, margin, inv_tau);             \
  }                                                                                                       \
  static FFKERN_CLONES void pair_term_one_exp_loop(T* l, const int32_t* y, const T* alpha_c, const T* b_c,   \
                                                   int64_t j0, int64_t j1, int32_t yk, T alpha_k, T b_k,  \
                                                   T lse_max, T margin, T inv_tau) {                      \
    pair_term_one_exp_range<T>(l, y, alpha_c, b_c, j0, j1, yk, alpha_k, b_k, lse_max, margin, inv_tau);  \
  }
FFKERN_DEFINE_LOOPS(float)
FFKERN_DEFINE_LOOPS(double)
#undef FFKERN_DEFINE_LOOPS

}  // namespace cpu
}  // namespace ffkern
