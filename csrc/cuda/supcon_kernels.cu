// CUDA kernels of the marginal SupCon loss (SPEC 1.2 and 1.3). Plain CUDA: no torch headers.
//
// Tiled like FlashAttention. One CTA owns kBM anchor rows and sweeps all rows in tiles of kBN
// columns; a tile of similarities s_ij is computed into shared memory (tensor cores through WMMA
// for float16 / bfloat16 on sm_80+, fp32 FMA otherwise, always accumulating in fp32 / fp64) and
// never leaves the chip: memory is O(N*D), no N x N buffer.
//   forward : one thread per anchor row folds each tile into an online logsumexp (running max and
//             rescaled sum) plus |P(i)|, the clipped count and the sum of positive logits.
//   backward: the symmetric pair term G_kj + G_jk of SPEC 1.3 needs only per-row statistics, so
//             the CTA owns dz for its rows and accumulates dz += G_tile @ z_tile tile by tile:
//             no atomics, no cross-CTA reduction, a fixed order (bitwise reproducible).
//             The G @ z product runs in fp32 FMA from shared memory (G is not rounded to 16 bits).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "device_utils.cuh"
#include "ffkern_cuda.h"

namespace ffkern {
namespace cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps

// Tile shapes per input type. kLdK / kLdS pad the shared-memory rows: WMMA needs a multiple of 8
// (16-bit types) or 4 (fp32 accumulators); the fp32/fp64 paths use odd strides (no bank conflicts).
template <typename T>
struct Tile {
  static constexpr int kBM = 64, kBN = 64, kBK = 32, kLdK = kBK + 1, kLdS = kBN + 1;
  static constexpr bool kWmma = false;
};
template <>
struct Tile<double> {  // fp64: smaller tiles keep shared memory under the 48 KiB static limit
  static constexpr int kBM = 32, kBN = 32, kBK = 32, kLdK = kBK + 1, kLdS = kBN + 1;
  static constexpr bool kWmma = false;
};
template <>
struct Tile<__half> {
  static constexpr int kBM = 64, kBN = 64, kBK = 32, kLdK = kBK + 8, kLdS = kBN + 4;
  static constexpr bool kWmma = true;
};
template <>
struct Tile<__nv_bfloat16> {
  static constexpr int kBM = 64, kBN = 64, kBK = 32, kLdK = kBK + 8, kLdS = kBN + 4;
  static constexpr bool kWmma = true;
};

// Rows row0 .. row0+rows-1, features k0 .. k0+kBK-1 of src [total_rows, dim] into dst [rows][kLdK],
// zero-filled outside the matrix (so partial tiles and any dim need no special case).
template <typename T>
__device__ void load_chunk(T* dst, const T* __restrict__ src, int64_t row0, int rows, int64_t total_rows,
                           int64_t dim, int64_t k0) {
  using Tr = Tile<T>;
  for (int e = threadIdx.x; e < rows * Tr::kBK; e += kThreads) {
    const int r = e / Tr::kBK, k = e % Tr::kBK;
    const int64_t gr = row0 + r, gk = k0 + k;
    dst[r * Tr::kLdK + k] = (gr < total_rows && gk < dim) ? src[gr * dim + gk] : zero_of<T>();
  }
}

// sS[i][j] = zr[r0 + i] . zc[c0 + j] for the kBM x kBN tile (zero outside the matrices).
// Starts and ends with a block-wide barrier, so shared data written before it is visible after it.
template <typename T, typename Acc>
__device__ void score_tile(const T* __restrict__ zr, int64_t n, const T* __restrict__ zc, int64_t n_all,
                           int64_t dim, int64_t r0, int64_t c0, T* sA, T* sB, Acc* sS) {
  using Tr = Tile<T>;
  __syncthreads();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (Tr::kWmma) {
    // Tensor cores: warp w computes rows 16w..16w+15 as four 16x16 fp32 accumulator fragments.
    using namespace nvcuda;
    static_assert(Tr::kBM == 16 * (kThreads / 32) && Tr::kBN == 64 && Tr::kBK % 16 == 0, "tile shape");
    const int warp = threadIdx.x / 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
    for (int jj = 0; jj < 4; ++jj) wmma::fill_fragment(acc[jj], 0.0f);
    for (int64_t k0 = 0; k0 < dim; k0 += Tr::kBK) {
      load_chunk(sA, zr, r0, Tr::kBM, n, dim, k0);
      load_chunk(sB, zc, c0, Tr::kBN, n_all, dim, k0);
      __syncthreads();
      for (int kk = 0; kk < Tr::kBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, sA + warp * 16 * Tr::kLdK + kk, Tr::kLdK);
        for (int jj = 0; jj < 4; ++jj) {
          // B = zc^T: element (k, j) sits at sB[j * kLdK + k], i.e. column-major.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, sB + jj * 16 * Tr::kLdK + kk, Tr::kLdK);
          wmma::mma_sync(acc[jj], a, b, acc[jj]);
        }
      }
      __syncthreads();
    }
    for (int jj = 0; jj < 4; ++jj) {
      wmma::store_matrix_sync(sS + warp * 16 * Tr::kLdS + jj * 16, acc[jj], Tr::kLdS, wmma::mem_row_major);
    }
    __syncthreads();
    return;
  }
#endif
  // FMA path: thread (tr, tc) owns rows tr + 8i and columns tc + 16jj of the tile.
  constexpr int kTR = Tr::kBM / 8, kTC = Tr::kBN / 16;
  const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
  Acc acc[kTR][kTC];
  for (int i = 0; i < kTR; ++i)
    for (int jj = 0; jj < kTC; ++jj) acc[i][jj] = Acc(0);
  for (int64_t k0 = 0; k0 < dim; k0 += Tr::kBK) {
    load_chunk(sA, zr, r0, Tr::kBM, n, dim, k0);
    load_chunk(sB, zc, c0, Tr::kBN, n_all, dim, k0);
    __syncthreads();
    for (int k = 0; k < Tr::kBK; ++k) {
      Acc a[kTR], b[kTC];
      for (int i = 0; i < kTR; ++i) a[i] = to_acc<Acc>(sA[(tr + 8 * i) * Tr::kLdK + k]);
      for (int jj = 0; jj < kTC; ++jj) b[jj] = to_acc<Acc>(sB[(tc + 16 * jj) * Tr::kLdK + k]);
      for (int i = 0; i < kTR; ++i)
        for (int jj = 0; jj < kTC; ++jj) acc[i][jj] += a[i] * b[jj];
    }
    __syncthreads();
  }
  for (int i = 0; i < kTR; ++i)
    for (int jj = 0; jj < kTC; ++jj) sS[(tr + 8 * i) * Tr::kLdS + tc + 16 * jj] = acc[i][jj];
  __syncthreads();
}

