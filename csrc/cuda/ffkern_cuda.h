// Host entry points of the CUDA kernels (csrc/cuda/*.cu). Plain C++ and CUDA runtime only, no torch
// headers: the .cu files compile with nvcc alone (CI compile-checks them for sm_80 and sm_90), and
// cuda_binding.cpp adapts torch tensors to these calls.
//
// Conventions: device pointers, rows contiguous ([rows, dim] row-major, [B, T, dim] for tokens),
// 64-bit sizes and index arithmetic. "acc" pointers are float (double for kFloat64 inputs): the
// kernels accumulate in fp32 for float16 / bfloat16 / float32 inputs. Every function launches on
// `stream`, checks the launch, and returns the first CUDA error (cudaSuccess otherwise).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ffkern {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Anchors zr [n, dim] (global rows row_offset .. row_offset+n-1) against all rows zc [n_all, dim]:
// per-anchor loss, logsumexp, |P(i)| and clipped counts (SPEC 1.2, 1.4).
cudaError_t supcon_forward(DType dtype, const void* zr, const int64_t* yr, const void* zc, const int64_t* yc,
                           int64_t n, int64_t n_all, int64_t dim, int64_t row_offset, double temperature,
                           double margin, void* loss, void* lse, int32_t* num_pos, int32_t* num_clipped,
                           cudaStream_t stream);

// dz [n, dim] (acc type) = dL/dzr by the symmetric pair term of SPEC 1.3 (statistics in acc type);
// every element of dz is written. scratch: kSupconScratchBytes of device memory (16-byte aligned)
// for the batch-wide constants of the one-exponential path.
constexpr int kSupconScratchBytes = 16;
cudaError_t supcon_backward(DType dtype, const void* zr, const int64_t* yr, const void* zc, const int64_t* yc,
                            int64_t n, int64_t n_all, int64_t dim, int64_t row_offset, const void* lse_r,
                            const void* a_r, const void* b_r, const void* lse_c, const void* a_c, const void* b_c,
                            double temperature, double margin, void* dz, void* scratch, cudaStream_t stream);

// FF goodness [batch] (acc type) of h [batch, tokens, dim] over tokens skip..tokens-1; means
// non-null: the token means [batch, dim] (acc) are written there too, for the backward.
cudaError_t goodness(DType dtype, const void* h, int64_t batch, int64_t tokens, int64_t dim, int64_t skip,
                     bool mean, void* out, void* means, cudaStream_t stream);

// dh [batch, tokens, dim] (input dtype) from grad [batch] (acc). means non-null: the forward's token
// means (acc), h is then not read and scratch not used; else scratch: batch*dim acc values.
cudaError_t goodness_backward(DType dtype, const void* grad, const void* h, const void* means, int64_t batch,
                              int64_t tokens, int64_t dim, int64_t skip, bool mean, void* dh, void* scratch,
                              cudaStream_t stream);

// Pair loss (loss: 0 ff, 1 symba, 2 sffa; see ff_math.h) into out[0] (acc). activity non-null (sffa
// with its activity term): out[0] = L_S A and activity[0..1] = (L_S, A) (acc). means_pos, means_neg
// non-null: the token means [batch, dim] (acc) for the backward. scratch: batch acc values, 3*batch
// with activity.
cudaError_t pair_loss(DType dtype, const void* h_pos, const void* h_neg, int64_t batch, int64_t tokens,
                      int64_t dim, int64_t skip, int loss, double param, bool mean, void* out, void* activity,
                      void* means_pos, void* means_neg, void* scratch, cudaStream_t stream);

// dh_pos, dh_neg (input dtype) from the scalar grad[0] (acc); activity: pair_loss's (L_S, A) for the
// loss with SFFA's activity term, null without it. means_pos and means_neg both non-null: the
// forward's token means (h unread, scratch unused); else scratch: 2*batch*dim acc values.
cudaError_t pair_loss_backward(DType dtype, const void* grad, const void* h_pos, const void* h_neg, int64_t batch,
                               int64_t tokens, int64_t dim, int64_t skip, int loss, double param, bool mean,
                               const void* activity, const void* means_pos, const void* means_neg, void* dh_pos,
                               void* dh_neg, void* scratch, cudaStream_t stream);

}  // namespace cuda
}  // namespace ffkern
