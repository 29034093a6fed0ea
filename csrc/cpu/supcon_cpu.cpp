// CPU kernels of the marginal SupCon loss (SPEC 1.2 and 1.3), registered for the CPU dispatch key.
//
// Work is split over blocks of kRowBlock anchor rows with at::parallel_for. A block sweeps all
// rows in column tiles of kColBlock: one BLAS product (at::mm_out) gives the tile of similarities
// s_ij, then element loops turn it into what the pass needs. Extra memory is one fixed tile per
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
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "supcon_loops.h"

namespace ffkern {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 256;  // anchor rows per block (larger blocks amortize BLAS packing)

// ---- drivers -----------------------------------------------------------------------------------

// Inputs as contiguous tensors of the compute type, detached: the element loops and BLAS calls run
// on worker threads, where autograd must not see them.
at::Tensor prepare_rows(const at::Tensor& z) { return z.detach().to(compute_type(z.scalar_type())).contiguous(); }
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

// zcT: all rows transposed, [D, N] contiguous, so that each tile product is a plain (NN) GEMM;
// with the transposed view MKL repacks the column tile on every call (measured ~12% slower).
template <typename T>
void forward_impl(const at::Tensor& zr, const int32_t* yr, const at::Tensor& zcT, const int32_t* yc,
                  int64_t row_offset, T temperature, T margin, T* loss, T* lse, int32_t* npos_out,
                  int32_t* nclip_out) {
  const int64_t n = zr.size(0), n_all = zcT.size(1);
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;
    at::Tensor tile = at::empty({kRowBlock * kColBlock}, zr.options());
    std::vector<RowStats<T>> st(kRowBlock);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock, rows = std::min(kRowBlock, n - r0);
      std::fill(st.begin(), st.end(), RowStats<T>());
      const at::Tensor zrb = zr.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < n_all; c0 += kColBlock) {
        const int64_t cols = std::min(kColBlock, n_all - c0);
        at::Tensor s = tile.narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(s, zrb, zcT.narrow(1, c0, cols));  // s_ij = z_i . z_j for the tile
        T* sp = s.data_ptr<T>();
        for (int64_t i = 0; i < rows; ++i) {
          T* l = sp + i * cols;
          const int64_t self = row_offset + r0 + i - c0;  // column of the self pair, if in this tile
          const bool has_self = self >= 0 && self < cols;
          T tile_max = -std::numeric_limits<T>::infinity();
          if (has_self) {
            logits_loop(l, yc + c0, 0, self, yr[r0 + i], margin, temperature, &tile_max, &st[i].pos_sum,
                        &st[i].npos, &st[i].nclip);
            logits_loop(l, yc + c0, self + 1, cols, yr[r0 + i], margin, temperature, &tile_max, &st[i].pos_sum,
                        &st[i].npos, &st[i].nclip);
            l[self] = -std::numeric_limits<T>::infinity();  // self pair excluded from the logsumexp
          } else {
            logits_loop(l, yc + c0, 0, cols, yr[r0 + i], margin, temperature, &tile_max, &st[i].pos_sum,
                        &st[i].npos, &st[i].nclip);
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

template <typename T>
void backward_impl(const at::Tensor& zr, const int32_t* yr, const at::Tensor& zc, const at::Tensor& zcT,
                   const int32_t* yc, int64_t row_offset, const T* lse_r, const T* a_r, const T* b_r, const T* lse_c,
                   const T* a_c, const T* b_c, T temperature, T margin, at::Tensor& dz) {
  const int64_t n = zr.size(0), n_all = zc.size(0);
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;
    at::Tensor tile = at::empty({kRowBlock * kColBlock}, zr.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock, rows = std::min(kRowBlock, n - r0);
      const at::Tensor zrb = zr.narrow(0, r0, rows);
      at::Tensor dzb = dz.narrow(0, r0, rows);  // owned by this block only
      for (int64_t c0 = 0; c0 < n_all; c0 += kColBlock) {
        const int64_t cols = std::min(kColBlock, n_all - c0);
        const at::Tensor zct = zc.narrow(0, c0, cols);
        at::Tensor s = tile.narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(s, zrb, zcT.narrow(1, c0, cols));
        T* sp = s.data_ptr<T>();
        for (int64_t i = 0; i < rows; ++i) {
          T* l = sp + i * cols;
          const int64_t k = r0 + i;
          const int64_t self = row_offset + k - c0;
          const bool has_self = self >= 0 && self < cols;
          const int64_t j_end = has_self ? self : cols;
          pair_term_loop(l, yc + c0, lse_c + c0, a_c + c0, b_c + c0, 0, j_end, yr[k], lse_r[k], a_r[k], b_r[k],
                         margin, temperature);
          if (has_self) {
            l[self] = T(0);  // no self pair
            pair_term_loop(l, yc + c0, lse_c + c0, a_c + c0, b_c + c0, self + 1, cols, yr[k], lse_r[k], a_r[k],
                           b_r[k], margin, temperature);
          }
        }
        dzb.addmm_(s, zct);  // dz_k += sum_j (G_kj + G_jk) z_j over this tile
      }
    }
  });
}

// ---- operators ---------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> supcon_forward(
    const at::Tensor& zr_in, const at::Tensor& yr_in, const at::Tensor& zc_in, const at::Tensor& yc_in,
    int64_t row_offset, double temperature, double margin) {
  check_supcon_args(zr_in, yr_in, zc_in, yc_in, row_offset, temperature, margin);
  const at::Tensor zr = prepare_rows(zr_in), zc = prepare_rows(zc_in);
  const auto labels = prepare_labels(yr_in, yc_in);
  const at::Tensor &yr = labels.first, &yc = labels.second;
  const int64_t n = zr.size(0);
  at::Tensor loss = at::empty({n}, zr.options());
  at::Tensor lse = at::empty({n}, zr.options());
  at::Tensor npos = at::empty({n}, zr.options().dtype(at::kInt));
  at::Tensor nclip = at::empty({n}, zr.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(zr.scalar_type(), "ffkern_supcon_forward_cpu", [&] {
    forward_impl<scalar_t>(zr, yr.data_ptr<int32_t>(), zc.t().contiguous(), yc.data_ptr<int32_t>(), row_offset,
                           static_cast<scalar_t>(temperature), static_cast<scalar_t>(margin),
                           loss.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), npos.data_ptr<int32_t>(),
                           nclip.data_ptr<int32_t>());
  });
  return {loss, lse, npos, nclip};
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
  const at::Tensor zr = prepare_rows(zr_in), zc = prepare_rows(zc_in);
  const auto labels = prepare_labels(yr_in, yc_in);
  const at::Tensor &yr = labels.first, &yc = labels.second;
  const at::ScalarType ct = zr.scalar_type();
  const at::Tensor lse_r = prepare_stat(lse_r_in, ct), a_r = prepare_stat(a_r_in, ct), b_r = prepare_stat(b_r_in, ct);
  const at::Tensor lse_c = prepare_stat(lse_c_in, ct), a_c = prepare_stat(a_c_in, ct), b_c = prepare_stat(b_c_in, ct);
  at::Tensor dz = at::zeros({n, zr.size(1)}, zr.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "ffkern_supcon_backward_cpu", [&] {
    backward_impl<scalar_t>(zr, yr.data_ptr<int32_t>(), zc, zc.t().contiguous(), yc.data_ptr<int32_t>(), row_offset,
                            lse_r.data_ptr<scalar_t>(), a_r.data_ptr<scalar_t>(), b_r.data_ptr<scalar_t>(),
                            lse_c.data_ptr<scalar_t>(), a_c.data_ptr<scalar_t>(), b_c.data_ptr<scalar_t>(),
                            static_cast<scalar_t>(temperature), static_cast<scalar_t>(margin), dz);
  });
  return dz;
}

}  // namespace
}  // namespace cpu
}  // namespace ffkern

TORCH_LIBRARY_IMPL(ffkern, CPU, m) {
  m.impl("supcon_forward", &ffkern::cpu::supcon_forward);
  m.impl("supcon_backward", &ffkern::cpu::supcon_backward);
}
