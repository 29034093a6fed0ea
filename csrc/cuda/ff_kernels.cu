// CUDA kernels of the FF goodness losses (SPEC 2). Plain CUDA: no torch headers.
//
// One CTA per sample. Threads stride over the features d; each computes the token mean m_d of its
// features (reading h[b, t, d] for consecutive d: coalesced, 16 bytes per thread and access when
// the rows are 16-byte aligned, one multiply by 1/T' per feature), and a deterministic block sum gives
// the energies E0, E1 of ff_math.h. Forward reads the activations once; the per-sample loss terms
// are summed by a second one-CTA kernel in a fixed order (bitwise reproducible, no atomics).
// The forwards can write the token means [B, D] (acc type) for the backward: with them the
// backward reads B*D values instead of h (dh of every kept token of a sample is the same function
// of its mean) and writes dL/dh. Without them (a mean that is one row of h, or a caller that has
// none) it reads h once more, the token means going through a small scratch buffer [B, D] written
// and read back by the same thread. SFFA's activity term (SPEC 2) adds one sum per
// sample to the forward's pass (the sum of the token mean's entries) and, in the backward, the
// factor A on the pair gradient and a constant per kept element (sffa_activity_shift), in the
// pass that writes dh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../ff_math.h"
#include "device_utils.cuh"
#include "ffkern_cuda.h"

