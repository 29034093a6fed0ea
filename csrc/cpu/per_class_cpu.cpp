// Per-class goodness loss (SPEC 2.2): the schemas of the ffkern_per_class::* operators, and their
// CPU kernels (CUDA kernels: cuda/per_class_kernels.cu, bound in cuda/per_class_binding.cpp).
//
// A namespace of their own (not ffkern::*) so that these operators can be added without touching
// the others' registration; autograd and fake implementations: ffkern/cpp/per_class_ops.py.
//
// h [B, C, H, W] is read in place, contiguous (NCHW) or channels-last; another layout is copied
// to the one its gradient takes (ffkern.per_class.grad_like). Per sample, tiles of kTile
// positions are widened into a [C, kTile] buffer; the class maps z [K, kTile] = W h + beta are
// built there (never for the whole map), squared and summed into g [K]; the cross-entropy of the
// sample follows in the same task. Backward rebuilds each z tile and writes dh = W^T dz; dW and
// dbias are summed per fixed chunk of samples (chunks depend on B only, not on the thread count),
// then over chunks in order: bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "../per_class_common.h"
#include "simd.h"

TORCH_LIBRARY(ffkern_per_class, m) {
  m.set_python_module("ffkern.cpp.per_class_ops");
  // g [B, K] (float32; float64 for float64 h)
  m.def("class_goodness(Tensor h, Tensor weight, Tensor? bias) -> Tensor");
  // (the reduced loss, g [B, K]); scale: a one-element tensor
  m.def(
      "per_class_loss(Tensor h, Tensor weight, Tensor labels, Tensor? bias, Tensor scale, str reduction) -> "
      "(Tensor, Tensor)");
  // coef = dL/dg [B, K]; returns (dh like h, dW [K, C], dbias [K]), the last two in the accumulation dtype
  m.def("per_class_backward(Tensor h, Tensor weight, Tensor? bias, Tensor coef) -> (Tensor, Tensor, Tensor)");
}

