// Torch binding of the per-class goodness CUDA kernels (per_class_kernels.cu) for the CUDA dispatch
// key of the ffkern_per_class::* operators (schemas: cpu/per_class_cpu.cpp). Compiled only when the
// extension is built with CUDA. h is read in place (NCHW or channels-last; another layout copied,
// per_class_common.h); the weight is handed to the kernels transposed in chunks of 16 classes.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>

#include "../per_class_common.h"
#include "per_class_cuda.h"

namespace ffkern {
namespace per_class_binding {
namespace {

using ffkern::cuda::DType;
using ffkern::cuda::PerClassMap;
using ffkern::per_class::MapShape;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "ffkern per-class CUDA kernels take float16, bfloat16, float32 or float64, got ",
                  t.scalar_type());
  }
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ffkern CUDA kernel ", what, " failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

PerClassMap to_map(const MapShape& s) {
  return {s.batch, s.channels, s.positions, s.classes, s.stride_b, s.stride_c, s.stride_p};
}

int64_t chunks_of(int64_t classes) {
  return (classes + ffkern::cuda::kPerClassChunk - 1) / ffkern::cuda::kPerClassChunk;
}

// wt [chunks][C][16] (acc, zeros past K): the 16 classes of a chunk contiguous per channel.
at::Tensor chunked_weight(const at::Tensor& weight, const MapShape& s, at::ScalarType acc) {
  const int64_t rows = chunks_of(s.classes) * ffkern::cuda::kPerClassChunk;
  at::Tensor padded = at::zeros({rows, s.channels}, weight.options().dtype(acc));
  padded.narrow(0, 0, s.classes).copy_(weight.detach().reshape({s.classes, s.channels}));
  return padded.reshape({rows / ffkern::cuda::kPerClassChunk, ffkern::cuda::kPerClassChunk, s.channels})
      .permute({0, 2, 1})
      .contiguous();
}

at::Tensor chunked_bias(const std::optional<at::Tensor>& bias, const MapShape& s, const at::Tensor& h,
                        at::ScalarType acc) {
  if (!bias.has_value()) return at::Tensor();
  at::Tensor padded = at::zeros({chunks_of(s.classes) * ffkern::cuda::kPerClassChunk}, h.options().dtype(acc));
  padded.narrow(0, 0, s.classes).copy_(bias->detach());
  return padded;
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& h_in, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias_in, const at::Tensor* labels_in,
                                               const at::Tensor* scale_in) {
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = ffkern::per_class::kernel_input(h_in);
  const MapShape s = ffkern::per_class::map_shape(h, weight, bias_in);
  const at::ScalarType acc = ffkern::per_class::accumulation_type(h.scalar_type());
  const at::Tensor wt = chunked_weight(weight, s, acc);
  const at::Tensor bias = chunked_bias(bias_in, s, h, acc);
  at::Tensor g = at::empty({s.batch, s.classes}, h.options().dtype(acc));
  at::Tensor losses, labels, scale;
  if (labels_in) {
    labels = ffkern::per_class::check_labels(*labels_in, s.batch).to(h.device(), at::kLong).contiguous();
    scale = ffkern::per_class::check_scale(*scale_in).detach().to(h.device(), acc).reshape({1}).contiguous();
    losses = at::empty({s.batch}, h.options().dtype(acc));
  }
  check(ffkern::cuda::per_class_forward(dtype_of(h), h.const_data_ptr(), to_map(s), wt.const_data_ptr(),
                                        ptr_or_null(bias), labels.defined() ? labels.const_data_ptr<int64_t>() : nullptr,
                                        ptr_or_null(scale), g.mutable_data_ptr(),
                                        losses.defined() ? losses.mutable_data_ptr() : nullptr, stream()),
        "per_class_forward");
  return {g, losses};
}

at::Tensor class_goodness(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return std::get<0>(run_forward(h, weight, bias, nullptr, nullptr));
}

std::tuple<at::Tensor, at::Tensor> per_class_loss(const at::Tensor& h, const at::Tensor& weight,
                                                  const at::Tensor& labels, const std::optional<at::Tensor>& bias,
                                                  const at::Tensor& scale, std::string reduction) {
  const int mode = ffkern::per_class::parse_reduction(reduction);
  auto [g, losses] = run_forward(h, weight, bias, &labels, &scale);
  return {ffkern::per_class::reduce(losses, mode), g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> per_class_backward(const at::Tensor& h_in, const at::Tensor& weight,
                                                                  const std::optional<at::Tensor>& bias_in,
                                                                  const at::Tensor& coef_in) {
  const c10::cuda::CUDAGuard guard(h_in.device());
  at::Tensor dh = ffkern::per_class::grad_like(h_in);
  const at::Tensor h = h_in.detach().contiguous(ffkern::per_class::map_format(h_in));
  const MapShape s = ffkern::per_class::map_shape(h, weight, bias_in);
  const MapShape ds = ffkern::per_class::map_shape(dh, weight, bias_in);
  TORCH_CHECK(s.classes <= ffkern::cuda::kPerClassMaxClasses, "backend 'cpp' on CUDA: the per-class loss's backward "
              "supports at most ", ffkern::cuda::kPerClassMaxClasses, " classes, got K=", s.classes,
              "; use backend='triton' or 'reference'");
  const at::ScalarType acc = ffkern::per_class::accumulation_type(h.scalar_type());
  const at::Tensor coef = ffkern::per_class::check_coef(coef_in, s.batch, s.classes).to(acc).contiguous();
  const at::Tensor wt = chunked_weight(weight, s, acc);
  const at::Tensor bias = chunked_bias(bias_in, s, h, acc);
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, h.device().index()), "cudaDeviceGetAttribute");
  const int64_t programs = std::max<int64_t>(1, std::min<int64_t>(s.batch, 2 * static_cast<int64_t>(sms)));
  at::Tensor dw_part = at::zeros({programs, s.classes, s.channels}, h.options().dtype(acc));
  at::Tensor db_part = at::zeros({programs, s.classes}, h.options().dtype(acc));
  check(ffkern::cuda::per_class_backward(dtype_of(h), h.const_data_ptr(), to_map(s), to_map(ds), wt.const_data_ptr(),
                                         ptr_or_null(bias), coef.const_data_ptr(), dh.mutable_data_ptr(),
                                         dw_part.mutable_data_ptr(), db_part.mutable_data_ptr(),
                                         static_cast<int>(programs), stream()),
        "per_class_backward");
  return {dh, dw_part.sum(0), db_part.sum(0)};
}

}  // namespace
}  // namespace per_class_binding
}  // namespace ffkern

TORCH_LIBRARY_IMPL(ffkern_per_class, CUDA, m) {
  m.impl("class_goodness", &ffkern::per_class_binding::class_goodness);
  m.impl("per_class_loss", &ffkern::per_class_binding::per_class_loss);
  m.impl("per_class_backward", &ffkern::per_class_binding::per_class_backward);
}