namespace ffkern {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ typename AccOf<T>::type load_acc(const T* p) {
  return to_acc<typename AccOf<T>::type>(*p);
}

template <typename T>
__device__ __forceinline__ T acc_to(typename AccOf<T>::type v) {
  return from_acc<T>(v);
}
template <>
__device__ __forceinline__ double acc_to<double>(double v) {
  return v;
}

// 16 bytes of consecutive features: one LDG.128 / STG.128 instead of 2..8 scalar accesses (these
// kernels are bound by memory traffic, and scalar 2-byte accesses also bound them by issue).
template <typename T>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

// Token mean of sample h [tokens, dim] (tokens skip..) into m (may be null); energies to all threads,
// and with sum non-null the sum of the mean's entries (SFFA's activity term) to all threads too.
// vec: dim % Pack<T>::kN == 0 and h 16-byte aligned (then every row of every sample is).
template <typename T, typename Acc>
__device__ __forceinline__ void sample_energies(const T* __restrict__ h, int64_t tokens, int64_t dim, int64_t skip,
                                                bool vec, Acc inv_count, Acc* __restrict__ m, Acc* shared, Acc* e0,
                                                Acc* e1, Acc* sum = nullptr) {
  const int64_t half = dim / 2;
  Acc s0 = 0, s1 = 0, plain = 0;
  if (vec) {
    constexpr int kN = Pack<T>::kN;
    for (int64_t d0 = static_cast<int64_t>(threadIdx.x) * kN; d0 < dim; d0 += kThreads * kN) {
      Acc acc[kN];
#pragma unroll
      for (int i = 0; i < kN; ++i) acc[i] = 0;
      const T* p = h + skip * dim + d0;
#pragma unroll 2
      for (int64_t t = skip; t < tokens; ++t, p += dim) {
        const Pack<T> x = *reinterpret_cast<const Pack<T>*>(p);
#pragma unroll
        for (int i = 0; i < kN; ++i) acc[i] += to_acc<Acc>(x.v[i]);
      }
#pragma unroll
      for (int i = 0; i < kN; ++i) {
        const Acc md = acc[i] * inv_count;
        if (m != nullptr) m[d0 + i] = md;
        const bool first = d0 + i < half;  // SFFA's positive half P
        s0 += first ? md * md : Acc(0);
        s1 += first ? Acc(0) : md * md;
        plain += md;
      }
    }
  } else {
    for (int64_t d = threadIdx.x; d < dim; d += kThreads) {
      Acc acc = 0;
      const T* p = h + skip * dim + d;
#pragma unroll 2
      for (int64_t t = skip; t < tokens; ++t, p += dim) acc += load_acc(p);
      const Acc md = acc * inv_count;
      if (m != nullptr) m[d] = md;
      const bool first = d < half;  // SFFA's positive half P
      s0 += first ? md * md : Acc(0);
      s1 += first ? Acc(0) : md * md;
      plain += md;
    }
  }
  *e0 = block_sum(s0, shared);
  *e1 = block_sum(s1, shared);
  if (sum != nullptr) *sum = block_sum(plain, shared);  // unused (and removed) without the term
}

// c m, or c m + k (one FMA) with SFFA's activity term.
template <typename Acc>
__device__ __forceinline__ Acc grad_value(Acc c, Acc m, bool shifted, Acc k) {
  return shifted ? fma(c, m, k) : c * m;
}

// dh[t, d] = dE_half(d) * 2 m_d / T' (+ shift when shifted) for t >= skip, 0 before (m written by
// this thread, with the same vec as sample_energies, so each thread reads back only what it wrote).
template <typename T, typename Acc>
__device__ __forceinline__ void write_grad(T* __restrict__ dh, const Acc* __restrict__ m, int64_t tokens,
                                           int64_t dim, int64_t skip, bool vec, Acc inv_count, Acc d0, Acc d1,
                                           bool shifted = false, Acc shift = Acc(0)) {
  const int64_t half = dim / 2;
  const Acc c0 = Acc(2) * d0 * inv_count, c1 = Acc(2) * d1 * inv_count;
  if (vec) {
    constexpr int kN = Pack<T>::kN;
    for (int64_t f0 = static_cast<int64_t>(threadIdx.x) * kN; f0 < dim; f0 += kThreads * kN) {
      Pack<T> g, zero;
#pragma unroll
      for (int i = 0; i < kN; ++i) {
        g.v[i] = acc_to<T>(grad_value(f0 + i < half ? c0 : c1, m[f0 + i], shifted, shift));
        zero.v[i] = acc_to<T>(Acc(0));
      }
      T* p = dh + f0;
      for (int64_t t = 0; t < skip; ++t, p += dim) *reinterpret_cast<Pack<T>*>(p) = zero;
#pragma unroll 2
      for (int64_t t = skip; t < tokens; ++t, p += dim) *reinterpret_cast<Pack<T>*>(p) = g;
    }
  } else {
    for (int64_t d = threadIdx.x; d < dim; d += kThreads) {
      const T g = acc_to<T>(grad_value(d < half ? c0 : c1, m[d], shifted, shift));
      T* p = dh + d;
      for (int64_t t = 0; t < skip; ++t, p += dim) *p = acc_to<T>(Acc(0));
#pragma unroll 2
      for (int64_t t = skip; t < tokens; ++t, p += dim) *p = g;
    }
  }
}

// means (may be null): the token means [B, D] for the backward.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    goodness_kernel(const T* __restrict__ h, int64_t tokens, int64_t dim, int64_t skip, typename AccOf<T>::type inv_count,
                    typename AccOf<T>::type gscale, bool vec, typename AccOf<T>::type* __restrict__ out,
                    typename AccOf<T>::type* __restrict__ means) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc shared[32];
  const int64_t b = blockIdx.x;
  Acc e0, e1;
  sample_energies<T, Acc>(h + b * tokens * dim, tokens, dim, skip, vec, inv_count,
                          means != nullptr ? means + b * dim : nullptr, shared, &e0, &e1);
  if (threadIdx.x == 0) out[b] = (e0 + e1) * gscale;
}

// kSaved: dh from the forward's token means saved [B, D]; else from h.
template <typename T, bool kSaved>
__global__ void __launch_bounds__(kThreads)
    goodness_backward_kernel(const typename AccOf<T>::type* __restrict__ grad, const T* __restrict__ h,
                             const typename AccOf<T>::type* __restrict__ saved, int64_t tokens, int64_t dim,
                             int64_t skip, typename AccOf<T>::type inv_count, typename AccOf<T>::type gscale, bool vec,
                             bool vec_saved, T* __restrict__ dh, typename AccOf<T>::type* __restrict__ scratch) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc shared[32];
  const int64_t b = blockIdx.x;
  Acc e0, e1;
  const Acc* m;
  if constexpr (kSaved) {  // the forward's token means (vec_saved: 16-byte packs of Acc apply); h unread
    m = saved + b * dim;
    sample_energies<Acc, Acc>(m, 1, dim, 0, vec_saved, Acc(1), nullptr, shared, &e0, &e1);
  } else {  // from h, the mean through the scratch row (written and read back in vec's layout)
    Acc* row = scratch + b * dim;
    sample_energies<T, Acc>(h + b * tokens * dim, tokens, dim, skip, vec, inv_count, row, shared, &e0, &e1);
    m = row;
  }
  const Acc de = grad[b] * gscale;  // dL/dE, both halves
  write_grad<T, Acc>(dh + b * tokens * dim, m, tokens, dim, skip, vec, inv_count, de, de);
}

