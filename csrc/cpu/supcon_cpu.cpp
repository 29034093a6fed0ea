// CPU kernels of the marginal SupCon loss (SPEC 1.2 and 1.3), registered for the CPU dispatch key.
//
// Work is split over blocks of kRowBlock anchor rows with at::parallel_for. A block sweeps all
// rows in column tiles of kColBlock: one BLAS product gives the fp32 (fp64) tile of similarities
// s_ij, then element loops turn it into what the pass needs. float16/bfloat16 features multiply as
// 16-bit operands where the CPU has units for them, as fp32 otherwise (see Products below). Extra memory is one fixed tile per
// thread (kRowBlock x kColBlock, 1 MiB in float32) on top of the O(N*D) inputs and outputs;
// no N x N buffer is ever formed.
//   forward : online logsumexp over the tiles of each anchor's row (max, then sum of exp against
//             the running max, rescaling the old sum when the max grows), plus |P(i)|, the clipped
//             count and the sum of positive logits.
//   backward: the symmetric pair term G_kj + G_jk needs only per-row statistics of k and j, so a
//             block of rows k owns dz_k and sweeps the column tiles once: tile of G, then
//             dz_k += G @ z_tile (BLAS). No atomics, no reduction over threads.
// Row blocks are fixed by kRowBlock (not by the thread count) and every sum runs in a fixed order,
// so results are bitwise reproducible run to run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "supcon_loops.h"

namespace ffkern {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 256;  // anchor rows per block (larger blocks amortize BLAS packing)

// ---- how the similarity products run ------------------------------------------------------------
//
// float16 / bfloat16 features can be multiplied in two ways, with the same accumulation (fp32) and
// the same fp32 tile of s (a 16-bit s would be far too coarse for exp(s / tau)):
//   kHalfProducts: 16-bit operands straight into BLAS (at::native::cpublas::brgemm with plain,
//                  non-VNNI B; it falls back to cpublas::gemm, i.e. MKL's gemm_bf16bf16f32 /
//                  gemm_f16f16f32), which runs on AMX or AVX512-BF16/FP16 units where the CPU has
//                  them; the backward's G tile is rounded to the 16-bit type for dz += G z_tile.
//   kFloatProducts: the rows converted to fp32 once (exact), fp32 GEMMs. On a CPU without such
//                  units MKL emulates 16-bit products well below its fp32 rate (measured on a 2-core
//                  Xeon exposing AVX-512 VNNI only: bf16 14, fp16 71, fp32 92 GFLOP/s per tile).
// The choice depends on the CPU only (never on timing), so results stay reproducible; the
// environment variable FFKERN_CPU_HALF_PRODUCTS=half|float|auto overrides it (read per call:
// tests and benchmarks compare both paths in one process).
enum class Products { kFloat, kHalf };

bool cpu_has(const char* capability) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(capability);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

Products products_for(at::ScalarType t) {
  if (t != at::kBFloat16 && t != at::kHalf) return Products::kFloat;
  if (const char* env = std::getenv("FFKERN_CPU_HALF_PRODUCTS")) {
    const std::string v(env);
    if (v == "half") return Products::kHalf;
    if (v == "float") return Products::kFloat;
    TORCH_CHECK(v == "auto" || v.empty(), "FFKERN_CPU_HALF_PRODUCTS must be 'half', 'float' or 'auto', got '", v,
                "'");
  }
  // bf16: AMX tiles or AVX512-BF16 dot products; fp16: AMX-FP16 (AVX512-FP16 alone accumulates in
  // fp16, so MKL converts to fp32 there and gains nothing over the float path).
  const bool fast = t == at::kBFloat16 ? (cpu_has("amx_bf16") || cpu_has("avx512_bf16")) : cpu_has("amx_fp16");
  return fast ? Products::kHalf : Products::kFloat;
}

// Benchmark-only knob: FFKERN_CPU_SUPCON_STUB=loops skips the element loops (the GEMMs run alone,
// results are meaningless), so that benchmarks/cpp_cpu_goals.py can split the kernel's time into
// products and element work. Never set by the package.
bool stub_loops() {
  const char* env = std::getenv("FFKERN_CPU_SUPCON_STUB");
  return env != nullptr && std::string(env) == "loops";
}

// C[m, n] (+)= A[m, k] B[k, n], row-major with leading dimensions, fp32 accumulation and output.
// Called from inside at::parallel_for, so BLAS runs single-threaded on this row block.
template <typename T>
void tile_gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, float* c,
               int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
}