// t_ij / tau: min(s + m, 1) on positives (NaN stays NaN, as in torch.clamp), s otherwise.
template <typename Acc>
__device__ __forceinline__ Acc logit(Acc s, bool pos, Acc margin, Acc temperature) {
  const Acc sm = s + margin;
  const Acc t = pos ? (Acc(1) < sm ? Acc(1) : sm) : s;
  return t / temperature;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    supcon_forward_kernel(const T* __restrict__ zr, const int64_t* __restrict__ yr, const T* __restrict__ zc,
                          const int64_t* __restrict__ yc, int64_t n, int64_t n_all, int64_t dim, int64_t row_offset,
                          typename AccOf<T>::type temperature, typename AccOf<T>::type margin,
                          typename AccOf<T>::type* __restrict__ loss, typename AccOf<T>::type* __restrict__ lse,
                          int32_t* __restrict__ num_pos, int32_t* __restrict__ num_clipped) {
  using Acc = typename AccOf<T>::type;
  using Tr = Tile<T>;
  __shared__ __align__(128) T sA[Tr::kBM * Tr::kLdK];
  __shared__ __align__(128) T sB[Tr::kBN * Tr::kLdK];
  __shared__ __align__(128) Acc sS[Tr::kBM * Tr::kLdS];
  __shared__ int64_t sY[Tr::kBN];

  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * Tr::kBM;
  const int i = threadIdx.x;
  const int64_t row = r0 + i;
  const bool active = i < Tr::kBM && row < n;
  const int64_t yi = active ? yr[row] : 0;
  const int64_t self = row_offset + row;  // global index of the anchor: its own column is skipped
  Acc run_max = neg_inf<Acc>(), run_sum = 0, pos_sum = 0;
  int64_t np = 0, nc = 0;

  for (int64_t c0 = 0; c0 < n_all; c0 += Tr::kBN) {
    if (threadIdx.x < Tr::kBN) sY[threadIdx.x] = c0 + threadIdx.x < n_all ? yc[c0 + threadIdx.x] : 0;
    score_tile<T, Acc>(zr, n, zc, n_all, dim, r0, c0, sA, sB, sS);  // its barriers publish sY too
    if (active) {
      const int cols = static_cast<int>(n_all - c0 < Tr::kBN ? n_all - c0 : Tr::kBN);
      Acc* l = sS + i * Tr::kLdS;
      Acc tile_max = neg_inf<Acc>();
      for (int j = 0; j < cols; ++j) {  // pass 1: logits in place, tile max, positive statistics
        if (c0 + j == self) {
          l[j] = neg_inf<Acc>();
          continue;
        }
        const Acc s = l[j];
        const bool pos = sY[j] == yi;
        const Acc v = logit(s, pos, margin, temperature);
        l[j] = v;
        tile_max = v > tile_max ? v : tile_max;
        if (pos) {
          pos_sum += v;
          np += 1;
          nc += (s + margin >= Acc(1)) ? 1 : 0;  // SPEC 1.4: s + m >= 1 counts as clipped
        }
      }
      const Acc new_max = run_max > tile_max ? run_max : tile_max;
      if (new_max != neg_inf<Acc>()) {  // pass 2: online logsumexp against the new max
        Acc add = 0;
        for (int j = 0; j < cols; ++j) add += acc_exp(l[j] - new_max);
        run_sum = run_sum * acc_exp(run_max - new_max) + add;
        run_max = new_max;
      }
    }
    __syncthreads();  // sY and sS are rewritten for the next tile only after every row is done
  }
  if (active) {
    const Acc l_se = run_max + acc_log(run_sum);  // -inf for a single row (no pair)
    lse[row] = l_se;
    loss[row] = np > 0 ? l_se - pos_sum / static_cast<Acc>(np) : Acc(0);
    num_pos[row] = static_cast<int32_t>(np);
    num_clipped[row] = static_cast<int32_t>(nc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    supcon_backward_kernel(const T* __restrict__ zr, const int64_t* __restrict__ yr, const T* __restrict__ zc,
                           const int64_t* __restrict__ yc, int64_t n, int64_t n_all, int64_t dim, int64_t row_offset,
                           const typename AccOf<T>::type* __restrict__ lse_r,
                           const typename AccOf<T>::type* __restrict__ a_r,
                           const typename AccOf<T>::type* __restrict__ b_r,
                           const typename AccOf<T>::type* __restrict__ lse_c,
                           const typename AccOf<T>::type* __restrict__ a_c,
                           const typename AccOf<T>::type* __restrict__ b_c, typename AccOf<T>::type temperature,
                           typename AccOf<T>::type margin, typename AccOf<T>::type* __restrict__ dz) {
  using Acc = typename AccOf<T>::type;
  using Tr = Tile<T>;
  __shared__ __align__(128) T sA[Tr::kBM * Tr::kLdK];
  __shared__ __align__(128) T sB[Tr::kBN * Tr::kLdK];
  __shared__ __align__(128) Acc sS[Tr::kBM * Tr::kLdS];
  __shared__ int64_t sYr[Tr::kBM], sYc[Tr::kBN];
  __shared__ Acc sLr[Tr::kBM], sAr[Tr::kBM], sBr[Tr::kBM], sLc[Tr::kBN], sAc[Tr::kBN], sBc[Tr::kBN];

  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * Tr::kBM;
  const int rows = static_cast<int>(n - r0 < Tr::kBM ? n - r0 : Tr::kBM);
  if (threadIdx.x < rows) {
    const int64_t k = r0 + threadIdx.x;
    sYr[threadIdx.x] = yr[k];
    sLr[threadIdx.x] = lse_r[k];
    sAr[threadIdx.x] = a_r[k];
    sBr[threadIdx.x] = b_r[k];
  }
  for (int64_t c0 = 0; c0 < n_all; c0 += Tr::kBN) {
    if (threadIdx.x < Tr::kBN) {
      const int64_t j = c0 + threadIdx.x;
      const bool in = j < n_all;
      sYc[threadIdx.x] = in ? yc[j] : 0;
      sLc[threadIdx.x] = in ? lse_c[j] : Acc(0);
      sAc[threadIdx.x] = in ? a_c[j] : Acc(0);
      sBc[threadIdx.x] = in ? b_c[j] : Acc(0);
    }
    score_tile<T, Acc>(zr, n, zc, n_all, dim, r0, c0, sA, sB, sS);
    // G_kj + G_jk = kappa_kj (a_k p_kj + a_j p_jk - (b_k + b_j) M_kj), in place of s_kj.
    for (int e = threadIdx.x; e < Tr::kBM * Tr::kBN; e += kThreads) {
      const int i = e / Tr::kBN, j = e % Tr::kBN;
      const int64_t gj = c0 + j;
      Acc g = 0;
      if (i < rows && gj < n_all && gj != row_offset + r0 + i) {
        const Acc s = sS[i * Tr::kLdS + j];
        const bool pos = sYr[i] == sYc[j];
        const Acc v = logit(s, pos, margin, temperature);
        g = sAr[i] * acc_exp(v - sLr[i]) + sAc[j] * acc_exp(v - sLc[j]) - (pos ? sBr[i] + sBc[j] : Acc(0));
        if (pos && s + margin > Acc(1)) g = 0;  // clipped positive: no gradient (at equality it passes)
      }
      sS[i * Tr::kLdS + j] = g;
    }
    // dz[r0 + i, d] += sum_j G[i][j] zc[c0 + j, d], features in chunks of kBK through sB.
    for (int64_t d0 = 0; d0 < dim; d0 += Tr::kBK) {
      __syncthreads();  // G complete; previous chunk consumed
      load_chunk(sB, zc, c0, Tr::kBN, n_all, dim, d0);
      __syncthreads();
      for (int e = threadIdx.x; e < Tr::kBM * Tr::kBK; e += kThreads) {
        const int i = e / Tr::kBK, d = e % Tr::kBK;
        if (i < rows && d0 + d < dim) {
          Acc acc = 0;
          for (int j = 0; j < Tr::kBN; ++j) acc += sS[i * Tr::kLdS + j] * to_acc<Acc>(sB[j * Tr::kLdK + d]);
          dz[(r0 + i) * dim + d0 + d] += acc;  // rows owned by this CTA only
        }
      }
    }
    // score_tile of the next tile starts with a barrier before it overwrites sA, sB, sS.
  }
}

template <typename T>
cudaError_t launch_forward(const void* zr, const int64_t* yr, const void* zc, const int64_t* yc, int64_t n,
                           int64_t n_all, int64_t dim, int64_t row_offset, double temperature, double margin,
                           void* loss, void* lse, int32_t* num_pos, int32_t* num_clipped, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + Tile<T>::kBM - 1) / Tile<T>::kBM;
  supcon_forward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(zr), yr, static_cast<const T*>(zc), yc, n, n_all, dim, row_offset,
      static_cast<Acc>(temperature), static_cast<Acc>(margin), static_cast<Acc*>(loss), static_cast<Acc*>(lse),
      num_pos, num_clipped);
  return launch_status();
}

template <typename T>
cudaError_t launch_backward(const void* zr, const int64_t* yr, const void* zc, const int64_t* yc, int64_t n,
                            int64_t n_all, int64_t dim, int64_t row_offset, const void* lse_r, const void* a_r,
                            const void* b_r, const void* lse_c, const void* a_c, const void* b_c, double temperature,
                            double margin, void* dz, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  if (n == 0) return cudaSuccess;
  cudaError_t err = cudaMemsetAsync(dz, 0, static_cast<size_t>(n) * static_cast<size_t>(dim) * sizeof(Acc), stream);
  if (err != cudaSuccess) return err;
  const int64_t blocks = (n + Tile<T>::kBM - 1) / Tile<T>::kBM;
  supcon_backward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(zr), yr, static_cast<const T*>(zc), yc, n, n_all, dim, row_offset,
      static_cast<const Acc*>(lse_r), static_cast<const Acc*>(a_r), static_cast<const Acc*>(b_r),
      static_cast<const Acc*>(lse_c), static_cast<const Acc*>(a_c), static_cast<const Acc*>(b_c),
      static_cast<Acc>(temperature), static_cast<Acc>(margin), static_cast<Acc*>(dz));
  return launch_status();
}

}  // namespace