// terms[b] = sample b's loss term; with the activity term also terms[B + b], terms[2B + b] = the sums
// of the token means of h+ and h- (the two instantiations keep the plain kernel as it was).
template <typename T, bool kActivity>
__global__ void __launch_bounds__(kThreads)
    pair_terms_kernel(const T* __restrict__ hp, const T* __restrict__ hn, int64_t batch, int64_t tokens, int64_t dim,
                      int64_t skip, int loss, typename AccOf<T>::type param, typename AccOf<T>::type inv_count,
                      typename AccOf<T>::type gscale, bool vec, typename AccOf<T>::type* __restrict__ terms,
                      typename AccOf<T>::type* __restrict__ means_p, typename AccOf<T>::type* __restrict__ means_n) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc shared[32];
  const int64_t b = blockIdx.x, off = b * tokens * dim;
  Acc e0p, e1p, e0n, e1n, sp, sn;
  // means_p, means_n (may be null): the token means [B, D] for the backward
  sample_energies<T, Acc>(hp + off, tokens, dim, skip, vec, inv_count, means_p != nullptr ? means_p + b * dim : nullptr,
                          shared, &e0p, &e1p, kActivity ? &sp : nullptr);
  sample_energies<T, Acc>(hn + off, tokens, dim, skip, vec, inv_count, means_n != nullptr ? means_n + b * dim : nullptr,
                          shared, &e0n, &e1n, kActivity ? &sn : nullptr);
  if (threadIdx.x == 0) {
    terms[b] = pair_term<Acc>(loss, param, gscale, e0p, e1p, e0n, e1n);
    if (kActivity) {
      terms[batch + b] = sp;
      terms[2 * batch + b] = sn;
    }
  }
}

// out[0] = normalizer * sum_b terms[b] = L_S: one CTA, each thread a fixed strided subset, then
// block_sum. With activity non-null: mu+ + mu- = (sum of terms[B..3B)) * inv_entries (1 / (B D): the
// token means' sums over B samples of D entries), A = sffa_activity, out[0] = L_S A and
// activity = (L_S, A) for the backward.
template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    sum_terms_kernel(const Acc* __restrict__ terms, int64_t batch, Acc normalizer, Acc inv_entries,
                     Acc* __restrict__ out, Acc* __restrict__ activity) {
  __shared__ Acc shared[32];
  Acc acc = 0;
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) acc += terms[b];
  const Acc loss_s = block_sum(acc, shared) * normalizer;
  if (activity == nullptr) {
    if (threadIdx.x == 0) out[0] = loss_s;
    return;
  }
  Acc sp = 0, sn = 0;
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) {
    sp += terms[batch + b];
    sn += terms[2 * batch + b];
  }
  const Acc mu = (block_sum(sp, shared) + block_sum(sn, shared)) * inv_entries;
  if (threadIdx.x == 0) {
    const Acc a = sffa_activity<Acc>(mu);
    out[0] = loss_s * a;
    activity[0] = loss_s;
    activity[1] = a;
  }
}

