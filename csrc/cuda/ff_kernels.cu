// CUDA kernels of the FF goodness losses (SPEC 2). Plain CUDA: no torch headers.
//
// One CTA per sample. Threads stride over the features d; each computes the token mean m_d of its
// features (reading h[b, t, d] for consecutive d: coalesced), and a deterministic block sum gives
// the energies E0, E1 of ff_math.h. Forward reads the activations once; the per-sample loss terms
// are summed by a second one-CTA kernel in a fixed order (bitwise reproducible, no atomics).
// Backward reads them once and writes dL/dh; the token means go through a small scratch buffer
// [B, D] written and read back by the same thread.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
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
__device__ __forceinline__ void store_from_acc(T* p, typename AccOf<T>::type v) {
  *p = from_acc<T>(v);
}
template <>
__device__ __forceinline__ void store_from_acc<double>(double* p, double v) {
  *p = v;
}

// Token mean of sample h [tokens, dim] (tokens skip..) into m (may be null); energies to all threads.
template <typename T, typename Acc>
__device__ void sample_energies(const T* __restrict__ h, int64_t tokens, int64_t dim, int64_t skip,
                                Acc* __restrict__ m, Acc* shared, Acc* e0, Acc* e1) {
  const int64_t half = dim / 2;
  const Acc count = static_cast<Acc>(tokens - skip);
  Acc s0 = 0, s1 = 0;
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) {
    Acc acc = 0;
    for (int64_t t = skip; t < tokens; ++t) acc += load_acc(h + t * dim + d);
    const Acc md = acc / count;
    if (m != nullptr) m[d] = md;
    if (d < half) {
      s0 += md * md;
    } else {
      s1 += md * md;
    }
  }
  *e0 = block_sum(s0, shared);
  *e1 = block_sum(s1, shared);
}

// dh[t, d] = dE_half(d) * 2 m_d / T' for t >= skip, 0 before (m written by this thread).
template <typename T, typename Acc>
__device__ void write_grad(T* __restrict__ dh, const Acc* __restrict__ m, int64_t tokens, int64_t dim, int64_t skip,
                           Acc d0, Acc d1) {
  const int64_t half = dim / 2;
  const Acc c0 = Acc(2) * d0 / static_cast<Acc>(tokens - skip), c1 = Acc(2) * d1 / static_cast<Acc>(tokens - skip);
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) {
    const Acc g = (d < half ? c0 : c1) * m[d];
    for (int64_t t = 0; t < tokens; ++t) store_from_acc(dh + t * dim + d, t < skip ? Acc(0) : g);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    goodness_kernel(const T* __restrict__ h, int64_t tokens, int64_t dim, int64_t skip, bool mean,
                    typename AccOf<T>::type* __restrict__ out) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc shared[32];
  const int64_t b = blockIdx.x;
  Acc e0, e1;
  sample_energies<T, Acc>(h + b * tokens * dim, tokens, dim, skip, nullptr, shared, &e0, &e1);
  if (threadIdx.x == 0) out[b] = (e0 + e1) * (mean ? Acc(1) / static_cast<Acc>(dim) : Acc(1));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    goodness_backward_kernel(const typename AccOf<T>::type* __restrict__ grad, const T* __restrict__ h,
                             int64_t tokens, int64_t dim, int64_t skip, bool mean, T* __restrict__ dh,
                             typename AccOf<T>::type* __restrict__ scratch) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc shared[32];
  const int64_t b = blockIdx.x;
  Acc e0, e1;
  Acc* m = scratch + b * dim;
  sample_energies<T, Acc>(h + b * tokens * dim, tokens, dim, skip, m, shared, &e0, &e1);
  const Acc de = grad[b] * (mean ? Acc(1) / static_cast<Acc>(dim) : Acc(1));  // dL/dE, both halves
  write_grad<T, Acc>(dh + b * tokens * dim, m, tokens, dim, skip, de, de);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    pair_terms_kernel(const T* __restrict__ hp, const T* __restrict__ hn, int64_t tokens, int64_t dim, int64_t skip,
                      int loss, typename AccOf<T>::type param, bool mean, typename AccOf<T>::type* __restrict__ terms) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc shared[32];
  const int64_t b = blockIdx.x, off = b * tokens * dim;
  Acc e0p, e1p, e0n, e1n;
  sample_energies<T, Acc>(hp + off, tokens, dim, skip, nullptr, shared, &e0p, &e1p);
  sample_energies<T, Acc>(hn + off, tokens, dim, skip, nullptr, shared, &e0n, &e1n);
  const Acc gscale = mean ? Acc(1) / static_cast<Acc>(dim) : Acc(1);
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
                         typename AccOf<T>::type param, bool mean, T* __restrict__ dhp, T* __restrict__ dhn,
                         typename AccOf<T>::type* __restrict__ scratch) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc shared[32];
  const int64_t b = blockIdx.x, off = b * tokens * dim;
  Acc* mp = scratch + b * dim;
  Acc* mn = scratch + (batch + b) * dim;
  Acc e0p, e1p, e0n, e1n;
  sample_energies<T, Acc>(hp + off, tokens, dim, skip, mp, shared, &e0p, &e1p);
  sample_energies<T, Acc>(hn + off, tokens, dim, skip, mn, shared, &e0n, &e1n);
  const Acc gscale = mean ? Acc(1) / static_cast<Acc>(dim) : Acc(1);
  const Acc scale = grad[0] * pair_normalizer<Acc>(loss, batch);
  Acc dp[2], dn[2];
  pair_grad<Acc>(loss, param, gscale, e0p, e1p, e0n, e1n, scale, dp, dn);
  write_grad<T, Acc>(dhp + off, mp, tokens, dim, skip, dp[0], dp[1]);
  write_grad<T, Acc>(dhn + off, mn, tokens, dim, skip, dn[0], dn[1]);
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

}  // namespace

cudaError_t goodness(DType dtype, const void* h, int64_t batch, int64_t tokens, int64_t dim, int64_t skip,
                     bool mean, void* out, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename AccOf<T>::type;
    goodness_kernel<T><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(static_cast<const T*>(h), tokens, dim,
                                                                              skip, mean, static_cast<Acc*>(out));
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
        static_cast<const Acc*>(grad), static_cast<const T*>(h), tokens, dim, skip, mean, static_cast<T*>(dh),
        static_cast<Acc*>(scratch));
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
        mean, static_cast<Acc*>(scratch));
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
        skip, loss, static_cast<Acc>(param), mean, static_cast<T*>(dh_pos), static_cast<T*>(dh_neg),
        static_cast<Acc*>(scratch));
    return launch_status();
  });
}

}  // namespace cuda
}  // namespace ffkern
