// CUDA kernels of the marginal SupCon loss (SPEC 1.2 and 1.3). Plain CUDA: no torch headers.
//
// Tiled like FlashAttention. One CTA owns 64 anchor rows and sweeps all rows in tiles of 64
// columns; a tile of similarities s_ij never leaves the chip: memory is O(N*D), no N x N buffer.
//   forward : per anchor an online logsumexp (running max and rescaled sum) plus |P(i)|, the
//             clipped count and the sum of positive logits.
//   backward: the symmetric pair term G_kj + G_jk of SPEC 1.3 needs only per-row statistics, so
//             the CTA owns dz for its rows and accumulates dz += G_tile @ z_tile tile by tile in
//             registers: no atomics, no cross-CTA reduction, one fixed order (bitwise reproducible),
//             and every element of dz written once.
//
// Logits in base 2: w_ij = t_ij * K with K = log2(e)/tau, so a pair's exponential is one FFMA and
// one MUFU.EX2 (the shift of the online max folded into the FFMA), and no pair divides by tau.
//
// Two implementations:
//   mma  (float16 / bfloat16 on sm_80+): mma.sync m16n8k16 tensor cores with fp32 accumulation for
//        s = z_r z_c^T and for the backward's G @ z_c; operands staged by 16-byte cp.async into
//        padded shared memory (rows 16 bytes apart modulo 128: ldmatrix and the stores are free of
//        bank conflicts) and double-buffered, so the next tile loads while this one is computed.
//        A warp owns 16 anchor rows; s, G and dz stay in the mma accumulator layout, where a
//        thread holds 2 rows x 16 columns of each tile: row statistics are per-thread partial
//        sums, combined once at the end over the 4 threads of a row (two shuffles), and the
//        fp32 G tile becomes the A operand of the second product without passing through memory.
//        Only the tiles that hold self-pairs and the ragged last tile evaluate masks.
//        Backward takes one exponential per pair when all row statistics lie in a window where
//        it is exact (see BwdParams), two otherwise.
//   simt (float32 / float64, and 16-bit inputs on older GPUs): fp32/fp64 FMA from shared memory.
//        fp32 stays IEEE (the "cpp" backend's fp32 contract: no TF32), so these kernels are bound
//        by 2*D FMAs per pair, which no reshuffling of the softmax changes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "device_utils.cuh"
#include "ffkern_cuda.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FFKERN_MMA_ARCH 1
#else
#define FFKERN_MMA_ARCH 0
#endif

namespace ffkern {
namespace cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// ============================================================== sm_80+ primitives (inline PTX)

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; with full == false the 16 bytes are zero-filled and
// nothing is read (src must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool full) {
#if FFKERN_MMA_ARCH
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(full ? 16 : 0)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if FFKERN_MMA_ARCH
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if FFKERN_MMA_ARCH
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i returns
// matrix i with lane l holding row l/4, columns 2(l%4), 2(l%4)+1 (transposed with .trans).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
#if FFKERN_MMA_ARCH
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
#if FFKERN_MMA_ARCH
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
#endif
}

// d += a (16x16, row-major) * b (16x8, column-major), fp32 accumulators. Fragments (g = lane/4,
// c = 2*(lane%4)): a0 (g, c..c+1), a1 (g+8, c..), a2 (g, c+8..), a3 (g+8, c+8..); b0 (k c..c+1,
// n g), b1 (k c+8.., n g); d0, d1 (g, c..c+1), d2, d3 (g+8, c..c+1).
template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if FFKERN_MMA_ARCH
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  // (lo, hi) rounded into one operand register, lo in the low half (the lower column index).
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if FFKERN_MMA_ARCH
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};

// ================================================================== mma kernels (fp16 / bf16)

// DP = 64 or 128: whole rows (zero-padded to DP features) live in shared memory, the anchors' A
// fragments in registers for the whole sweep, and the next column tile is prefetched while this
// one is computed. DP = 0 (D > 128): features stream through shared memory in chunks of 64, and
// the backward's output features are split over gridDim.y blocks of 128 columns.
template <int DP>
struct MmaTile {
  static constexpr int kBM = 64, kBN = 64;
  static constexpr bool kResident = DP > 0;
  static constexpr int kW = kResident ? DP : 64;  // features per staged row
  static constexpr int kLd = kW + 8;              // +16 bytes: consecutive rows 4 banks apart
  static constexpr int kSteps = kW / 16;          // k16 steps per staged tile
  static constexpr int kOut = kResident ? DP : 128;  // backward: dz features per CTA
  static constexpr int kLdV = kOut + 8;
};

// The element-copy fallback of stage_rows (rows not 16-byte aligned), kept out of line so that it
// does not sit in the body of the tile loops.
template <int W, int LD, typename T>
__device__ __noinline__ void copy_rows(T* dst, const T* __restrict__ src, int64_t row0, int64_t total, int64_t dim,
                                       int64_t k0) {
  for (int e = threadIdx.x; e < 64 * W; e += kThreads) {
    const int r = e / W, k = e % W;
    const int64_t gr = row0 + r, gk = k0 + k;
    dst[r * LD + k] = (gr < total && gk < dim) ? src[gr * dim + gk] : zero_of<T>();
  }
}

// Rows row0..row0+63, features k0..k0+W-1 of src [total, dim] into dst [64][LD], zero outside the
// matrix. vec (dim % 8 == 0 and 16-byte aligned rows): 16-byte cp.async, completed by
// cp_async_wait; otherwise element copies, complete on return.
template <int W, int LD, typename T>
__device__ __forceinline__ void stage_rows(T* dst, const T* __restrict__ src, int64_t row0, int64_t total,
                                           int64_t dim, int64_t k0, bool vec) {
  constexpr int kChunks = W / 8;                 // 16-byte chunks per row
  constexpr int kRowsPerPass = kThreads / kChunks;
  if (vec) {
    const int c = threadIdx.x % kChunks, r_first = threadIdx.x / kChunks;
    const int64_t gk = k0 + c * 8;
    const bool k_in = gk < dim;  // dim % 8 == 0: a chunk is wholly inside or wholly outside
#pragma unroll
    for (int i = 0; i < 64 / kRowsPerPass; ++i) {
      const int r = r_first + i * kRowsPerPass;
      const int64_t gr = row0 + r;
      const bool in = k_in && gr < total;
      cp_async_16(dst + r * LD + c * 8, in ? src + gr * dim + gk : src, in);
    }
  } else {
    copy_rows<W, LD>(dst, src, row0, total, dim, k0);
  }
}

// Lane roles in the mma layout.
struct Lane {
  int warp, lane, g, tig, mi, mr;
  __device__ __forceinline__ Lane() {
    warp = threadIdx.x >> 5;
    lane = threadIdx.x & 31;
    g = lane >> 2;
    tig = lane & 3;
    mi = lane >> 3;  // ldmatrix: which 8x8 matrix this lane addresses
    mr = lane & 7;   // and which of its rows
  }
};

