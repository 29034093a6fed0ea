// CUDA kernels of the FF goodness losses (SPEC 2). Plain CUDA: no torch headers.
//
// One CTA per sample. Threads stride over the features d; each computes the token mean m_d of its
// features (reading h[b, t, d] for consecutive d: coalesced, 16 bytes per thread and access when
// the rows are 16-byte aligned, one multiply by 1/T' per feature), and a deterministic block sum gives
// the energies E0, E1 of ff_math.h. Forward reads the activations once; the per-sample loss terms
// are summed by a second one-CTA kernel in a fixed order (bitwise reproducible, no atomics).
// Backward reads them once and writes dL/dh; the token means go through a small scratch buffer
// [B, D] written and read back by the same thread.
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

// Token mean of sample h [tokens, dim] (tokens skip..) into m (may be null); energies to all threads.
// vec: dim % Pack<T>::kN == 0 and h 16-byte aligned (then every row of every sample is).
template <typename T, typename Acc>
__device__ __forceinline__ void sample_energies(const T* __restrict__ h, int64_t tokens, int64_t dim, int64_t skip,
                                                bool vec, Acc inv_count, Acc* __restrict__ m, Acc* shared, Acc* e0,
                                                Acc* e1) {
  const int64_t half = dim / 2;
  Acc s0 = 0, s1 = 0;
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
    }
  }
  *e0 = block_sum(s0, shared);
  *e1 = block_sum(s1, shared);
}

// dh[t, d] = dE_half(d) * 2 m_d / T' for t >= skip, 0 before (m written by this thread, with the
// same vec as sample_energies, so each thread reads back only what it wrote).
template <typename T, typename Acc>
__device__ __forceinline__ void write_grad(T* __restrict__ dh, const Acc* __restrict__ m, int64_t tokens,
                                           int64_t dim, int64_t skip, bool vec, Acc inv_count, Acc d0, Acc d1) {
  const int64_t half = dim / 2;
  const Acc c0 = Acc(2) * d0 * inv_count, c1 = Acc(2) * d1 * inv_count;
  if (vec) {
    constexpr int kN = Pack<T>::kN;
    for (int64_t f0 = static_cast<int64_t>(threadIdx.x) * kN; f0 < dim; f0 += kThreads * kN) {
      Pack<T> g, zero;
#pragma unroll
      for (int i = 0; i < kN; ++i) {
        g.v[i] = acc_to<T>((f0 + i < half ? c0 : c1) * m[f0 + i]);
        zero.v[i] = acc_to<T>(Acc(0));
      }
      T* p = dh + f0;
      for (int64_t t = 0; t < skip; ++t, p += dim) *reinterpret_cast<Pack<T>*>(p) = zero;
#pragma unroll 2
      for (int64_t t = skip; t < tokens; ++t, p += dim) *reinterpret_cast<Pack<T>*>(p) = g;
    }
  } else {
    for (int64_t d = threadIdx.x; d < dim; d += kThreads) {
      const T g = acc_to<T>((d < half ? c0 : c1) * m[d]);
      T* p = dh + d;
      for (int64_t t = 0; t < skip; ++t, p += dim) *p = acc_to<T>(Acc(0));
#pragma unroll 2
      for (int64_t t = skip; t < tokens; ++t, p += dim) *p = g;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    goodness_kernel(const T* __restrict__ h, int64_t tokens, int64_t dim, int64_t skip, typename AccOf<T>::type inv_count,
                    typename AccOf<T>::type gscale, bool vec,
                    typename AccOf<T>::type* __restrict__ out) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc shared[32];
  const int64_t b = blockIdx.x;
  Acc e0, e1;
  sample_energies<T, Acc>(h + b * tokens * dim, tokens, dim, skip, vec, inv_count, nullptr, shared, &e0, &e1);
  if (threadIdx.x == 0) out[b] = (e0 + e1) * gscale;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    goodness_backward_kernel(const typename AccOf<T>::type* __restrict__ grad, const T* __restrict__ h,
                             int64_t tokens, int64_t dim, int64_t skip, typename AccOf<T>::type inv_count,
                    typename AccOf<T>::type gscale, bool vec, T* __restrict__ dh,
                             typename AccOf<T>::type* __restrict__ scratch) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc shared[32];
  const int64_t b = blockIdx.x;
  Acc e0, e1;
  Acc* m = scratch + b * dim;
  sample_energies<T, Acc>(h + b * tokens * dim, tokens, dim, skip, vec, inv_count, m, shared, &e0, &e1);
  const Acc de = grad[b] * gscale;  // dL/dE, both halves
  write_grad<T, Acc>(dh + b * tokens * dim, m, tokens, dim, skip, vec, inv_count, de, de);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    pair_terms_kernel(const T* __restrict__ hp, const T* __restrict__ hn, int64_t tokens, int64_t dim, int64_t skip,
                      int loss, typename AccOf<T>::type param, typename AccOf<T>::type inv_count,
                    typename AccOf<T>::type gscale, bool vec,
                      typename AccOf<T>::type* __restrict__ terms) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc shared[32];
  const int64_t b = blockIdx.x, off = b * tokens * dim;
  Acc e0p, e1p, e0n, e1n;
  sample_energies<T, Acc>(hp + off, tokens, dim, skip, vec, inv_count, nullptr, shared, &e0p, &e1p);
  sample_energies<T, Acc>(hn + off, tokens, dim, skip, vec, inv_count, nullptr, shared, &e0n, &e1n);
  if (threadIdx.x == 0) terms[b] = pair_term<Acc>(loss, param, gscale, e0p, e1p, e0n, e1n);
}

// out[0] = normalizer * sum_b terms[b]: one CTA, each thread a fixed strided subset, then block_sum.
template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    sum_terms_kernel(const Acc* __restrict__ terms, int64_t batch, Acc normalizer, Acc* __restrict__ out) {
  __shared__ Acc shared[32];
  Acc acc = 0;
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) acc += terms[b];
  const Acc total = block_sum(acc, shared);
  if (threadIdx.x == 0) out[0] = total * normalizer;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    pair_backward_kernel(const typename AccOf<T>::type* __restrict__ grad, const T* __restrict__ hp,
                         const T* __restrict__ hn, int64_t batch, int64_t tokens, int64_t dim, int64_t skip, int loss,
                         typename AccOf<T>::type param, typename AccOf<T>::type inv_count,
                         typename AccOf<T>::type gscale, typename AccOf<T>::type normalizer, bool vec,
                         T* __restrict__ dhp,
                         T* __restrict__ dhn,
                         typename AccOf<T>::type* __restrict__ scratch) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc shared[32];
  const int64_t b = blockIdx.x, off = b * tokens * dim;
  Acc* mp = scratch + b * dim;
  Acc* mn = scratch + (batch + b) * dim;
  Acc e0p, e1p, e0n, e1n;
  sample_energies<T, Acc>(hp + off, tokens, dim, skip, vec, inv_count, mp, shared, &e0p, &e1p);
  sample_energies<T, Acc>(hn + off, tokens, dim, skip, vec, inv_count, mn, shared, &e0n, &e1n);
  const Acc scale = grad[0] * normalizer;
  Acc dp[2], dn[2];
  pair_grad<Acc>(loss, param, gscale, e0p, e1p, e0n, e1n, scale, dp, dn);
  write_grad<T, Acc>(dhp + off, mp, tokens, dim, skip, vec, inv_count, dp[0], dp[1]);
  write_grad<T, Acc>(dhn + off, mn, tokens, dim, skip, vec, inv_count, dn[0], dn[1]);
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
                     bool mean, void* out, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename AccOf<T>::type;
    goodness_kernel<T><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
        static_cast<const T*>(h), tokens, dim, skip, inv_tokens<Acc>(tokens, skip), dim_scale<Acc>(mean, dim),
        vec_ok<T>(dim, {h}), static_cast<Acc*>(out));
    return launch_status();
  });
}

