// Per-sample math of the FF goodness losses (SPEC 2), shared by the CPU kernels and the CUDA
// kernels. Plain C++ (no torch headers), so that nvcc compiles it inside csrc/cuda/*.cu.
//
// A sample's activations reduce to its token-mean m [D] (tokens skip_tokens..T-1) and the two
// energies E0 = sum_{d < D/2} m_d^2, E1 = sum_{d >= D/2} m_d^2. Then
//   goodness g = (E0 + E1) * gscale,  gscale = 1/D ("mean") or 1 ("sum"),
//   SFFA q = E0 / (E0 + E1)  (both halves have D/2 units, so the ratio of means is that of sums),
// and every loss is a mean of per-sample terms. Backward: dL/dh[t, d] = dL/dE_half(d) * 2 m_d / T'
// for t >= skip_tokens (T' = T - skip_tokens tokens share the mean), 0 for the skipped tokens.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FFKERN_HD __host__ __device__ inline
#else
#define FFKERN_HD inline
#endif

namespace ffkern {

enum PairLossKind : int { kLossFF = 0, kLossSymBa = 1, kLossSFFA = 2 };

// SFFA clamps q to [eps, 1 - eps] (ffkern.reference.SFFA_EPS).
constexpr double kSffaEps = 1e-4;

// SFFA's activity factor (SPEC 2, ffkern.reference.SFFA_ACTIVITY_RATE): L = L_S * A with
// A = 1 + exp(-rate (mu+ + mu-)), mu the mean of every entry that enters the loss.
constexpr double kSffaActivityRate = 10.0;

template <typename T>
FFKERN_HD T sffa_activity(T mu_sum) {
  return T(1) + std::exp(-T(kSffaActivityRate) * mu_sum);
}

// What the factor adds to dL/dh of every kept element: grad * L_S * dA/dh, where
// dA/dh = dA/dmu / count = -rate (A - 1) / count (the same for h+ and h-, whose counts are equal;
// inv_count = 1 / (B T' D)). The rest of dL/dh is A dL_S/dh: the pair gradient with its scale times A.
template <typename T>
FFKERN_HD T sffa_activity_shift(T grad, T loss_s, T a, T inv_count) {
  return grad * loss_s * (-T(kSffaActivityRate) * (a - T(1))) * inv_count;
}

// log(1 + e^x) without overflow: max(x, 0) + log1p(e^-|x|).
template <typename T>
FFKERN_HD T softplus(T x) {
  return (x > T(0) ? x : T(0)) + std::log1p(std::exp(-std::fabs(x)));
}

// d softplus(x) / dx = 1 / (1 + e^-x); e^-x = inf for very negative x gives 0, as it should.
template <typename T>
FFKERN_HD T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// An all-zero sample (E0 + E1 = 0, e.g. every unit behind a ReLU is off) has no share to speak
// of: q = 1/2 there, as ffkern.reference.sffa_q defines it, instead of 0/0. A NaN or inf
// activation gives q = NaN (inf / inf): the loss is NaN, never a finite "dead" sample.
template <typename T>
FFKERN_HD T sffa_q_clamped(T e0, T e1) {
  const T s = e0 + e1;
  T q = s != T(0) ? e0 / s : T(0.5);
  const T lo = T(kSffaEps), hi = T(1) - T(kSffaEps);
  q = (q < lo) ? lo : q;  // NaN input stays NaN, as torch.clamp leaves it
  return (q > hi) ? hi : q;
}

// Weight of one per-sample term in the loss mean: FF and SFFA average 2B values, SymBa B.
template <typename T>
FFKERN_HD T pair_normalizer(int loss, long long batch) {
  return loss == kLossSymBa ? T(1) / T(batch) : T(1) / T(2 * batch);
}

// Per-sample term (before the mean) from the energies of h_pos[b] and h_neg[b].
template <typename T>
FFKERN_HD T pair_term(int loss, T param, T gscale, T e0p, T e1p, T e0n, T e1n) {
  if (loss == kLossSFFA) {
    return -(std::log(sffa_q_clamped(e0p, e1p)) + std::log(T(1) - sffa_q_clamped(e0n, e1n)));
  }
  const T gp = (e0p + e1p) * gscale, gn = (e0n + e1n) * gscale;
  if (loss == kLossFF) return softplus(param - gp) + softplus(gn - param);  // param = threshold
  return softplus(-param * (gp - gn));                                      // SymBa, param = alpha
}

// dq/dE of SFFA's clamped q for one sample, times dL/dq; zero where the clamp is active
// (torch.clamp passes the gradient only for lo <= q <= hi).
template <typename T>
FFKERN_HD void sffa_q_grad(T e0, T e1, T dl_dq, T* d0, T* d1) {
  const T s = e0 + e1, q = e0 / s;
  // no gradient where the clamp is active, nor at an all-zero sample (q = 1/2 is a constant there)
  const bool inside = s != T(0) && q >= T(kSffaEps) && q <= T(1) - T(kSffaEps);
  const T c = inside ? dl_dq / (s * s) : T(0);
  *d0 = c * e1;   // dq/dE0 = E1 / (E0 + E1)^2
  *d1 = -c * e0;  // dq/dE1 = -E0 / (E0 + E1)^2
}

// dL/dE0, dL/dE1 of sample b for h_pos (dp) and h_neg (dn); scale = incoming grad * normalizer.
template <typename T>
FFKERN_HD void pair_grad(int loss, T param, T gscale, T e0p, T e1p, T e0n, T e1n, T scale, T* dp, T* dn) {
  if (loss == kLossSFFA) {
    const T qp = sffa_q_clamped(e0p, e1p), qn = sffa_q_clamped(e0n, e1n);
    sffa_q_grad(e0p, e1p, -scale / qp, &dp[0], &dp[1]);          // d(-log q)/dq = -1/q
    sffa_q_grad(e0n, e1n, scale / (T(1) - qn), &dn[0], &dn[1]);  // d(-log(1-q))/dq = 1/(1-q)
    return;
  }
  const T gp = (e0p + e1p) * gscale, gn = (e0n + e1n) * gscale;
  T dgp, dgn;
  if (loss == kLossFF) {
    dgp = -sigmoid(param - gp);
    dgn = sigmoid(gn - param);
  } else {
    const T sg = param * sigmoid(-param * (gp - gn));
    dgp = -sg;
    dgn = sg;
  }
  dp[0] = dp[1] = scale * dgp * gscale;  // dg/dE = gscale for both halves
  dn[0] = dn[1] = scale * dgn * gscale;
}

}  // namespace ffkern