namespace ffkern {
namespace per_class {
namespace {

constexpr int64_t kTile = 32;   // positions per tile (a multiple of kLanes)
constexpr int64_t kLanes = 8;   // independent partial sums: the compiler vectorizes them
constexpr int64_t kChunks = 64; // most sample chunks of the backward's dW partial sums

template <typename acc_t>
inline acc_t dot_tile(const acc_t* a, const acc_t* b) {
  acc_t part[kLanes] = {};
  for (int64_t j = 0; j < kTile; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] += a[j + l] * b[j + l];
  acc_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += part[l];
  return total;
}

// The sample's positions p0 .. p0+n-1 widened into hv [C, kTile] (zeros past n).
template <typename scalar_t, typename acc_t>
void load_tile(const scalar_t* hb, const MapShape& s, int64_t p0, int64_t n, acc_t* hv) {
  if (s.channels_last) {
    std::fill(hv, hv + s.channels * kTile, acc_t(0));
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t* hp = hb + (p0 + j) * s.stride_p;
      for (int64_t c = 0; c < s.channels; ++c) hv[c * kTile + j] = static_cast<acc_t>(hp[c]);
    }
  } else {
    for (int64_t c = 0; c < s.channels; ++c) {
      const scalar_t* hc = hb + c * s.stride_c + p0;
      acc_t* row = hv + c * kTile;
      for (int64_t j = 0; j < n; ++j) row[j] = static_cast<acc_t>(hc[j]);
      for (int64_t j = n; j < kTile; ++j) row[j] = acc_t(0);
    }
  }
}

// z [K, kTile] = W hv + bias, zero past n.
template <typename acc_t>
FFKERN_ALWAYS_INLINE void class_maps(const acc_t* w, const acc_t* bias, const acc_t* hv, int64_t classes, int64_t channels, int64_t n,
                acc_t* z) {
  for (int64_t k = 0; k < classes; ++k) {
    acc_t* zk = z + k * kTile;
    const acc_t beta = bias ? bias[k] : acc_t(0);
    for (int64_t j = 0; j < kTile; ++j) zk[j] = beta;
    const acc_t* wk = w + k * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t wkc = wk[c];
      const acc_t* row = hv + c * kTile;
      for (int64_t j = 0; j < kTile; ++j) zk[j] += wkc * row[j];
    }
    for (int64_t j = n; j < kTile; ++j) zk[j] = acc_t(0);
  }
}

// dh tile [C, kTile] = W^T dz; dW [K, C] += dz hv^T, summed over the n positions in order (vector
// lanes over the channels: no horizontal sums).
template <typename acc_t>
FFKERN_ALWAYS_INLINE void tile_backward_impl(const acc_t* w, const acc_t* hv, const acc_t* dz, int64_t classes,
                                             int64_t channels, int64_t n, acc_t* hvt, acc_t* dht, acc_t* dw) {
  for (int64_t c = 0; c < channels; ++c) {
    acc_t* out = dht + c * kTile;
    for (int64_t j = 0; j < kTile; ++j) out[j] = acc_t(0);
    for (int64_t k = 0; k < classes; ++k) {
      const acc_t wkc = w[k * channels + c];
      const acc_t* dzk = dz + k * kTile;
      for (int64_t j = 0; j < kTile; ++j) out[j] += wkc * dzk[j];
    }
  }
  for (int64_t c = 0; c < channels; ++c)  // hvt [kTile, C]: the channels contiguous per position
    for (int64_t j = 0; j < n; ++j) hvt[j * channels + c] = hv[c * kTile + j];
  for (int64_t k = 0; k < classes; ++k) {
    acc_t* dwk = dw + k * channels;
    for (int64_t j = 0; j < n; ++j) {
      const acc_t a = dz[k * kTile + j];
      const acc_t* row = hvt + j * channels;
      for (int64_t c = 0; c < channels; ++c) dwk[c] += a * row[c];
    }
  }
}

// The hot loops per accumulation type, compiled per instruction set (simd.h's FFKERN_CLONES).
FFKERN_CLONES void class_maps_f(const float* w, const float* bias, const float* hv, int64_t classes, int64_t channels,
                                int64_t n, float* z) {
  class_maps(w, bias, hv, classes, channels, n, z);
}
FFKERN_CLONES void class_maps_d(const double* w, const double* bias, const double* hv, int64_t classes,
                                int64_t channels, int64_t n, double* z) {
  class_maps(w, bias, hv, classes, channels, n, z);
}
inline void class_maps_any(const float* w, const float* b, const float* hv, int64_t k, int64_t c, int64_t n, float* z) {
  class_maps_f(w, b, hv, k, c, n, z);
}
inline void class_maps_any(const double* w, const double* b, const double* hv, int64_t k, int64_t c, int64_t n,
                           double* z) {
  class_maps_d(w, b, hv, k, c, n, z);
}
FFKERN_CLONES void tile_backward_f(const float* w, const float* hv, const float* dz, int64_t classes, int64_t channels,
                                   int64_t n, float* hvt, float* dht, float* dw) {
  tile_backward_impl(w, hv, dz, classes, channels, n, hvt, dht, dw);
}
FFKERN_CLONES void tile_backward_d(const double* w, const double* hv, const double* dz, int64_t classes,
                                   int64_t channels, int64_t n, double* hvt, double* dht, double* dw) {
  tile_backward_impl(w, hv, dz, classes, channels, n, hvt, dht, dw);
}
inline void tile_backward(const float* w, const float* hv, const float* dz, int64_t k, int64_t c, int64_t n,
                          float* hvt, float* dht, float* dw) {
  tile_backward_f(w, hv, dz, k, c, n, hvt, dht, dw);
}
inline void tile_backward(const double* w, const double* hv, const double* dz, int64_t k, int64_t c, int64_t n,
                          double* hvt, double* dht, double* dw) {
  tile_backward_d(w, hv, dz, k, c, n, hvt, dht, dw);
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const at::Tensor& h, const MapShape& s, const acc_t* w, const acc_t* bias, const int64_t* labels,
                    acc_t scale, acc_t* g, acc_t* losses) {
  const scalar_t* hdata = h.const_data_ptr<scalar_t>();
  const int64_t K = s.classes, C = s.channels, P = s.positions;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C * P * K));
  at::parallel_for(0, s.batch, grain, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> hv(C * kTile), z(K * kTile), total(K);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(total.begin(), total.end(), acc_t(0));
      for (int64_t p0 = 0; p0 < P; p0 += kTile) {
        const int64_t n = std::min(kTile, P - p0);
        load_tile(hdata + b * s.stride_b, s, p0, n, hv.data());
        class_maps_any(w, bias, hv.data(), K, C, n, z.data());
        for (int64_t k = 0; k < K; ++k) total[k] += dot_tile(z.data() + k * kTile, z.data() + k * kTile);
      }
      acc_t* gb = g + b * K;
      for (int64_t k = 0; k < K; ++k) gb[k] = total[k] / static_cast<acc_t>(P);
      if (losses) {  // softmax cross-entropy of scale * g_b against y_b
        acc_t top = -std::numeric_limits<acc_t>::infinity();
        for (int64_t k = 0; k < K; ++k) top = std::max(top, scale * gb[k]);
        acc_t sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += std::exp(scale * gb[k] - top);
        const int64_t y = labels[b];
        // a label outside [0, K) (not checked under torch.compile) gives NaN, never a silent value
        losses[b] = (y >= 0 && y < K) ? top + std::log(sum) - scale * gb[y] : std::numeric_limits<acc_t>::quiet_NaN();
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const at::Tensor& h, const MapShape& s, const acc_t* w, const acc_t* bias, const acc_t* coef,
                     at::Tensor& dh, const MapShape& ds, acc_t* dw_part, acc_t* db_part, int64_t chunks) {
  const scalar_t* hdata = h.const_data_ptr<scalar_t>();
  scalar_t* dhdata = dh.mutable_data_ptr<scalar_t>();
  const int64_t K = s.classes, C = s.channels, P = s.positions;
  const acc_t two_over_p = acc_t(2) / static_cast<acc_t>(P);
  const int64_t per_chunk = (s.batch + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t q0, int64_t q1) {
    std::vector<acc_t> hv(C * kTile), z(K * kTile), dht(C * kTile), hvt(C * kTile);
    for (int64_t q = q0; q < q1; ++q) {
      acc_t* dw = dw_part + q * K * C;
      acc_t* db = db_part + q * K;
      std::fill(dw, dw + K * C, acc_t(0));
      std::fill(db, db + K, acc_t(0));
      for (int64_t b = q * per_chunk; b < std::min(s.batch, (q + 1) * per_chunk); ++b) {
        const scalar_t* hb = hdata + b * s.stride_b;
        scalar_t* dhb = dhdata + b * ds.stride_b;
        for (int64_t p0 = 0; p0 < P; p0 += kTile) {
          const int64_t n = std::min(kTile, P - p0);
          load_tile(hb, s, p0, n, hv.data());
          class_maps_any(w, bias, hv.data(), K, C, n, z.data());
          for (int64_t k = 0; k < K; ++k) {  // z becomes dz = dL/dg * 2 z / P
            const acc_t a = coef[b * K + k] * two_over_p;
            acc_t* zk = z.data() + k * kTile;
            acc_t sum = 0;
            for (int64_t j = 0; j < kTile; ++j) {
              zk[j] *= a;
              sum += zk[j];
            }
            db[k] += sum;
          }
          tile_backward(w, hv.data(), z.data(), K, C, n, hvt.data(), dht.data(), dw);
          if (ds.channels_last) {
            for (int64_t j = 0; j < n; ++j) {
              scalar_t* dp = dhb + (p0 + j) * ds.stride_p;
              for (int64_t c = 0; c < C; ++c) dp[c] = static_cast<scalar_t>(dht[c * kTile + j]);
            }
          } else {
            for (int64_t c = 0; c < C; ++c) {
              scalar_t* dc = dhb + c * ds.stride_c + p0;
              for (int64_t j = 0; j < n; ++j) dc[j] = static_cast<scalar_t>(dht[c * kTile + j]);
            }
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& h_in, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias_in, const at::Tensor* labels_in,
                                               const at::Tensor* scale_in) {
  const at::Tensor h = kernel_input(h_in);
  const MapShape s = map_shape(h, weight, bias_in);
  const at::ScalarType acc = accumulation_type(h.scalar_type());
  const at::Tensor w = weight.detach().reshape({s.classes, s.channels}).to(acc).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->detach().to(acc).contiguous() : at::Tensor();
  at::Tensor g = at::empty({s.batch, s.classes}, h.options().dtype(acc));
  at::Tensor losses, labels;
  double scale = 1.0;
  if (labels_in) {
    labels = check_labels(*labels_in, s.batch).to(at::kLong).contiguous();
    scale = check_scale(*scale_in).item<double>();
    losses = at::empty({s.batch}, h.options().dtype(acc));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "per_class_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(h, s, w.const_data_ptr<acc_t>(), bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr,
                                    labels.defined() ? labels.const_data_ptr<int64_t>() : nullptr,
                                    static_cast<acc_t>(scale), g.mutable_data_ptr<acc_t>(),
                                    losses.defined() ? losses.mutable_data_ptr<acc_t>() : nullptr);
  });
  return {g, losses};
}

at::Tensor class_goodness(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return std::get<0>(run_forward(h, weight, bias, nullptr, nullptr));
}

std::tuple<at::Tensor, at::Tensor> per_class_loss(const at::Tensor& h, const at::Tensor& weight,
                                                  const at::Tensor& labels, const std::optional<at::Tensor>& bias,
                                                  const at::Tensor& scale, std::string reduction) {
  const int mode = parse_reduction(reduction);
  auto [g, losses] = run_forward(h, weight, bias, &labels, &scale);
  return {reduce(losses, mode), g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> per_class_backward(const at::Tensor& h_in, const at::Tensor& weight,
                                                                  const std::optional<at::Tensor>& bias_in,
                                                                  const at::Tensor& coef_in) {
  at::Tensor dh = grad_like(h_in);
  const at::Tensor h = h_in.detach().contiguous(map_format(h_in));
  const MapShape s = map_shape(h, weight, bias_in);
  const MapShape ds = map_shape(dh, weight, bias_in);
  const at::ScalarType acc = accumulation_type(h.scalar_type());
  const at::Tensor coef = check_coef(coef_in, s.batch, s.classes).to(acc).contiguous();
  const at::Tensor w = weight.detach().reshape({s.classes, s.channels}).to(acc).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->detach().to(acc).contiguous() : at::Tensor();
  const int64_t chunks = std::max<int64_t>(1, std::min(s.batch, kChunks));
  at::Tensor dw_part = at::empty({chunks, s.classes, s.channels}, h.options().dtype(acc));
  at::Tensor db_part = at::empty({chunks, s.classes}, h.options().dtype(acc));
  if (s.batch == 0) {
    dw_part.zero_();
    db_part.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "per_class_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t>(h, s, w.const_data_ptr<acc_t>(),
                                       bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr,
                                       coef.const_data_ptr<acc_t>(), dh, ds, dw_part.mutable_data_ptr<acc_t>(),
                                       db_part.mutable_data_ptr<acc_t>(), chunks);
    });
  }
  return {dh, dw_part.sum(0), db_part.sum(0)};
}

}  // namespace
}  // namespace per_class
}  // namespace ffkern

TORCH_LIBRARY_IMPL(ffkern_per_class, CPU, m) {
  m.impl("class_goodness", &ffkern::per_class::class_goodness);
  m.impl("per_class_loss", &ffkern::per_class::per_class_loss);
  m.impl("per_class_backward", &ffkern::per_class::per_class_backward);
}