// acc[nt] (16 anchors of this warp x columns 8nt..8nt+7) += A * B^T over the kSteps k16 steps of
// one staged tile: A from registers (a) or staged rows (sA), B = staged column rows sB.
template <typename T, int STEPS, int LD>
__device__ __forceinline__ void mma_scores(float (&acc)[8][4], const uint32_t (&a)[STEPS][4], const T* sB,
                                           const Lane& ln) {
#pragma unroll
  for (int ks = 0; ks < STEPS; ++ks) {
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b[4];
      ldsm_x4(b, sB + (np * 16 + (ln.mi >> 1) * 8 + ln.mr) * LD + ks * 16 + (ln.mi & 1) * 8);
      Mma<T>::run(acc[2 * np], a[ks], b[0], b[1]);
      Mma<T>::run(acc[2 * np + 1], a[ks], b[2], b[3]);
    }
  }
}

template <typename T, int STEPS, int LD>
__device__ __forceinline__ void load_a_frags(uint32_t (&a)[STEPS][4], const T* sA, const Lane& ln) {
#pragma unroll
  for (int ks = 0; ks < STEPS; ++ks) {
    ldsm_x4(a[ks], sA + (ln.warp * 16 + (ln.mi & 1) * 8 + ln.mr) * LD + ks * 16 + (ln.mi >> 1) * 8);
  }
}

// Sweep order: interior tiles [0, d_lo), the tiles holding this block's self-pairs [d_lo, d_hi),
// interior [d_hi, full), the ragged tail [full, tiles). Interior tiles need no mask.
struct Sweep {
  int64_t tiles, full, d_lo, d_hi;
  __device__ __forceinline__ Sweep(int64_t n_all, int64_t first_self, int rows) {
    tiles = (n_all + 63) / 64;
    full = n_all / 64;
    d_lo = min(first_self / 64, full);
    d_hi = min((first_self + rows - 1) / 64 + 1, full);
    if (d_hi < d_lo) d_hi = d_lo;
  }
};

// ---------------------------------------------------------------------------- forward (mma)

struct FwdRows {  // per thread: its two anchor rows g and g+8 of the warp, over its 16 columns
  int64_t y[2], self[2];
  float m[2], sum[2], pos_t[2];  // running max of t, sum of 2^(tK - mK), sum of positive t
  int np[2], nc[2];
};

// Folds one tile of scores (acc) into the row statistics. MASKED: the tile may hold self-pairs
// or columns past n_all.
template <bool MASKED>
__device__ __forceinline__ void fwd_fold(FwdRows& st, float (&acc)[8][4], const int64_t* sY, int64_t c0,
                                         int64_t n_all, float k2, float margin, const Lane& ln) {
  float tmax[2] = {neg_inf<float>(), neg_inf<float>()};
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const longlong2 yy = *reinterpret_cast<const longlong2*>(sY + nt * 8 + 2 * ln.tig);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e >> 1;
      const int64_t yj = (e & 1) ? yy.y : yy.x;
      const float s = acc[nt][e];
      const float sm = s + margin;
      bool pos = yj == st.y[h];
      float t = pos ? clip_one(sm) : s;  // t_ij of SPEC 1.2 step 3
      if (MASKED) {
        const int64_t col = c0 + nt * 8 + 2 * ln.tig + (e & 1);
        const bool valid = col < n_all && col != st.self[h];
        pos = pos && valid;
        t = valid ? t : neg_inf<float>();
      }
      acc[nt][e] = t;
      tmax[h] = fmaxf(tmax[h], t);
      st.pos_t[h] += pos ? t : 0.0f;
      st.np[h] += pos ? 1 : 0;
      st.nc[h] += (pos && sm >= 1.0f) ? 1 : 0;  // SPEC 1.4: s + m >= 1 counts as clipped
    }
  }
  float shift[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float m_new = fmaxf(st.m[h], tmax[h]);
    const float m_ref = m_new == neg_inf<float>() ? 0.0f : m_new;  // no valid column yet: keep 2^x finite
    st.sum[h] *= acc_exp2((st.m[h] - m_ref) * k2);
    st.m[h] = m_new;
    shift[h] = m_ref * k2;
  }
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) st.sum[e >> 1] += acc_exp2(fmaf(acc[nt][e], k2, -shift[e >> 1]));
  }
}

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 2)
    supcon_forward_mma(const T* __restrict__ zr, const int64_t* __restrict__ yr, const T* __restrict__ zc,
                       const int64_t* __restrict__ yc, int64_t n, int64_t n_all, int64_t dim, int64_t row_offset,
                       float k2, float margin, float inv_tau, bool vec, float* __restrict__ loss,
                       float* __restrict__ lse, int32_t* __restrict__ num_pos, int32_t* __restrict__ num_clipped) {
#if FFKERN_MMA_ARCH
  using C = MmaTile<DP>;
  constexpr int kTile = C::kBN * C::kLd;
  __shared__ __align__(128) T sB[2][kTile];                   // column tiles (resident: double buffer)
  __shared__ __align__(128) T sA[C::kResident ? 8 : kTile];   // stream: the anchors' feature chunk
  __shared__ __align__(16) int64_t sY[2][C::kBN];
  const Lane ln;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * C::kBM;
  const int rows = static_cast<int>(n - r0 < C::kBM ? n - r0 : C::kBM);
  FwdRows st;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int lr = ln.warp * 16 + ln.g + 8 * h;
    st.y[h] = lr < rows ? yr[r0 + lr] : 0;
    st.self[h] = row_offset + r0 + lr;
    st.m[h] = neg_inf<float>();
    st.sum[h] = st.pos_t[h] = 0.0f;
    st.np[h] = st.nc[h] = 0;
  }
  const Sweep sw(n_all, row_offset + r0, rows);
  uint32_t afrag[C::kSteps][4];

  if constexpr (C::kResident) {
    // prologue: anchors through sB[1] into registers, tile 0 into sB[0]
    stage_rows<C::kW, C::kLd>(sB[1], zr, r0, n, dim, 0, vec);
    stage_rows<C::kW, C::kLd>(sB[0], zc, 0, n_all, dim, 0, vec);
    cp_async_commit();
    if (threadIdx.x < C::kBN) sY[0][threadIdx.x] = threadIdx.x < n_all ? yc[threadIdx.x] : 0;
    cp_async_wait<0>();
    __syncthreads();
    load_a_frags<T, C::kSteps, C::kLd>(afrag, sB[1], ln);
    __syncthreads();
  }

  auto step = [&](int64_t t, auto masked) {
    constexpr bool kMasked = decltype(masked)::value;
    const int64_t c0 = t * C::kBN;
    float acc[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
    if constexpr (C::kResident) {
      const int buf = static_cast<int>(t & 1);
      const bool more = t + 1 < sw.tiles;
      int64_t y_next = 0;
      if (more) {  // next tile in flight while this one is computed
        stage_rows<C::kW, C::kLd>(sB[buf ^ 1], zc, c0 + C::kBN, n_all, dim, 0, vec);
        if (threadIdx.x < C::kBN && c0 + C::kBN + threadIdx.x < n_all) y_next = yc[c0 + C::kBN + threadIdx.x];
      }
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      mma_scores<T, C::kSteps, C::kLd>(acc, afrag, sB[buf], ln);
      fwd_fold<kMasked>(st, acc, sY[buf], c0, n_all, k2, margin, ln);
      if (more && threadIdx.x < C::kBN) sY[buf ^ 1][threadIdx.x] = y_next;
      __syncthreads();
    } else {
      if (threadIdx.x < C::kBN) sY[0][threadIdx.x] = c0 + threadIdx.x < n_all ? yc[c0 + threadIdx.x] : 0;
      for (int64_t k0 = 0; k0 < dim; k0 += C::kW) {
        stage_rows<C::kW, C::kLd>(sA, zr, r0, n, dim, k0, vec);
        stage_rows<C::kW, C::kLd>(sB[0], zc, c0, n_all, dim, k0, vec);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        load_a_frags<T, C::kSteps, C::kLd>(afrag, sA, ln);
        mma_scores<T, C::kSteps, C::kLd>(acc, afrag, sB[0], ln);
        __syncthreads();
      }
      if (dim == 0) __syncthreads();  // sY published even without a feature chunk
      fwd_fold<kMasked>(st, acc, sY[0], c0, n_all, k2, margin, ln);
      __syncthreads();
    }
  };
  int64_t t = 0;
  for (; t < sw.d_lo; ++t) step(t, std::false_type{});
  for (; t < sw.d_hi; ++t) step(t, std::true_type{});
  for (; t < sw.full; ++t) step(t, std::false_type{});
  for (; t < sw.tiles; ++t) step(t, std::true_type{});

  // the four threads of a row hold disjoint column subsets: merge (fixed butterfly, commutative
  // operations only, so all four get the same bits)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float m = st.m[h], sum = st.sum[h], pt = st.pos_t[h];
    int np = st.np[h], nc = st.nc[h];
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      const float mo = __shfl_xor_sync(0xffffffffu, m, off), so = __shfl_xor_sync(0xffffffffu, sum, off);
      pt += __shfl_xor_sync(0xffffffffu, pt, off);
      np += __shfl_xor_sync(0xffffffffu, np, off);
      nc += __shfl_xor_sync(0xffffffffu, nc, off);
      const float mn = fmaxf(m, mo), m_ref = mn == neg_inf<float>() ? 0.0f : mn;
      sum = sum * acc_exp2((m - m_ref) * k2) + so * acc_exp2((mo - m_ref) * k2);
      m = mn;
    }
    const int lr = ln.warp * 16 + ln.g + 8 * h;
    if (ln.tig == 0 && lr < rows) {
      const float m_ref = m == neg_inf<float>() ? 0.0f : m;
      const float l_se = (m_ref * k2 + acc_log2(sum)) * static_cast<float>(kLn2);  // -inf: no pair
      const int64_t row = r0 + lr;
      lse[row] = l_se;
      loss[row] = np > 0 ? l_se - pt * inv_tau / static_cast<float>(np) : 0.0f;
      num_pos[row] = np;
      num_clipped[row] = nc;
    }
  }
