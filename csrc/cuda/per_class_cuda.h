// Host entry points of the per-class goodness CUDA kernels (per_class_kernels.cu). Plain C++ and
// CUDA runtime only (no torch headers), as ffkern_cuda.h; per_class_binding.cpp adapts tensors.
//
// Conventions: h [batch, channels, positions] by element strides (stride_p = 1 for NCHW, stride_c = 1
// for channels-last); "acc" is float (double for kFloat64 h). The weight comes transposed and
// padded to chunks of kPerClassChunk classes: wt [chunks][channels][kPerClassChunk] (acc, zeros
// past K), bias likewise [chunks * kPerClassChunk] (or null). Every function launches on `stream`
// and returns the first CUDA error (cudaSuccess otherwise).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ffkern_cuda.h"

namespace ffkern {
namespace cuda {

constexpr int kPerClassChunk = 16;      // classes per register chunk
constexpr int kPerClassMaxClasses = 384;  // the backward keeps dz [K, 32..256 positions] in 48 KB of shared memory

struct PerClassMap {
  int64_t batch, channels, positions, classes;
  int64_t stride_b, stride_c, stride_p;
};

// g [batch, classes] (acc); with labels (int64) also losses [batch] (acc): the softmax cross-entropy
// of scale[0] (acc, on the device) times g against the labels (NaN for a label outside [0, K)).
cudaError_t per_class_forward(DType dtype, const void* h, PerClassMap map, const void* wt, const void* bias,
                              const int64_t* labels, const void* scale, void* g, void* losses, cudaStream_t stream);

// dh (h's dtype, strides of dh_map) and this launch's partial sums of dW [programs, classes, channels]
// and dbias [programs, classes] (acc; dw_part zeroed by the caller) from coef = dL/dg [batch, classes]
// (acc). Programs (blocks) take samples b = blockIdx, blockIdx + programs, ...
cudaError_t per_class_backward(DType dtype, const void* h, PerClassMap map, PerClassMap dh_map, const void* wt,
                               const void* bias, const void* coef, void* dh, void* dw_part, void* db_part,
                               int programs, cudaStream_t stream);

}  // namespace cuda
}  // namespace ffkern