// The G tile rounded to 16 bits for the backward product, scaled by an exact power of two (fp16
// only: unscaled, G ~ 1 / (N^2 tau) flushes to zero there; bf16 has fp32's exponent range).
FFKERN_CLONES void round_tile(const float* g, int64_t count, float scale, at::BFloat16* out) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(out);
  for (int64_t i = 0; i < count; ++i) bits[i] = simd::to_bf16_bits(g[i] * scale);
}
FFKERN_CLONES void round_tile(const float* g, int64_t count, float scale, at::Half* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = at::Half(g[i] * scale);
}

// ---- drivers -----------------------------------------------------------------------------------

// Inputs as contiguous tensors of the operand type (the compute type, or the 16-bit input type
// for kHalfProducts), detached: the element loops and BLAS calls run on worker threads, where
// autograd must not see them.
at::Tensor prepare_rows(const at::Tensor& z, Products p) {
  const at::ScalarType t = p == Products::kHalf ? z.scalar_type() : compute_type(z.scalar_type());
  return z.detach().to(t).contiguous();
}
at::Tensor prepare_stat(const at::Tensor& v, at::ScalarType t) { return v.detach().to(t).contiguous(); }

// Labels as int32 for the element loops (same lane width as float32): cast when they fit, else
// replaced by their index among the distinct values of yr and yc (only equality matters).
std::pair<at::Tensor, at::Tensor> prepare_labels(const at::Tensor& yr, const at::Tensor& yc) {
  at::Tensor r = yr.detach().to(at::kLong), c = yc.detach().to(at::kLong);
  const auto fits = [](const at::Tensor& y) {
    return y.numel() == 0 || (y.min().item<int64_t>() >= std::numeric_limits<int32_t>::min() &&
                              y.max().item<int64_t>() <= std::numeric_limits<int32_t>::max());
  };
  if (!fits(r) || !fits(c)) {
    const at::Tensor inverse = std::get<1>(at::_unique(at::cat({r, c}), /*sorted=*/false, /*return_inverse=*/true));
    r = inverse.narrow(0, 0, r.numel());
    c = inverse.narrow(0, r.numel(), c.numel());
  }
  return {r.to(at::kInt).contiguous(), c.to(at::kInt).contiguous()};
}

// The tile of similarities s[rows, cols] = zr[r0 .. r0+rows) . zc[c0 .. c0+cols) into s (type T).
// zcT: all rows transposed, [D, N] contiguous, so that each tile product is a plain (NN) GEMM;
// with the transposed view MKL repacks the column tile on every call (measured ~12% slower).
template <typename T, typename O>
void similarity_tile(const at::Tensor& zr, const at::Tensor& zcT, int64_t r0, int64_t rows, int64_t c0,
                     int64_t cols, at::Tensor& s) {
  if constexpr (std::is_same_v<T, O>) {
    at::mm_out(s, zr.narrow(0, r0, rows), zcT.narrow(1, c0, cols));
  } else {
    const int64_t d = zr.size(1), n_all = zcT.size(1);
    tile_gemm<O>(rows, cols, d, zr.data_ptr<O>() + r0 * d, d, zcT.data_ptr<O>() + c0, n_all, s.data_ptr<float>(),
                 cols, /*accumulate=*/false);
  }
}

