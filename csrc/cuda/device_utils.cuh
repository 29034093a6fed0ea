// Device helpers shared by the CUDA kernel files: type conversions (explicit intrinsics, since
// torch builds define __CUDA_NO_HALF_CONVERSIONS__), exp/log per accumulation type, and a
// deterministic block sum. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ffkern_cuda.h"

namespace ffkern {
namespace cuda {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T x) {
  return static_cast<Acc>(to_float(x));
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double x) {
  return x;
}

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
__device__ __forceinline__ T zero_of() {
  return from_acc<T>(0.0f);
}
template <>
__device__ __forceinline__ double zero_of<double>() {
  return 0.0;
}

// 2^x. fp32: the SFU's ex2.approx (one MUFU.EX2, relative error ~2^-22; results below 2^-126
// flush to 0, which no sum of at most 2^31 terms with a largest term >= 2^-60 can notice).
// fp64: the precise libdevice exp2 (float64 is the gradcheck path, not a fast one).
__device__ __forceinline__ float acc_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ double acc_exp2(double x) { return exp2(x); }
__device__ __forceinline__ float acc_log2(float x) { return log2f(x); }
__device__ __forceinline__ double acc_log2(double x) { return log2(x); }

// min(x, 1) that keeps a NaN x NaN, as torch.clamp does (fminf would return 1).
template <typename Acc>
__device__ __forceinline__ Acc clip_one(Acc x) {
  return x > Acc(1) ? Acc(1) : x;
}

template <typename Acc>
__device__ __forceinline__ Acc neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() {
  return __int_as_float(0xff800000);
}
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return __longlong_as_double(static_cast<long long>(0xfff0000000000000ULL));
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024), the same value returned to
// every thread. Fixed reduction order: bitwise reproducible. `shared` holds >= 32 values.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v, Acc* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  __syncthreads();  // `shared` may still be read by a previous call
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
  __syncthreads();
  Acc total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += shared[w];
  return total;
}

// Returns the launch's error, if any (an asynchronous fault shows up at the next sync in torch).
inline cudaError_t launch_status() { return cudaGetLastError(); }

}  // namespace cuda
}  // namespace ffkern
