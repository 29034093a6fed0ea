// CUDA kernels of the per-class goodness loss (SPEC 2.2); host entry points in per_class_cuda.h.
//
// The class maps z_bk(p) = sum_c W_kc h_bc(p) + beta_k are never written to memory:
//   forward   one block per sample, one thread per position (block-stride over the H*W positions),
//             chunks of 16 classes in registers: z chunk from h (read in place through its strides)
//             and W (transposed, [chunk][c][16]: 16 contiguous values per channel, one broadcast
//             load for the warp), squares summed per thread, then per warp (shuffles) and over the
//             warps in a fixed order; the softmax cross-entropy of the sample follows in the block.
//   backward  programs (blocks) take samples b = blockIdx, blockIdx + gridDim, ...; per tile of up to
//             256 positions: phase 1 (thread per position) rebuilds z, dz = dL/dg * 2 z / P into
//             shared memory [K, tile]; phase 2 (thread per position) writes dh = W^T dz; phase 3
//             (thread per channel) adds sum_p dz h into this block's own slice of dW (no other block
//             touches it: deterministic, no atomics) and the threads k < K sum dbias.
// Accumulation in float (double for float64 h). No torch headers (see ffkern_cuda.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "device_utils.cuh"
#include "per_class_cuda.h"

namespace ffkern {
namespace cuda {
namespace {

constexpr int kChunk = kPerClassChunk;
constexpr int kThreads = 256;
constexpr int kMaxTile = 256;                // positions per backward tile
constexpr int kSharedBytes = 48 * 1024;      // the backward's dz tile (no opt-in needed)

template <typename A>
__device__ __forceinline__ A quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() {
  return __int_as_float(0x7fc00000);
}
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

template <typename T, typename A>
__device__ __forceinline__ T store_as(A x) {
  return from_acc<T>(static_cast<float>(x));
}
template <>
__device__ __forceinline__ double store_as<double, double>(double x) {
  return x;
}

// z [kChunk] of classes chunk*16 .. at position p of the sample at hb.
template <typename T, typename A>
__device__ __forceinline__ void class_chunk(const T* __restrict__ hb, int64_t channels, int64_t stride_c,
                                            int64_t p_offset, const A* __restrict__ wt_chunk,
                                            const A* __restrict__ bias_chunk, A (&z)[kChunk]) {
#pragma unroll
  for (int kk = 0; kk < kChunk; ++kk) z[kk] = bias_chunk ? bias_chunk[kk] : A(0);
  for (int64_t c = 0; c < channels; ++c) {
    const A hv = to_acc<A>(hb[c * stride_c + p_offset]);
    const A* w = wt_chunk + c * kChunk;
#pragma unroll
    for (int kk = 0; kk < kChunk; ++kk) z[kk] += w[kk] * hv;
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) per_class_forward_kernel(
    const T* __restrict__ h, PerClassMap m, const A* __restrict__ wt, const A* __restrict__ bias,
    const int64_t* __restrict__ labels, const A* __restrict__ scale, A* __restrict__ g, A* __restrict__ losses) {
  extern __shared__ unsigned char smem_raw[];
  A* red = reinterpret_cast<A*>(smem_raw);  // [warps][chunks * kChunk], then g [K]
  const int chunks = static_cast<int>((m.classes + kChunk - 1) / kChunk);
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t b = blockIdx.x;
  const T* hb = h + b * m.stride_b;
  for (int ch = 0; ch < chunks; ++ch) {
    A sq[kChunk];
#pragma unroll
    for (int kk = 0; kk < kChunk; ++kk) sq[kk] = A(0);
    for (int64_t p = threadIdx.x; p < m.positions; p += blockDim.x) {
      A z[kChunk];
      class_chunk<T, A>(hb, m.channels, m.stride_c, p * m.stride_p, wt + ch * m.channels * kChunk,
                        bias ? bias + ch * kChunk : nullptr, z);
#pragma unroll
      for (int kk = 0; kk < kChunk; ++kk) sq[kk] += z[kk] * z[kk];
    }
#pragma unroll
    for (int kk = 0; kk < kChunk; ++kk) {
      A v = sq[kk];
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) red[warp * chunks * kChunk + ch * kChunk + kk] = v;
    }
  }
  __syncthreads();
  A* gs = red + warps * chunks * kChunk;
  for (int k = threadIdx.x; k < m.classes; k += blockDim.x) {
    A total = 0;
    for (int w = 0; w < warps; ++w) total += red[w * chunks * kChunk + k];  // fixed order
    const A gk = total / static_cast<A>(m.positions);
    g[b * m.classes + k] = gk;
    gs[k] = gk;
  }
  if (!losses) return;
  __syncthreads();
  if (threadIdx.x == 0) {  // K values: one thread
    const A s = scale[0];
    A top = neg_inf<A>();
    for (int64_t k = 0; k < m.classes; ++k) top = s * gs[k] > top ? s * gs[k] : top;
    A sum = 0;
    for (int64_t k = 0; k < m.classes; ++k) sum += exp(s * gs[k] - top);
    const int64_t y = labels[b];
    // a label outside [0, K) (not checked under torch.compile) gives NaN, never a silent value
    losses[b] = (y >= 0 && y < m.classes) ? top + log(sum) - s * gs[y] : quiet_nan<A>();
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) per_class_backward_kernel(
    const T* __restrict__ h, PerClassMap m, PerClassMap dm, const A* __restrict__ wt, const A* __restrict__ bias,
    const A* __restrict__ coef, T* __restrict__ dh, A* __restrict__ dw_part, A* __restrict__ db_part, int tile) {
  extern __shared__ unsigned char smem_raw[];
  A* dzs = reinterpret_cast<A*>(smem_raw);  // [K][tile]
  const int chunks = static_cast<int>((m.classes + kChunk - 1) / kChunk);
  const A two_over_p = A(2) / static_cast<A>(m.positions);
  A* dw = dw_part + static_cast<int64_t>(blockIdx.x) * m.classes * m.channels;
  A dbias = 0;  // class threadIdx.x's, for threadIdx.x < K
  for (int64_t b = blockIdx.x; b < m.batch; b += gridDim.x) {
    const T* hb = h + b * m.stride_b;
    T* dhb = dh + b * dm.stride_b;
    for (int64_t p0 = 0; p0 < m.positions; p0 += tile) {
      const int64_t n = m.positions - p0 < tile ? m.positions - p0 : tile;
      const int64_t p = p0 + threadIdx.x;
      // phase 1: dz [K, tile] (zeros past the last position)
      if (threadIdx.x < tile) {
        for (int ch = 0; ch < chunks; ++ch) {
          A z[kChunk] = {};
          if (threadIdx.x < n) {
            class_chunk<T, A>(hb, m.channels, m.stride_c, p * m.stride_p, wt + ch * m.channels * kChunk,
                              bias ? bias + ch * kChunk : nullptr, z);
          }
#pragma unroll
          for (int kk = 0; kk < kChunk; ++kk) {
            const int64_t k = ch * kChunk + kk;
            if (k < m.classes)
              dzs[k * tile + threadIdx.x] = threadIdx.x < n ? coef[b * m.classes + k] * two_over_p * z[kk] : A(0);
          }
        }
      }
      __syncthreads();
      // phase 2: dh(p) = W^T dz(p), thread per position
      if (threadIdx.x < n) {
        for (int64_t c = 0; c < m.channels; ++c) {
          A acc = 0;
          for (int ch = 0; ch < chunks; ++ch) {
            const A* w = wt + (ch * m.channels + c) * kChunk;
            const int kn = m.classes - ch * kChunk < kChunk ? static_cast<int>(m.classes - ch * kChunk) : kChunk;
            for (int kk = 0; kk < kn; ++kk) acc += w[kk] * dzs[(ch * kChunk + kk) * tile + threadIdx.x];
          }
          dhb[c * dm.stride_c + p * dm.stride_p] = store_as<T, A>(acc);
        }
      }
      // phase 3: dW[k, c] += sum_p dz[k, p] h[c, p], thread per channel; dbias
      for (int64_t c = threadIdx.x; c < m.channels; c += blockDim.x) {
        const T* hc = hb + c * m.stride_c + p0 * m.stride_p;
        for (int ch = 0; ch < chunks; ++ch) {
          A acc[kChunk];
#pragma unroll
          for (int kk = 0; kk < kChunk; ++kk) acc[kk] = A(0);
          for (int64_t j = 0; j < n; ++j) {
            const A hv = to_acc<A>(hc[j * m.stride_p]);
#pragma unroll
            for (int kk = 0; kk < kChunk; ++kk) {
              const int64_t k = ch * kChunk + kk;
              if (k < m.classes) acc[kk] += dzs[k * tile + j] * hv;
            }
          }
#pragma unroll
          for (int kk = 0; kk < kChunk; ++kk) {
            const int64_t k = ch * kChunk + kk;
            if (k < m.classes) dw[k * m.channels + c] += acc[kk];
          }
        }
      }
      if (threadIdx.x < m.classes) {
        for (int64_t j = 0; j < n; ++j) dbias += dzs[threadIdx.x * tile + j];
      }
      __syncthreads();  // dzs is rewritten by the next tile
    }
  }
  if (threadIdx.x < m.classes) db_part[static_cast<int64_t>(blockIdx.x) * m.classes + threadIdx.x] = dbias;
}

int forward_threads(int64_t positions) {
  int64_t t = (positions + 31) / 32 * 32;
  return static_cast<int>(t < 32 ? 32 : (t > kThreads ? kThreads : t));
}

template <typename T, typename A>
cudaError_t forward_typed(const void* h, PerClassMap m, const void* wt, const void* bias, const int64_t* labels,
                          const void* scale, void* g, void* losses, cudaStream_t stream) {
  if (m.batch == 0) return cudaSuccess;
  const int threads = forward_threads(m.positions);
  const int64_t chunks = (m.classes + kChunk - 1) / kChunk;
  const size_t shared = sizeof(A) * (static_cast<size_t>(threads / 32) * chunks * kChunk + m.classes);
  per_class_forward_kernel<T, A><<<static_cast<unsigned>(m.batch), threads, shared, stream>>>(
      static_cast<const T*>(h), m, static_cast<const A*>(wt), static_cast<const A*>(bias), labels,
      static_cast<const A*>(scale), static_cast<A*>(g), static_cast<A*>(losses));
  return launch_status();
}

template <typename T, typename A>
cudaError_t backward_typed(const void* h, PerClassMap m, PerClassMap dm, const void* wt, const void* bias,
                           const void* coef, void* dh, void* dw_part, void* db_part, int programs,
                           cudaStream_t stream) {
  if (m.batch == 0 || programs < 1) return cudaSuccess;
  if (m.classes > kPerClassMaxClasses) return cudaErrorInvalidValue;
  // positions per tile: the block's threads, as many as dz [K, tile] fits in 48 KB (a multiple of 32)
  int64_t tile = kSharedBytes / (static_cast<int64_t>(sizeof(A)) * m.classes) / 32 * 32;
  tile = tile > kMaxTile ? kMaxTile : tile;
  const int64_t needed = (m.positions + 31) / 32 * 32;
  tile = needed < tile ? needed : tile;
  if (tile < 32) tile = 32;
  const size_t shared = sizeof(A) * static_cast<size_t>(m.classes) * tile;
  if (shared > static_cast<size_t>(kSharedBytes)) return cudaErrorInvalidValue;
  per_class_backward_kernel<T, A><<<static_cast<unsigned>(programs), kThreads, shared, stream>>>(
      static_cast<const T*>(h), m, dm, static_cast<const A*>(wt), static_cast<const A*>(bias),
      static_cast<const A*>(coef), static_cast<T*>(dh), static_cast<A*>(dw_part), static_cast<A*>(db_part),
      static_cast<int>(tile));
  return launch_status();
}

}  // namespace

cudaError_t per_class_forward(DType dtype, const void* h, PerClassMap map, const void* wt, const void* bias,
                              const int64_t* labels, const void* scale, void* g, void* losses, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed<float, float>(h, map, wt, bias, labels, scale, g, losses, stream);
    case DType::kFloat64:
      return forward_typed<double, double>(h, map, wt, bias, labels, scale, g, losses, stream);
    case DType::kFloat16:
      return forward_typed<__half, float>(h, map, wt, bias, labels, scale, g, losses, stream);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16, float>(h, map, wt, bias, labels, scale, g, losses, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t per_class_backward(DType dtype, const void* h, PerClassMap map, PerClassMap dh_map, const void* wt,
                               const void* bias, const void* coef, void* dh, void* dw_part, void* db_part,
                               int programs, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed<float, float>(h, map, dh_map, wt, bias, coef, dh, dw_part, db_part, programs, stream);
    case DType::kFloat64:
      return backward_typed<double, double>(h, map, dh_map, wt, bias, coef, dh, dw_part, db_part, programs, stream);
    case DType::kFloat16:
      return backward_typed<__half, float>(h, map, dh_map, wt, bias, coef, dh, dw_part, db_part, programs, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16, float>(h, map, dh_map, wt, bias, coef, dh, dw_part, db_part, programs,
                                                  stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace ffkern