template <typename T, typename O>
void forward_impl(const at::Tensor& zr, const int32_t* yr, const at::Tensor& zcT, const int32_t* yc,
                  int64_t row_offset, T temperature, T margin, T* loss, T* lse, int32_t* npos_out,
                  int32_t* nclip_out) {
  const int64_t n = zr.size(0), n_all = zcT.size(1);
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  const bool stub = stub_loops();
  const T inv_tau = static_cast<T>(1.0 / static_cast<double>(temperature));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;
    at::Tensor tile = at::empty({kRowBlock * kColBlock}, zr.options().dtype(c10::CppTypeToScalarType<T>::value));
    std::vector<RowStats<T>> st(kRowBlock);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock, rows = std::min(kRowBlock, n - r0);
      std::fill(st.begin(), st.end(), RowStats<T>());
      for (int64_t c0 = 0; c0 < n_all; c0 += kColBlock) {
        const int64_t cols = std::min(kColBlock, n_all - c0);
        at::Tensor s = tile.narrow(0, 0, rows * cols).view({rows, cols});
        similarity_tile<T, O>(zr, zcT, r0, rows, c0, cols, s);  // s_ij = z_i . z_j for the tile
        if (stub) continue;
        T* sp = s.data_ptr<T>();
        for (int64_t i = 0; i < rows; ++i) {
          T* l = sp + i * cols;
          const int64_t self = row_offset + r0 + i - c0;  // column of the self pair, if in this tile
          const bool has_self = self >= 0 && self < cols;
          T tile_max = -std::numeric_limits<T>::infinity();
          if (has_self) {
            logits_loop(l, yc + c0, 0, self, yr[r0 + i], margin, inv_tau, &tile_max, &st[i].pos_sum, &st[i].npos,
                        &st[i].nclip);
            logits_loop(l, yc + c0, self + 1, cols, yr[r0 + i], margin, inv_tau, &tile_max, &st[i].pos_sum,
                        &st[i].npos, &st[i].nclip);
            l[self] = -std::numeric_limits<T>::infinity();  // self pair excluded from the logsumexp
          } else {
            logits_loop(l, yc + c0, 0, cols, yr[r0 + i], margin, inv_tau, &tile_max, &st[i].pos_sum, &st[i].npos,
                        &st[i].nclip);
          }
          const T new_max = std::max(st[i].max, tile_max);
          if (new_max == -std::numeric_limits<T>::infinity()) continue;  // no column yet (only self)
          // Online logsumexp: rescale the old sum to the new max, add this tile's terms.
          st[i].sum = st[i].sum * std::exp(st[i].max - new_max) + sum_exp_loop(l, cols, new_max);
          st[i].max = new_max;
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const RowStats<T>& r = st[i];
        const T l_se = r.max + std::log(r.sum);  // -inf when the anchor has no other row
        lse[r0 + i] = l_se;
        loss[r0 + i] = r.npos > 0 ? l_se - r.pos_sum / T(r.npos) : T(0);  // L_i = 0 without positives
        npos_out[r0 + i] = static_cast<int32_t>(r.npos);
        nclip_out[r0 + i] = static_cast<int32_t>(r.nclip);
      }
    }
  });
}