#else
  __trap();  // never launched: the launcher checks the kernel's architecture (mma_kernels_usable)
#endif
}

// --------------------------------------------------------------------------- backward (mma)

// Set by bwd_params_kernel for the whole batch (all row and column statistics):
//   window: 1/2 (max L + min L) when every L = lse log2(e) is finite and max L - min L <= 128,
//           else NaN. Then a_k p_kj + a_j p_jk = 2^(w - window) (alpha_k + alpha_j) with
//           alpha = a 2^(window - L) in [a 2^-64, a 2^64]: one exponential per pair, no overflow
//           (w <= L_k <= window + 64 for statistics of this batch), and an underflow of
//           2^(w - window) below 2^-126 drops only p_kj < 2^-62.
//   scale:  float16 only, a power of two with |scale (G_kj + G_jk)| <= 2^14: the pair weights,
//           about 1/(N^2 tau) under "mean", would flush to zero as fp16 operands; the
//           accumulated dz is multiplied by 1/scale (exact). bfloat16 has fp32's range: 1.
struct BwdParams {
  float window, scale, inv_scale, pad;
};

template <typename Acc>
__global__ void __launch_bounds__(512)
    bwd_params_kernel(const Acc* __restrict__ lse_r, const Acc* __restrict__ a_r, const Acc* __restrict__ b_r,
                      int64_t n, const Acc* __restrict__ lse_c, const Acc* __restrict__ a_c,
                      const Acc* __restrict__ b_c, int64_t n_all, bool fp16, BwdParams* __restrict__ out) {
  // min and max are exact: the result does not depend on the reduction order
  const float kInf = __int_as_float(0x7f800000);
  __shared__ float red[5][16];
  float lo = kInf, hi = -kInf, amax = 0.0f, bmax = 0.0f, bad = 0.0f;
  const float log2e = static_cast<float>(kLog2e);
  for (int64_t i = threadIdx.x; i < n + n_all; i += blockDim.x) {
    const bool r = i < n;
    const int64_t k = r ? i : i - n;
    const float l2 = static_cast<float>(r ? lse_r[k] : lse_c[k]) * log2e;
    const float a = fabsf(static_cast<float>(r ? a_r[k] : a_c[k]));
    const float b = fabsf(static_cast<float>(r ? b_r[k] : b_c[k]));
    if (!(fabsf(l2) < kInf && a < kInf && b < kInf)) bad = 1.0f;  // inf or NaN
    lo = fminf(lo, l2);
    hi = fmaxf(hi, l2);
    amax = fmaxf(amax, a);
    bmax = fmaxf(bmax, b);
  }
  for (int off = 16; off > 0; off >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, off));
    bad = fmaxf(bad, __shfl_xor_sync(0xffffffffu, bad, off));
  }
  const int warps = static_cast<int>(blockDim.x >> 5), w = static_cast<int>(threadIdx.x >> 5);
  if ((threadIdx.x & 31) == 0) {
    red[0][w] = lo;
    red[1][w] = hi;
    red[2][w] = amax;
    red[3][w] = bmax;
    red[4][w] = bad;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int i = 1; i < warps; ++i) {
    lo = fminf(lo, red[0][i]);
    hi = fmaxf(hi, red[1][i]);
    amax = fmaxf(amax, red[2][i]);
    bmax = fmaxf(bmax, red[3][i]);
    bad = fmaxf(bad, red[4][i]);
  }
  float scale = 1.0f;
  const float bound = 2.0f * (amax + bmax);  // >= |G_kj + G_jk|, since p <= 1
  if (fp16 && bad == 0.0f && bound > 0.0f && bound < kInf) {
    int e;
    frexpf(bound, &e);  // bound <= 2^e
    scale = ldexpf(1.0f, max(-126, min(127, 14 - e)));
  }
  // alpha <= scale a 2^64 must stay finite
  const bool window = bad == 0.0f && hi - lo <= 128.0f && amax * scale < 0x1p60f;
  out->window = window ? 0.5f * (lo + hi) : __int_as_float(0x7fc00000);
  out->scale = scale;
  out->inv_scale = 1.0f / scale;
  out->pad = 0.0f;
}