cudaError_t goodness_backward(DType dtype, const void* grad, const void* h, int64_t batch, int64_t tokens,
                              int64_t dim, int64_t skip, bool mean, void* dh, void* scratch, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename AccOf<T>::type;
    goodness_backward_kernel<T><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
        static_cast<const Acc*>(grad), static_cast<const T*>(h), tokens, dim, skip, inv_tokens<Acc>(tokens, skip),
        dim_scale<Acc>(mean, dim), vec_ok<T>(dim, {h, dh}),
        static_cast<T*>(dh), static_cast<Acc*>(scratch));
    return launch_status();
  });
}

cudaError_t pair_loss(DType dtype, const void* h_pos, const void* h_neg, int64_t batch, int64_t tokens,
                      int64_t dim, int64_t skip, int loss, double param, bool mean, void* out, void* scratch,
                      cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename AccOf<T>::type;
    pair_terms_kernel<T><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
        static_cast<const T*>(h_pos), static_cast<const T*>(h_neg), tokens, dim, skip, loss, static_cast<Acc>(param),
        inv_tokens<Acc>(tokens, skip), dim_scale<Acc>(mean, dim), vec_ok<T>(dim, {h_pos, h_neg}),
        static_cast<Acc*>(scratch));
    cudaError_t err = launch_status();
    if (err != cudaSuccess) return err;
    sum_terms_kernel<Acc><<<1, kThreads, 0, stream>>>(static_cast<const Acc*>(scratch), batch,
                                                     pair_normalizer<Acc>(loss, batch), static_cast<Acc*>(out));
    return launch_status();
  });
}

cudaError_t pair_loss_backward(DType dtype, const void* grad, const void* h_pos, const void* h_neg, int64_t batch,
                               int64_t tokens, int64_t dim, int64_t skip, int loss, double param, bool mean,
                               void* dh_pos, void* dh_neg, void* scratch, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename AccOf<T>::type;
    pair_backward_kernel<T><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
        static_cast<const Acc*>(grad), static_cast<const T*>(h_pos), static_cast<const T*>(h_neg), batch, tokens, dim,
        skip, loss, static_cast<Acc>(param), inv_tokens<Acc>(tokens, skip), dim_scale<Acc>(mean, dim),
        pair_normalizer<Acc>(loss, batch), vec_ok<T>(dim, {h_pos, h_neg, dh_pos, dh_neg}),
        static_cast<T*>(dh_pos), static_cast<T*>(dh_neg), static_cast<Acc*>(scratch));
    return launch_status();
  });
}

}  // namespace cuda
}  // namespace ffkern