// grad_scale: the exact power of two the 16-bit G tile is multiplied by (1 otherwise); dz is
// divided by it at the end (exact).
template <typename T, typename O>
void backward_impl(const at::Tensor& zr, const int32_t* yr, const at::Tensor& zc, const at::Tensor& zcT,
                   const int32_t* yc, int64_t row_offset, const T* lse_r, const T* a_r, const T* b_r, const T* lse_c,
                   const T* a_c, const T* b_c, T temperature, T margin, float grad_scale, at::Tensor& dz) {
  const int64_t n = zr.size(0), n_all = zc.size(0), d = zr.size(1);
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  const bool stub = stub_loops();
  const T inv_tau = static_cast<T>(1.0 / static_cast<double>(temperature));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;
    at::Tensor tile = at::empty({kRowBlock * kColBlock}, dz.options());
    std::vector<T> alpha_r(kRowBlock), alpha_c(kColBlock);  // a_i exp(L - lse_i) of the tile
    at::Tensor tile16;  // G rounded to the operand type (16-bit products only)
    if constexpr (!std::is_same_v<T, O>) tile16 = at::empty({kRowBlock * kColBlock}, zr.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock, rows = std::min(kRowBlock, n - r0);
      at::Tensor dzb = dz.narrow(0, r0, rows);  // owned by this block only
      for (int64_t c0 = 0; c0 < n_all; c0 += kColBlock) {
        const int64_t cols = std::min(kColBlock, n_all - c0);
        at::Tensor s = tile.narrow(0, 0, rows * cols).view({rows, cols});
        similarity_tile<T, O>(zr, zcT, r0, rows, c0, cols, s);
        T* sp = s.data_ptr<T>();
        // One exp per pair where the tile's lse values are close (always, for normalized features
        // and tau >= 0.05), two otherwise (supcon_loops.h, pair_term_one_exp_range).
        T lse_max = -std::numeric_limits<T>::infinity(), lse_min = std::numeric_limits<T>::infinity();
        for (int64_t i = 0; i < rows; ++i) lse_max = std::max(lse_max, lse_r[r0 + i]), lse_min = std::min(lse_min, lse_r[r0 + i]);
        for (int64_t j = 0; j < cols; ++j) lse_max = std::max(lse_max, lse_c[c0 + j]), lse_min = std::min(lse_min, lse_c[c0 + j]);
        const bool one_exp = std::isfinite(lse_max) && std::isfinite(lse_min) &&
                             static_cast<double>(lse_max) - static_cast<double>(lse_min) <= kOneExpSpread;
        if (one_exp) {
          for (int64_t i = 0; i < rows; ++i) alpha_r[i] = a_r[r0 + i] * std::exp(lse_max - lse_r[r0 + i]);
          for (int64_t j = 0; j < cols; ++j) alpha_c[j] = a_c[c0 + j] * std::exp(lse_max - lse_c[c0 + j]);
        }
        for (int64_t i = 0; i < rows && !stub; ++i) {
          T* l = sp + i * cols;
          const int64_t k = r0 + i;
          const int64_t self = row_offset + k - c0;
          const bool has_self = self >= 0 && self < cols;
          const auto sweep = [&](int64_t j0, int64_t j1) {
            if (one_exp) {
              pair_term_one_exp_loop(l, yc + c0, alpha_c.data(), b_c + c0, j0, j1, yr[k], alpha_r[i], b_r[k], lse_max,
                                     margin, inv_tau);
            } else {
              pair_term_loop(l, yc + c0, lse_c + c0, a_c + c0, b_c + c0, j0, j1, yr[k], lse_r[k], a_r[k], b_r[k],
                             margin, inv_tau);
            }
          };
          sweep(0, has_self ? self : cols);
          if (has_self) {
            l[self] = T(0);  // no self pair
            sweep(self + 1, cols);
          }
        }
        // dz_k += sum_j (G_kj + G_jk) z_j over this tile
        if constexpr (std::is_same_v<T, O>) {
          dzb.addmm_(s, zc.narrow(0, c0, cols));
        } else {
          O* g16 = tile16.data_ptr<O>();
          round_tile(sp, rows * cols, grad_scale, g16);
          tile_gemm<O>(rows, d, cols, g16, cols, zc.data_ptr<O>() + c0 * d, d, dz.data_ptr<float>() + r0 * d, d,
                       /*accumulate=*/true);
        }
      }
    }
  });
}

// ---- operators ---------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> supcon_forward(
    const at::Tensor& zr_in, const at::Tensor& yr_in, const at::Tensor& zc_in, const at::Tensor& yc_in,
    int64_t row_offset, double temperature, double margin) {
  check_supcon_args(zr_in, yr_in, zc_in, yc_in, row_offset, temperature, margin);
  const Products products = products_for(zr_in.scalar_type());
  const at::Tensor zr = prepare_rows(zr_in, products), zc = prepare_rows(zc_in, products);
  const auto labels = prepare_labels(yr_in, yc_in);
  const at::Tensor &yr = labels.first, &yc = labels.second;
  const int64_t n = zr.size(0);
  const at::TensorOptions out = zr.options().dtype(compute_type(zr_in.scalar_type()));
  at::Tensor loss = at::empty({n}, out);
  at::Tensor lse = at::empty({n}, out);
  at::Tensor npos = at::empty({n}, out.dtype(at::kInt));
  at::Tensor nclip = at::empty({n}, out.dtype(at::kInt));
  const at::Tensor zcT = zc.t().contiguous();
  const auto run = [&](auto compute, auto operand) {
    using T = decltype(compute);
    forward_impl<T, decltype(operand)>(zr, yr.data_ptr<int32_t>(), zcT, yc.data_ptr<int32_t>(), row_offset,
                                       static_cast<T>(temperature), static_cast<T>(margin), loss.data_ptr<T>(),
                                       lse.data_ptr<T>(), npos.data_ptr<int32_t>(), nclip.data_ptr<int32_t>());
  };
  if (products == Products::kHalf && zr.scalar_type() == at::kBFloat16) {
    run(float(), at::BFloat16());
  } else if (products == Products::kHalf) {
    run(float(), at::Half());
  } else {
    AT_DISPATCH_FLOATING_TYPES(zr.scalar_type(), "ffkern_supcon_forward_cpu", [&] { run(scalar_t(), scalar_t()); });
  }
  return {loss, lse, npos, nclip};
}