struct BwdRows {
  int64_t y[2], self[2];
  float a[2], b[2], l2[2];  // one-exp: a = scale alpha_k; two-exp: scale a_k and L_k = lse_k log2(e)
};

// G_kj + G_jk for one tile, in place of the scores, then dz += G @ z_j (tensor cores, G rounded to
// the operand type). sAB[j] = (alpha_j or a_j, b_j), both scaled; sL[j] = L_j (two-exp only).
template <typename T, bool MASKED, bool ONE_EXP, int OUT, int LDV>
__device__ __forceinline__ void bwd_tile(const BwdRows& st, float (&acc)[8][4], float (&dz)[OUT / 8][4],
                                         const int64_t* sY, const float2* sAB, const float* sL, const T* sV,
                                         int64_t c0, int64_t n_all, float k2, float margin, float window,
                                         const Lane& ln) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const int j0 = nt * 8 + 2 * ln.tig;
    const longlong2 yy = *reinterpret_cast<const longlong2*>(sY + j0);
    const float4 ab = *reinterpret_cast<const float4*>(sAB + j0);
    float2 lj = make_float2(0.0f, 0.0f);
    if (!ONE_EXP) lj = *reinterpret_cast<const float2*>(sL + j0);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int h = e >> 1;
      const bool odd = e & 1;
      const int64_t yj = odd ? yy.y : yy.x;
      const float aj = odd ? ab.z : ab.x, bj = odd ? ab.w : ab.y;
      const float s = acc[nt][e];
      const float sm = s + margin;
      const bool pos = yj == st.y[h];
      const float t = pos ? sm : s;  // a clipped positive (sm > 1) is zeroed below
      const float nb = pos ? -(st.b[h] + bj) : 0.0f;
      float g;
      if (ONE_EXP) {
        g = fmaf(acc_exp2(fmaf(t, k2, -window)), st.a[h] + aj, nb);
      } else {
        const float w = t * k2;
        g = fmaf(acc_exp2(w - st.l2[h]), st.a[h], fmaf(acc_exp2(w - (odd ? lj.y : lj.x)), aj, nb));
      }
      bool zero = pos && sm > 1.0f;  // kappa = 0: a clipped positive passes no gradient
      if (MASKED) {
        const int64_t col = c0 + j0 + odd;
        zero = zero || col >= n_all || col == st.self[h];
      }
      acc[nt][e] = zero ? 0.0f : g;
    }
  }
  // the accumulator layout of two adjacent n8 tiles is the A fragment of one k16 step
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t a[4] = {Mma<T>::pack(acc[2 * kk][0], acc[2 * kk][1]), Mma<T>::pack(acc[2 * kk][2], acc[2 * kk][3]),
                           Mma<T>::pack(acc[2 * kk + 1][0], acc[2 * kk + 1][1]),
                           Mma<T>::pack(acc[2 * kk + 1][2], acc[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < OUT / 16; ++dp) {
      uint32_t b[4];
      ldsm_x4_trans(b, sV + (kk * 16 + (ln.mi & 1) * 8 + ln.mr) * LDV + dp * 16 + (ln.mi >> 1) * 8);
      Mma<T>::run(dz[2 * dp], a, b[0], b[1]);
      Mma<T>::run(dz[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// Column statistics of one tile, as the pair loop reads them (column c0 + threadIdx.x < 64).
struct ColStat {
  int64_t y;
  float a, b, l2;
};
template <bool ONE_EXP>
__device__ __forceinline__ ColStat col_stat(int64_t col, int64_t n_all, const int64_t* __restrict__ yc,
                                            const float* __restrict__ lse_c, const float* __restrict__ a_c,
                                            const float* __restrict__ b_c, const BwdParams& p) {
  ColStat c{0, 0.0f, 0.0f, 0.0f};
  if (col < n_all) {
    c.y = yc[col];
    c.l2 = lse_c[col] * static_cast<float>(kLog2e);
    c.a = a_c[col] * p.scale;
    if (ONE_EXP) c.a *= acc_exp2(p.window - c.l2);
    c.b = b_c[col] * p.scale;
  }
  return c;
}

template <typename T, int DP, bool ONE_EXP>
__device__ __forceinline__ void bwd_sweep(const T* __restrict__ zr, const T* __restrict__ zc,
                                          const int64_t* __restrict__ yc, const float* __restrict__ lse_c,
                                          const float* __restrict__ a_c, const float* __restrict__ b_c, int64_t n,
                                          int64_t n_all, int64_t dim, int64_t r0, int64_t d0, const Sweep& sw,
                                          const BwdRows& st, float k2, float margin, const BwdParams& p, bool vec,
                                          T (*sB)[MmaTile<DP>::kBN * MmaTile<DP>::kLd], T* sA, T* sV,
                                          int64_t (*sY)[64], float2 (*sAB)[64], float (*sL)[64],
                                          float (&dz)[MmaTile<DP>::kOut / 8][4], const Lane& ln) {
  using C = MmaTile<DP>;
  uint32_t afrag[C::kSteps][4];
  auto publish = [&](int buf, const ColStat& c) {
    sY[buf][threadIdx.x] = c.y;
    sAB[buf][threadIdx.x] = make_float2(c.a, c.b);
    sL[buf][threadIdx.x] = c.l2;
  };
  if constexpr (C::kResident) {
    stage_rows<C::kW, C::kLd>(sB[1], zr, r0, n, dim, 0, vec);
    stage_rows<C::kW, C::kLd>(sB[0], zc, 0, n_all, dim, 0, vec);
    cp_async_commit();
    if (threadIdx.x < C::kBN) publish(0, col_stat<ONE_EXP>(threadIdx.x, n_all, yc, lse_c, a_c, b_c, p));
    cp_async_wait<0>();
    __syncthreads();
    load_a_frags<T, C::kSteps, C::kLd>(afrag, sB[1], ln);
    __syncthreads();
  }
  auto step = [&](int64_t t, auto masked) {
    constexpr bool kMasked = decltype(masked)::value;
    const int64_t c0 = t * C::kBN;
    float acc[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
    if constexpr (C::kResident) {
      const int buf = static_cast<int>(t & 1);
      const bool more = t + 1 < sw.tiles;
      ColStat next{0, 0.0f, 0.0f, 0.0f};
      if (more) {
        stage_rows<C::kW, C::kLd>(sB[buf ^ 1], zc, c0 + C::kBN, n_all, dim, 0, vec);
        if (threadIdx.x < C::kBN) next = col_stat<ONE_EXP>(c0 + C::kBN + threadIdx.x, n_all, yc, lse_c, a_c, b_c, p);
      }
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      mma_scores<T, C::kSteps, C::kLd>(acc, afrag, sB[buf], ln);
      bwd_tile<T, kMasked, ONE_EXP, C::kOut, C::kLd>(st, acc, dz, sY[buf], sAB[buf], sL[buf], sB[buf], c0, n_all,
                                                     k2, margin, p.window, ln);
      if (more && threadIdx.x < C::kBN) publish(buf ^ 1, next);
      __syncthreads();
    } else {
      if (threadIdx.x < C::kBN) publish(0, col_stat<ONE_EXP>(c0 + threadIdx.x, n_all, yc, lse_c, a_c, b_c, p));
      for (int64_t k0 = 0; k0 < dim; k0 += C::kW) {
        stage_rows<C::kW, C::kLd>(sA, zr, r0, n, dim, k0, vec);
        stage_rows<C::kW, C::kLd>(sB[0], zc, c0, n_all, dim, k0, vec);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        load_a_frags<T, C::kSteps, C::kLd>(afrag, sA, ln);
        mma_scores<T, C::kSteps, C::kLd>(acc, afrag, sB[0], ln);
        __syncthreads();
      }
      stage_rows<C::kOut, C::kLdV>(sV, zc, c0, n_all, dim, d0, vec);  // z_j for this CTA's output features
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      bwd_tile<T, kMasked, ONE_EXP, C::kOut, C::kLdV>(st, acc, dz, sY[0], sAB[0], sL[0], sV, c0, n_all, k2, margin,
                                                      p.window, ln);
      __syncthreads();
    }
  };
  int64_t t = 0;
  for (; t < sw.d_lo; ++t) step(t, std::false_type{});
  for (; t < sw.d_hi; ++t) step(t, std::true_type{});
  for (; t < sw.full; ++t) step(t, std::false_type{});
  for (; t < sw.tiles; ++t) step(t, std::true_type{});
}

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, 2)
    supcon_backward_mma(const T* __restrict__ zr, const int64_t* __restrict__ yr, const T* __restrict__ zc,
                        const int64_t* __restrict__ yc, int64_t n, int64_t n_all, int64_t dim, int64_t row_offset,
                        const float* __restrict__ lse_r, const float* __restrict__ a_r,
                        const float* __restrict__ b_r, const float* __restrict__ lse_c,
                        const float* __restrict__ a_c, const float* __restrict__ b_c, float k2, float margin,
                        const BwdParams* __restrict__ params, bool vec, float* __restrict__ dz_out) {
#if FFKERN_MMA_ARCH
  using C = MmaTile<DP>;
  constexpr int kTile = C::kBN * C::kLd;
  __shared__ __align__(128) T sB[2][kTile];
  __shared__ __align__(128) T sA[C::kResident ? 8 : kTile];
  __shared__ __align__(128) T sV[C::kResident ? 8 : C::kBN * C::kLdV];
  __shared__ __align__(16) int64_t sY[2][64];
  __shared__ __align__(16) float2 sAB[2][64];
  __shared__ __align__(16) float sL[2][64];
  const Lane ln;
  const BwdParams p = *params;
  const bool one_exp = p.window == p.window;  // not NaN
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * C::kBM;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * C::kOut;
  const int rows = static_cast<int>(n - r0 < C::kBM ? n - r0 : C::kBM);
  BwdRows st;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int lr = ln.warp * 16 + ln.g + 8 * h;
    const bool in = lr < rows;
    st.y[h] = in ? yr[r0 + lr] : 0;
    st.self[h] = row_offset + r0 + lr;
    st.l2[h] = in ? lse_r[r0 + lr] * static_cast<float>(kLog2e) : 0.0f;
    st.a[h] = in ? a_r[r0 + lr] * p.scale : 0.0f;
    if (one_exp && in) st.a[h] *= acc_exp2(p.window - st.l2[h]);
    st.b[h] = in ? b_r[r0 + lr] * p.scale : 0.0f;
  }
  const Sweep sw(n_all, row_offset + r0, rows);
  float dz[C::kOut / 8][4];
#pragma unroll
  for (int i = 0; i < C::kOut / 8; ++i) dz[i][0] = dz[i][1] = dz[i][2] = dz[i][3] = 0.0f;
  if (one_exp) {
    bwd_sweep<T, DP, true>(zr, zc, yc, lse_c, a_c, b_c, n, n_all, dim, r0, d0, sw, st, k2, margin, p, vec, sB, sA, sV,
                           sY, sAB, sL, dz, ln);
  } else {
    bwd_sweep<T, DP, false>(zr, zc, yc, lse_c, a_c, b_c, n, n_all, dim, r0, d0, sw, st, k2, margin, p, vec, sB, sA,
                            sV, sY, sAB, sL, dz, ln);
  }
#pragma unroll
  for (int dt = 0; dt < C::kOut / 8; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int lr = ln.warp * 16 + ln.g + 8 * (e >> 1);
      const int64_t d = d0 + dt * 8 + 2 * ln.tig + (e & 1);
      if (lr < rows && d < dim) dz_out[(r0 + lr) * dim + d] = dz[dt][e] * p.inv_scale;
    }
  }
#else
  __trap();  // never launched: the launcher checks the kernel's architecture (mma_kernels_usable)
#endif
}

// ========================================================== SIMT kernels (fp32 / fp64 / < sm_80)

template <typename T>
struct Simt {
  using Acc = typename AccOf<T>::type;
  static constexpr bool kWide = sizeof(Acc) == 8;
  // fp64: smaller tiles keep shared memory under the 48 KiB static limit
  static constexpr int kBM = kWide ? 32 : 64, kBN = kBM, kBK = 32, kLdK = kBK + 1;
  static constexpr int kTPR = kThreads / kBM;  // threads per anchor row in the softmax (2 or 4)
  static constexpr int kCols = kBN / kTPR;     // columns per thread per tile
  // row stride of the score tile: a warp reads rows r and columns sub + kTPR q; with stride
  // kBN + kTPR (in elements) the (row, sub) pairs of a warp hit distinct banks
  static constexpr int kLdS = kBN + kTPR;
  static constexpr int kDO = kWide ? 64 : 128;  // backward: dz features per CTA (gridDim.y blocks)
  static constexpr int kVJ = 16;                // backward: z_j rows per staged chunk
  static constexpr int kLdV = kDO + 1;
};

// Rows row0..row0+rows-1, features k0..k0+kBK-1 of src [total_rows, dim] into dst [rows][kLdK],
// zero-filled outside the matrix.
template <typename T>
__device__ void load_chunk(T* dst, const T* __restrict__ src, int64_t row0, int rows, int64_t total_rows,
                           int64_t dim, int64_t k0) {
  using Tr = Simt<T>;
  for (int e = threadIdx.x; e < rows * Tr::kBK; e += kThreads) {
    const int r = e / Tr::kBK, k = e % Tr::kBK;
    const int64_t gr = row0 + r, gk = k0 + k;
    dst[r * Tr::kLdK + k] = (gr < total_rows && gk < dim) ? src[gr * dim + gk] : zero_of<T>();
  }
}

// sS[i][j] = zr[r0 + i] . zc[c0 + j] for the tile (zero outside the matrices), FMA in Acc.
// Starts and ends with a block-wide barrier, so shared data written before it is visible after it.
template <typename T, typename Acc>
__device__ void score_tile(const T* __restrict__ zr, int64_t n, const T* __restrict__ zc, int64_t n_all,
                           int64_t dim, int64_t r0, int64_t c0, T* sA, T* sB, Acc* sS) {
  using Tr = Simt<T>;
  constexpr int kTR = Tr::kBM / 8, kTC = Tr::kBN / 16;
  const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
  Acc acc[kTR][kTC];
  for (int i = 0; i < kTR; ++i)
    for (int jj = 0; jj < kTC; ++jj) acc[i][jj] = Acc(0);
  __syncthreads();
  for (int64_t k0 = 0; k0 < dim; k0 += Tr::kBK) {
    load_chunk(sA, zr, r0, Tr::kBM, n, dim, k0);
    load_chunk(sB, zc, c0, Tr::kBN, n_all, dim, k0);
    __syncthreads();
#pragma unroll 2
    for (int k = 0; k < Tr::kBK; ++k) {
      Acc a[kTR], b[kTC];
      for (int i = 0; i < kTR; ++i) a[i] = to_acc<Acc>(sA[(tr + 8 * i) * Tr::kLdK + k]);
      for (int jj = 0; jj < kTC; ++jj) b[jj] = to_acc<Acc>(sB[(tc + 16 * jj) * Tr::kLdK + k]);
      for (int i = 0; i < kTR; ++i)
        for (int jj = 0; jj < kTC; ++jj) acc[i][jj] = fma(a[i], b[jj], acc[i][jj]);
    }
    __syncthreads();
  }
  for (int i = 0; i < kTR; ++i)
    for (int jj = 0; jj < kTC; ++jj) sS[(tr + 8 * i) * Tr::kLdS + tc + 16 * jj] = acc[i][jj];
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    supcon_forward_simt(const T* __restrict__ zr, const int64_t* __restrict__ yr, const T* __restrict__ zc,
                        const int64_t* __restrict__ yc, int64_t n, int64_t n_all, int64_t dim, int64_t row_offset,
                        typename AccOf<T>::type k2, typename AccOf<T>::type margin,
                        typename AccOf<T>::type inv_tau, typename AccOf<T>::type* __restrict__ loss,
                        typename AccOf<T>::type* __restrict__ lse, int32_t* __restrict__ num_pos,
                        int32_t* __restrict__ num_clipped) {
  using Acc = typename AccOf<T>::type;
  using Tr = Simt<T>;
  __shared__ __align__(16) T sA[Tr::kBM * Tr::kLdK];
  __shared__ __align__(16) T sB[Tr::kBN * Tr::kLdK];
  __shared__ __align__(16) Acc sS[Tr::kBM * Tr::kLdS];
  __shared__ int64_t sY[Tr::kBN];

  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * Tr::kBM;
  const int i = threadIdx.x / Tr::kTPR, sub = threadIdx.x % Tr::kTPR;  // row i, columns sub + kTPR q
  const int64_t row = r0 + i;
  const bool active = row < n;
  const int64_t yi = active ? yr[row] : 0;
  const int64_t self = row_offset + row;  // global index of the anchor: its own column is skipped
  Acc run_max = neg_inf<Acc>(), run_sum = 0, pos_t = 0;
  int np = 0, nc = 0;

  for (int64_t c0 = 0; c0 < n_all; c0 += Tr::kBN) {
    if (threadIdx.x < Tr::kBN) sY[threadIdx.x] = c0 + threadIdx.x < n_all ? yc[c0 + threadIdx.x] : 0;
    score_tile<T, Acc>(zr, n, zc, n_all, dim, r0, c0, sA, sB, sS);  // its barriers publish sY too
    Acc t[Tr::kCols];
    Acc tile_max = neg_inf<Acc>();
#pragma unroll
    for (int q = 0; q < Tr::kCols; ++q) {  // pass 1: t_ij, tile max, positive statistics
      const int j = sub + Tr::kTPR * q;
      const int64_t col = c0 + j;
      const Acc s = sS[i * Tr::kLdS + j];
      const Acc sm = s + margin;
      const bool valid = col < n_all && col != self;
      const bool pos = valid && sY[j] == yi;
      const Acc v = valid ? (pos ? clip_one(sm) : s) : neg_inf<Acc>();
      t[q] = v;
      tile_max = v > tile_max ? v : tile_max;
      pos_t += pos ? v : Acc(0);
      np += pos ? 1 : 0;
      nc += (pos && sm >= Acc(1)) ? 1 : 0;  // SPEC 1.4: s + m >= 1 counts as clipped
    }
    const Acc new_max = run_max > tile_max ? run_max : tile_max;
    const Acc m_ref = new_max == neg_inf<Acc>() ? Acc(0) : new_max;
    const Acc shift = m_ref * k2;
    Acc add = 0;
#pragma unroll
    for (int q = 0; q < Tr::kCols; ++q) add += acc_exp2(fma(t[q], k2, -shift));  // pass 2
    run_sum = run_sum * acc_exp2((run_max - m_ref) * k2) + add;
    run_max = new_max;
    __syncthreads();  // sY and sS are rewritten for the next tile only after every row is done
  }
  // merge the kTPR threads of a row (adjacent lanes; fixed butterfly, identical bits in each)
  for (int off = 1; off < Tr::kTPR; off <<= 1) {
    const Acc mo = __shfl_xor_sync(0xffffffffu, run_max, off), so = __shfl_xor_sync(0xffffffffu, run_sum, off);
    pos_t += __shfl_xor_sync(0xffffffffu, pos_t, off);
    np += __shfl_xor_sync(0xffffffffu, np, off);
    nc += __shfl_xor_sync(0xffffffffu, nc, off);
    const Acc mn = run_max > mo ? run_max : mo, m_ref = mn == neg_inf<Acc>() ? Acc(0) : mn;
    run_sum = run_sum * acc_exp2((run_max - m_ref) * k2) + so * acc_exp2((mo - m_ref) * k2);
    run_max = mn;
  }
  if (active && sub == 0) {
    const Acc m_ref = run_max == neg_inf<Acc>() ? Acc(0) : run_max;
    const Acc l_se = (m_ref * k2 + acc_log2(run_sum)) * static_cast<Acc>(kLn2);  // -inf for a single row
    lse[row] = l_se;
    loss[row] = np > 0 ? l_se - pos_t * inv_tau / static_cast<Acc>(np) : Acc(0);
    num_pos[row] = np;
    num_clipped[row] = nc;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    supcon_backward_simt(const T* __restrict__ zr, const int64_t* __restrict__ yr, const T* __restrict__ zc,
                         const int64_t* __restrict__ yc, int64_t n, int64_t n_all, int64_t dim, int64_t row_offset,
                         const typename AccOf<T>::type* __restrict__ lse_r,
                         const typename AccOf<T>::type* __restrict__ a_r,
                         const typename AccOf<T>::type* __restrict__ b_r,
                         const typename AccOf<T>::type* __restrict__ lse_c,
                         const typename AccOf<T>::type* __restrict__ a_c,
                         const typename AccOf<T>::type* __restrict__ b_c, typename AccOf<T>::type k2,
                         typename AccOf<T>::type margin, typename AccOf<T>::type* __restrict__ dz_out) {
  using Acc = typename AccOf<T>::type;
  using Tr = Simt<T>;
  constexpr int kChunk = Tr::kBM * Tr::kLdK;  // elements of one staged feature chunk
  static_assert(Tr::kVJ * Tr::kLdV <= 2 * kChunk, "the z_j chunk reuses the score operands' space");
  __shared__ __align__(16) T sAB[2 * kChunk];  // score operands, then the z_j chunks of the product
  __shared__ __align__(16) Acc sS[Tr::kBM * Tr::kLdS];
  __shared__ int64_t sYr[Tr::kBM], sYc[Tr::kBN];
  __shared__ Acc sLr[Tr::kBM], sAr[Tr::kBM], sBr[Tr::kBM], sLc[Tr::kBN], sAc[Tr::kBN], sBc[Tr::kBN];
  T* sA = sAB;
  T* sB = sAB + kChunk;
  T* sV = sAB;

  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * Tr::kBM;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * Tr::kDO;
  const int rows = static_cast<int>(n - r0 < Tr::kBM ? n - r0 : Tr::kBM);
  const Acc log2e = static_cast<Acc>(kLog2e);
  if (threadIdx.x < Tr::kBM) {
    const bool in = threadIdx.x < rows;
    const int64_t k = r0 + threadIdx.x;
    sYr[threadIdx.x] = in ? yr[k] : 0;
    sLr[threadIdx.x] = in ? lse_r[k] * log2e : Acc(0);
    sAr[threadIdx.x] = in ? a_r[k] : Acc(0);
    sBr[threadIdx.x] = in ? b_r[k] : Acc(0);
  }
  // product mapping: thread (tr, tc) owns rows tr + 8i and features d0 + tc + 16q
  constexpr int kPR = Tr::kBM / 8, kPC = Tr::kDO / 16;
  const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
  Acc dz[kPR][kPC];
  for (int i = 0; i < kPR; ++i)
    for (int q = 0; q < kPC; ++q) dz[i][q] = Acc(0);

  for (int64_t c0 = 0; c0 < n_all; c0 += Tr::kBN) {
    if (threadIdx.x < Tr::kBN) {
      const int64_t j = c0 + threadIdx.x;
      const bool in = j < n_all;
      sYc[threadIdx.x] = in ? yc[j] : 0;
      sLc[threadIdx.x] = in ? lse_c[j] * log2e : Acc(0);
      sAc[threadIdx.x] = in ? a_c[j] : Acc(0);
      sBc[threadIdx.x] = in ? b_c[j] : Acc(0);
    }
    score_tile<T, Acc>(zr, n, zc, n_all, dim, r0, c0, sA, sB, sS);
    // G_kj + G_jk = kappa_kj (a_k p_kj + a_j p_jk - (b_k + b_j) M_kj), in place of s_kj
    for (int e = threadIdx.x; e < Tr::kBM * Tr::kBN; e += kThreads) {
      const int i = e / Tr::kBN, j = e % Tr::kBN;
      const int64_t gj = c0 + j;
      Acc g = 0;
      if (i < rows && gj < n_all && gj != row_offset + r0 + i) {
        const Acc s = sS[i * Tr::kLdS + j];
        const Acc sm = s + margin;
        const bool pos = sYr[i] == sYc[j];
        const Acc w = (pos ? clip_one(sm) : s) * k2;
        g = fma(sAr[i], acc_exp2(w - sLr[i]), fma(sAc[j], acc_exp2(w - sLc[j]), pos ? -(sBr[i] + sBc[j]) : Acc(0)));
        if (pos && sm > Acc(1)) g = 0;  // clipped positive: no gradient (at equality it passes)
      }
      sS[i * Tr::kLdS + j] = g;
    }
    // dz[rows, d0 + ...] += G @ z_j, z_j staged kVJ rows at a time in the score operands' space
    for (int j0 = 0; j0 < Tr::kBN; j0 += Tr::kVJ) {
      __syncthreads();  // G complete; the previous chunk (or the score operands) consumed
      for (int e = threadIdx.x; e < Tr::kVJ * Tr::kDO; e += kThreads) {
        const int j = e / Tr::kDO, d = e % Tr::kDO;
        const int64_t gj = c0 + j0 + j, gd = d0 + d;
        sV[j * Tr::kLdV + d] = (gj < n_all && gd < dim) ? zc[gj * dim + gd] : zero_of<T>();
      }
      __syncthreads();
#pragma unroll 4
      for (int j = 0; j < Tr::kVJ; ++j) {
        Acc gv[kPR], zv[kPC];
        for (int i = 0; i < kPR; ++i) gv[i] = sS[(tr + 8 * i) * Tr::kLdS + j0 + j];
        for (int q = 0; q < kPC; ++q) zv[q] = to_acc<Acc>(sV[j * Tr::kLdV + tc + 16 * q]);
        for (int i = 0; i < kPR; ++i)
          for (int q = 0; q < kPC; ++q) dz[i][q] = fma(gv[i], zv[q], dz[i][q]);
      }
    }
    // score_tile of the next tile starts with a barrier before it overwrites sA, sB (sV), sS
  }
  for (int i = 0; i < kPR; ++i) {
    const int lr = tr + 8 * i;
    for (int q = 0; q < kPC; ++q) {
      const int64_t d = d0 + tc + 16 * q;
      if (lr < rows && d < dim) dz_out[(r0 + lr) * dim + d] = dz[i][q];
    }
  }
}

// ================================================================================ launchers

// Whether the mma kernels run here: the image of `kernel` that the current device would run was
// compiled for sm_80+ (a PTX-only build for an older architecture, JIT-compiled on a newer GPU,
// has empty mma kernels). Cached per device.
bool mma_kernels_usable(const void* kernel) {
  static std::atomic<int> cache[64];  // 0 unknown, 1 yes, 2 no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return false;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    cudaFuncAttributes attr;
    const bool ok = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.ptxVersion >= 80;
    cudaGetLastError();  // a failed query must not be reported by the launch that follows
    v = ok ? 1 : 2;
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
constexpr bool kHalfType = sizeof(T) == 2;

// dim <= 64 and <= 128: whole rows resident; wider: streamed feature chunks.
template <typename F>
cudaError_t with_mma_width(int64_t dim, F&& f) {
  if (dim <= 64) return f(std::integral_constant<int, 64>{});
  if (dim <= 128) return f(std::integral_constant<int, 128>{});
  return f(std::integral_constant<int, 0>{});
}

template <typename T>
cudaError_t launch_forward(const void* zr, const int64_t* yr, const void* zc, const int64_t* yc, int64_t n,
                           int64_t n_all, int64_t dim, int64_t row_offset, double temperature, double margin,
                           void* loss, void* lse, int32_t* num_pos, int32_t* num_clipped, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  if (n == 0) return cudaSuccess;
  const T* zr_t = static_cast<const T*>(zr);
  const T* zc_t = static_cast<const T*>(zc);
  const double k2 = kLog2e / temperature;
  if constexpr (kHalfType<T>) {
    const cudaError_t used = with_mma_width(dim, [&](auto width) -> cudaError_t {
      constexpr int DP = decltype(width)::value;
      auto kernel = supcon_forward_mma<T, DP>;
      if (!mma_kernels_usable(reinterpret_cast<const void*>(kernel))) return cudaErrorNotSupported;
      const bool vec = dim % 8 == 0 && aligned16(zr) && aligned16(zc);
      const int64_t blocks = (n + 63) / 64;
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          zr_t, yr, zc_t, yc, n, n_all, dim, row_offset, static_cast<float>(k2), static_cast<float>(margin),
          static_cast<float>(1.0 / temperature), vec, static_cast<float*>(loss), static_cast<float*>(lse), num_pos,
          num_clipped);
      return launch_status();
    });
    if (used != cudaErrorNotSupported) return used;
  }
  const int64_t blocks = (n + Simt<T>::kBM - 1) / Simt<T>::kBM;
  supcon_forward_simt<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      zr_t, yr, zc_t, yc, n, n_all, dim, row_offset, static_cast<Acc>(k2), static_cast<Acc>(margin),
      static_cast<Acc>(1.0 / temperature), static_cast<Acc*>(loss), static_cast<Acc*>(lse), num_pos, num_clipped);
  return launch_status();
}

template <typename T>
cudaError_t launch_backward(const void* zr, const int64_t* yr, const void* zc, const int64_t* yc, int64_t n,
                            int64_t n_all, int64_t dim, int64_t row_offset, const void* lse_r, const void* a_r,
                            const void* b_r, const void* lse_c, const void* a_c, const void* b_c, double temperature,
                            double margin, void* dz, void* scratch, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  if (n == 0 || dim == 0) return cudaSuccess;  // nothing to write
  const T* zr_t = static_cast<const T*>(zr);
  const T* zc_t = static_cast<const T*>(zc);
  const Acc* lr = static_cast<const Acc*>(lse_r);
  const Acc* ar = static_cast<const Acc*>(a_r);
  const Acc* br = static_cast<const Acc*>(b_r);
  const Acc* lc = static_cast<const Acc*>(lse_c);
  const Acc* ac = static_cast<const Acc*>(a_c);
  const Acc* bc = static_cast<const Acc*>(b_c);
  const double k2 = kLog2e / temperature;
  if constexpr (kHalfType<T>) {
    const cudaError_t used = with_mma_width(dim, [&](auto width) -> cudaError_t {
      constexpr int DP = decltype(width)::value;
      auto kernel = supcon_backward_mma<T, DP>;
      if (!mma_kernels_usable(reinterpret_cast<const void*>(kernel))) return cudaErrorNotSupported;
      BwdParams* params = static_cast<BwdParams*>(scratch);
      bwd_params_kernel<float><<<1, 512, 0, stream>>>(lr, ar, br, n, lc, ac, bc, n_all,
                                                       std::is_same<T, __half>::value, params);
      cudaError_t err = launch_status();
      if (err != cudaSuccess) return err;
      const bool vec = dim % 8 == 0 && aligned16(zr) && aligned16(zc);
      const dim3 grid(static_cast<unsigned>((n + 63) / 64),
                      static_cast<unsigned>((dim + MmaTile<DP>::kOut - 1) / MmaTile<DP>::kOut));
      kernel<<<grid, kThreads, 0, stream>>>(zr_t, yr, zc_t, yc, n, n_all, dim, row_offset, lr, ar, br, lc, ac, bc,
                                            static_cast<float>(k2), static_cast<float>(margin), params, vec,
                                            static_cast<float*>(dz));
      return launch_status();
    });
    if (used != cudaErrorNotSupported) return used;
  }
  const dim3 grid(static_cast<unsigned>((n + Simt<T>::kBM - 1) / Simt<T>::kBM),
                  static_cast<unsigned>((dim + Simt<T>::kDO - 1) / Simt<T>::kDO));
  supcon_backward_simt<T><<<grid, kThreads, 0, stream>>>(zr_t, yr, zc_t, yc, n, n_all, dim, row_offset, lr, ar, br,
                                                         lc, ac, bc, static_cast<Acc>(k2), static_cast<Acc>(margin),
                                                         static_cast<Acc*>(dz));
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
                            double temperature, double margin, void* dz, void* scratch, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_backward<float>(zr, yr, zc, yc, n, n_all, dim, row_offset, lse_r, a_r, b_r, lse_c, a_c, b_c,
                                    temperature, margin, dz, scratch, stream);
    case DType::kFloat64:
      return launch_backward<double>(zr, yr, zc, yc, n, n_all, dim, row_offset, lse_r, a_r, b_r, lse_c, a_c, b_c,
                                     temperature, margin, dz, scratch, stream);
    case DType::kFloat16:
      return launch_backward<__half>(zr, yr, zc, yc, n, n_all, dim, row_offset, lse_r, a_r, b_r, lse_c, a_c, b_c,
                                     temperature, margin, dz, scratch, stream);
    case DType::kBFloat16:
      return launch_backward<__nv_bfloat16>(zr, yr, zc, yc, n, n_all, dim, row_offset, lse_r, a_r, b_r, lse_c, a_c,
                                            b_c, temperature, margin, dz, scratch, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace ffkern