// kSaved: from the forward's token means saved_p, saved_n [B, D] (vec_saved: 16-byte packs of Acc
// apply to them; h unread); else from h, the means through the scratch rows (as goodness_backward).
template <typename T, bool kSaved>
__global__ void __launch_bounds__(kThreads)
    pair_backward_kernel(const typename AccOf<T>::type* __restrict__ grad, const T* __restrict__ hp,
                         const T* __restrict__ hn, const typename AccOf<T>::type* __restrict__ saved_p,
                         const typename AccOf<T>::type* __restrict__ saved_n, int64_t batch, int64_t tokens, int64_t dim,
                         int64_t skip, int loss, typename AccOf<T>::type param, typename AccOf<T>::type inv_count,
                         typename AccOf<T>::type gscale, typename AccOf<T>::type normalizer, bool vec, bool vec_saved,
                         const typename AccOf<T>::type* __restrict__ activity, typename AccOf<T>::type inv_kept,
                         T* __restrict__ dhp, T* __restrict__ dhn, typename AccOf<T>::type* __restrict__ scratch) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc shared[32];
  const int64_t b = blockIdx.x, off = b * tokens * dim;
  Acc e0p, e1p, e0n, e1n;
  const Acc *mp, *mn;
  if constexpr (kSaved) {
    mp = saved_p + b * dim;
    mn = saved_n + b * dim;
    sample_energies<Acc, Acc>(mp, 1, dim, 0, vec_saved, Acc(1), nullptr, shared, &e0p, &e1p);
    sample_energies<Acc, Acc>(mn, 1, dim, 0, vec_saved, Acc(1), nullptr, shared, &e0n, &e1n);
  } else {
    Acc* sp = scratch + b * dim;
    Acc* sn = scratch + (batch + b) * dim;
    sample_energies<T, Acc>(hp + off, tokens, dim, skip, vec, inv_count, sp, shared, &e0p, &e1p);
    sample_energies<T, Acc>(hn + off, tokens, dim, skip, vec, inv_count, sn, shared, &e0n, &e1n);
    mp = sp;
    mn = sn;
  }
  // with SFFA's activity term (activity = (L_S, A)): dL/dh = A dL_S/dh + a constant per kept element
  const bool shifted = activity != nullptr;
  const Acc a = shifted ? activity[1] : Acc(1);
  const Acc shift = shifted ? sffa_activity_shift<Acc>(grad[0], activity[0], a, inv_kept) : Acc(0);
  const Acc scale = grad[0] * normalizer * a;
  Acc dp[2], dn[2];
  pair_grad<Acc>(loss, param, gscale, e0p, e1p, e0n, e1n, scale, dp, dn);
  write_grad<T, Acc>(dhp + off, mp, tokens, dim, skip, vec, inv_count, dp[0], dp[1], shifted, shift);
  write_grad<T, Acc>(dhn + off, mn, tokens, dim, skip, vec, inv_count, dn[0], dn[1], shifted, shift);
}

// Dispatch on the input dtype; f is called with a null pointer of the element type.
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(static_cast<float*>(nullptr));
    case DType::kFloat64:
      return f(static_cast<double*>(nullptr));
    case DType::kFloat16:
      return f(static_cast<__half*>(nullptr));
    case DType::kBFloat16:
      return f(static_cast<__nv_bfloat16*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

// Per-sample constants, divided once on the host: an IEEE divide in a kernel brings a slow-path
// call, and the registers saved around it spill.
template <typename Acc>
Acc inv_tokens(int64_t tokens, int64_t skip) {
  return Acc(1) / static_cast<Acc>(tokens - skip);
}
template <typename Acc>
Acc dim_scale(bool mean, int64_t dim) {
  return mean ? Acc(1) / static_cast<Acc>(dim) : Acc(1);
}

// Whether the 16-byte path applies: whole vectors per row, every pointer 16-byte aligned.
template <typename T>
bool vec_ok(int64_t dim, std::initializer_list<const void*> ptrs) {
  if (dim % Pack<T>::kN != 0) return false;
  for (const void* p : ptrs)
    if ((reinterpret_cast<uintptr_t>(p) & 15u) != 0) return false;
  return true;
}

}  // namespace

cudaError_t goodness(DType dtype, const void* h, int64_t batch, int64_t tokens, int64_t dim, int64_t skip,
                     bool mean, void* out, void* means, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename AccOf<T>::type;
    goodness_kernel<T><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
        static_cast<const T*>(h), tokens, dim, skip, inv_tokens<Acc>(tokens, skip), dim_scale<Acc>(mean, dim),
        vec_ok<T>(dim, {h}), static_cast<Acc*>(out), static_cast<Acc*>(means));
    return launch_status();
  });
}