// 2^-ceil(log2 max|a|, |b|) for float16 G tiles: |G_kj + G_jk| <= 4 max(|a|, |b|) (p <= 1), so the
// scaled G is O(1) instead of O(1 / (N^2 tau)), which fp16 would flush to zero. 1 when there is
// nothing to scale (all zero, or non-finite: the NaN then reaches dz unscaled).
float half_grad_scale(std::initializer_list<const at::Tensor*> coefficients) {
  double amax = 0;
  for (const at::Tensor* c : coefficients) {
    if (c->numel() > 0) amax = std::max(amax, c->abs().max().item<double>());
  }
  if (!(amax > 0) || !std::isfinite(amax)) return 1.0f;
  return static_cast<float>(std::ldexp(1.0, -static_cast<int>(std::ceil(std::log2(amax)))));
}

at::Tensor supcon_backward(const at::Tensor& zr_in, const at::Tensor& yr_in, const at::Tensor& zc_in,
                           const at::Tensor& yc_in, int64_t row_offset, const at::Tensor& lse_r_in,
                           const at::Tensor& a_r_in, const at::Tensor& b_r_in, const at::Tensor& lse_c_in,
                           const at::Tensor& a_c_in, const at::Tensor& b_c_in, double temperature, double margin) {
  check_supcon_args(zr_in, yr_in, zc_in, yc_in, row_offset, temperature, margin);
  const int64_t n = zr_in.size(0), n_all = zc_in.size(0);
  check_stat("lse_r", lse_r_in, n, zr_in);
  check_stat("a_r", a_r_in, n, zr_in);
  check_stat("b_r", b_r_in, n, zr_in);
  check_stat("lse_c", lse_c_in, n_all, zr_in);
  check_stat("a_c", a_c_in, n_all, zr_in);
  check_stat("b_c", b_c_in, n_all, zr_in);
  const Products products = products_for(zr_in.scalar_type());
  const at::Tensor zr = prepare_rows(zr_in, products), zc = prepare_rows(zc_in, products);
  const auto labels = prepare_labels(yr_in, yc_in);
  const at::Tensor &yr = labels.first, &yc = labels.second;
  const at::ScalarType ct = compute_type(zr_in.scalar_type());
  const at::Tensor lse_r = prepare_stat(lse_r_in, ct), a_r = prepare_stat(a_r_in, ct), b_r = prepare_stat(b_r_in, ct);
  const at::Tensor lse_c = prepare_stat(lse_c_in, ct), a_c = prepare_stat(a_c_in, ct), b_c = prepare_stat(b_c_in, ct);
  at::Tensor dz = at::zeros({n, zr.size(1)}, zr.options().dtype(ct));
  const float grad_scale =
      (products == Products::kHalf && zr.scalar_type() == at::kHalf) ? half_grad_scale({&a_r, &b_r, &a_c, &b_c}) : 1.0f;
  const at::Tensor zcT = zc.t().contiguous();
  const auto run = [&](auto compute, auto operand) {
    using T = decltype(compute);
    backward_impl<T, decltype(operand)>(zr, yr.data_ptr<int32_t>(), zc, zcT, yc.data_ptr<int32_t>(), row_offset,
                                        lse_r.data_ptr<T>(), a_r.data_ptr<T>(), b_r.data_ptr<T>(), lse_c.data_ptr<T>(),
                                        a_c.data_ptr<T>(), b_c.data_ptr<T>(), static_cast<T>(temperature),
                                        static_cast<T>(margin), grad_scale, dz);
  };
  if (products == Products::kHalf && zr.scalar_type() == at::kBFloat16) {
    run(float(), at::BFloat16());
  } else if (products == Products::kHalf) {
    run(float(), at::Half());
  } else {
    AT_DISPATCH_FLOATING_TYPES(ct, "ffkern_supcon_backward_cpu", [&] { run(scalar_t(), scalar_t()); });
  }
  if (grad_scale != 1.0f) dz.mul_(1.0 / grad_scale);  // a power of two: exact
  return dz;
}

}  // namespace
}  // namespace cpu
}  // namespace ffkern

TORCH_LIBRARY_IMPL(ffkern, CPU, m) {
  m.impl("supcon_forward", &ffkern::cpu::supcon_forward);
  m.impl("supcon_backward", &ffkern::cpu::supcon_backward);
}