cudaError_t supcon_forward(DType dtype, const void* zr, const int64_t* yr, const void* zc, const int64_t* yc,
                           int64_t n, int64_t n_all, int64_t dim, int64_t row_offset, double temperature,
                           double margin, void* loss, void* lse, int32_t* num_pos, int32_t* num_clipped,
                           cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_forward<float>(zr, yr, zc, yc, n, n_all, dim, row_offset, temperature, margin, loss, lse,
                                   num_pos, num_clipped, stream);
    case DType::kFloat64:
      return launch_forward<double>(zr, yr, zc, yc, n, n_all, dim, row_offset, temperature, margin, loss, lse,
                                    num_pos, num_clipped, stream);
    case DType::kFloat16:
      return launch_forward<__half>(zr, yr, zc, yc, n, n_all, dim, row_offset, temperature, margin, loss, lse,
                                    num_pos, num_clipped, stream);
    case DType::kBFloat16:
      return launch_forward<__nv_bfloat16>(zr, yr, zc, yc, n, n_all, dim, row_offset, temperature, margin, loss,
                                           lse, num_pos, num_clipped, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t supcon_backward(DType dtype, const void* zr, const int64_t* yr, const void* zc, const int64_t* yc,
                            int64_t n, int64_t n_all, int64_t dim, int64_t row_offset, const void* lse_r,
                            const void* a_r, const void* b_r, const void* lse_c, const void* a_c, const void* b_c,
                            double temperature, double margin, void* dz, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_backward<float>(zr, yr, zc, yc, n, n_all, dim, row_offset, lse_r, a_r, b_r, lse_c, a_c, b_c,
                                    temperature, margin, dz, stream);
    case DType::kFloat64:
      return launch_backward<double>(zr, yr, zc, yc, n, n_all, dim, row_offset, lse_r, a_r, b_r, lse_c, a_c, b_c,
                                     temperature, margin, dz, stream);
    case DType::kFloat16:
      return launch_backward<__half>(zr, yr, zc, yc, n, n_all, dim, row_offset, lse_r, a_r, b_r, lse_c, a_c, b_c,
                                     temperature, margin, dz, stream);
    case DType::kBFloat16:
      return launch_backward<__nv_bfloat16>(zr, yr, zc, yc, n, n_all, dim, row_offset, lse_r, a_r, b_r, lse_c, a_c,
                                            b_c, temperature, margin, dz, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace ffkern