cudaError_t goodness_backward(DType dtype, const void* grad, const void* h, const void* means, int64_t batch,
                              int64_t tokens, int64_t dim, int64_t skip, bool mean, void* dh, void* scratch,
                              cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename AccOf<T>::type;
    const bool saved = means != nullptr;
    const auto kernel = saved ? goodness_backward_kernel<T, true> : goodness_backward_kernel<T, false>;
    kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
        static_cast<const Acc*>(grad), static_cast<const T*>(h), static_cast<const Acc*>(means), tokens, dim, skip,
        inv_tokens<Acc>(tokens, skip), dim_scale<Acc>(mean, dim), saved ? vec_ok<T>(dim, {dh}) : vec_ok<T>(dim, {h, dh}),
        saved && vec_ok<Acc>(dim, {means}), static_cast<T*>(dh), static_cast<Acc*>(scratch));
    return launch_status();
  });
}

cudaError_t pair_loss(DType dtype, const void* h_pos, const void* h_neg, int64_t batch, int64_t tokens,
                      int64_t dim, int64_t skip, int loss, double param, bool mean, void* out, void* activity,
                      void* means_pos, void* means_neg, void* scratch, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename AccOf<T>::type;
    const auto kernel = activity != nullptr ? pair_terms_kernel<T, true> : pair_terms_kernel<T, false>;
    kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
        static_cast<const T*>(h_pos), static_cast<const T*>(h_neg), batch, tokens, dim, skip, loss,
        static_cast<Acc>(param), inv_tokens<Acc>(tokens, skip), dim_scale<Acc>(mean, dim),
        vec_ok<T>(dim, {h_pos, h_neg}), static_cast<Acc*>(scratch), static_cast<Acc*>(means_pos),
        static_cast<Acc*>(means_neg));
    cudaError_t err = launch_status();
    if (err != cudaSuccess) return err;
    const Acc inv_entries = Acc(1.0 / (static_cast<double>(batch) * static_cast<double>(dim)));
    sum_terms_kernel<Acc><<<1, kThreads, 0, stream>>>(static_cast<const Acc*>(scratch), batch,
                                                     pair_normalizer<Acc>(loss, batch), inv_entries,
                                                     static_cast<Acc*>(out), static_cast<Acc*>(activity));
    return launch_status();
  });
}

cudaError_t pair_loss_backward(DType dtype, const void* grad, const void* h_pos, const void* h_neg, int64_t batch,
                               int64_t tokens, int64_t dim, int64_t skip, int loss, double param, bool mean,
                               const void* activity, const void* means_pos, const void* means_neg, void* dh_pos,
                               void* dh_neg, void* scratch, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename AccOf<T>::type;
    const Acc inv_kept = Acc(1.0 / (static_cast<double>(batch) * static_cast<double>(tokens - skip) *
                                    static_cast<double>(dim)));
    const bool saved = means_pos != nullptr && means_neg != nullptr;  // the binding passes both or neither
    const auto kernel = saved ? pair_backward_kernel<T, true> : pair_backward_kernel<T, false>;
    kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
        static_cast<const Acc*>(grad), static_cast<const T*>(h_pos), static_cast<const T*>(h_neg),
        static_cast<const Acc*>(means_pos), static_cast<const Acc*>(means_neg), batch, tokens, dim, skip, loss,
        static_cast<Acc>(param), inv_tokens<Acc>(tokens, skip), dim_scale<Acc>(mean, dim),
        pair_normalizer<Acc>(loss, batch),
        saved ? vec_ok<T>(dim, {dh_pos, dh_neg}) : vec_ok<T>(dim, {h_pos, h_neg, dh_pos, dh_neg}),
        saved && vec_ok<Acc>(dim, {means_pos, means_neg}), static_cast<const Acc*>(activity), inv_kept,
        static_cast<T*>(dh_pos), static_cast<T*>(dh_neg), static_cast<Acc*>(scratch));
    return launch_status();
  });
}

}  // namespace cuda
}  // namespace ffkern
