// Shared by the per-class goodness operators' CPU kernels (cpu/per_class_cpu.cpp) and CUDA binding
// (cuda/per_class_binding.cpp): the layout rule, argument checks and the reduction. Torch headers
// allowed here; the plain-CUDA kernel file never includes this.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace ffkern {
namespace per_class {

// float32 for float16 / bfloat16 / float32, float64 for float64.
inline at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The layout the kernels read and the gradient takes (as ffkern.per_class.grad_like): channels-last
// for a channels-last map, else contiguous NCHW.
inline at::MemoryFormat map_format(const at::Tensor& h) {
  return !h.is_contiguous() && h.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous;
}

// h itself in either layout (no copy), another layout copied to contiguous.
inline at::Tensor kernel_input(const at::Tensor& h) {
  TORCH_CHECK(h.dim() == 4, "h must be a feature map [B, C, H, W], got shape ", h.sizes());
  TORCH_CHECK(at::isFloatingType(h.scalar_type()), "h must be a floating-point tensor, got ", h.scalar_type());
  const at::MemoryFormat fmt = map_format(h);
  return h.is_contiguous(fmt) ? h.detach() : h.detach().contiguous(fmt);
}

inline at::Tensor grad_like(const at::Tensor& h) {
  TORCH_CHECK(h.dim() == 4, "h must be a feature map [B, C, H, W], got shape ", h.sizes());
  return at::empty(h.sizes(), h.options().memory_format(map_format(h)));
}

// Sizes and element strides of a map in one of the two layouts: channels_last means stride_c = 1,
// otherwise stride_p = 1 (the H*W positions p of a sample are one stride apart in both).
struct MapShape {
  int64_t batch, channels, positions, classes;
  int64_t stride_b, stride_c, stride_p;
  bool channels_last;
};

inline MapShape map_shape(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 || (weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1),
              "weight must be [K, C] or [K, C, 1, 1], got shape ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), "weight must be a floating-point tensor, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.size(1) == h.size(1), "weight has ", weight.size(1), " input channels but h has C=", h.size(1));
  TORCH_CHECK(weight.device() == h.device(), "weight is on ", weight.device(), " but h on ", h.device());
  const int64_t classes = weight.size(0);
  TORCH_CHECK(classes >= 1, "weight must have at least one class (output channel)");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == classes, "bias must have shape [K] = [", classes, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->device() == h.device(), "bias is on ", bias->device(), " but h on ", h.device());
  }
  const bool cl = map_format(h) == at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(h.is_contiguous(map_format(h)), "internal: h must be contiguous in its layout");
  const int64_t stride_p = h.size(3) == 1 ? h.stride(2) : h.stride(3);
  return {h.size(0), h.size(1), h.size(2) * h.size(3), classes, h.stride(0), h.stride(1), stride_p, cl};
}

inline at::Tensor check_labels(const at::Tensor& labels, int64_t batch) {
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == batch, "labels must have shape [B] = [", batch, "], got ",
              labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
              "labels must be an int32/int64 tensor, got ", labels.scalar_type());
  return labels.detach();
}

inline const at::Tensor& check_scale(const at::Tensor& scale) {
  TORCH_CHECK(scale.numel() == 1, "scale must hold one value, got shape ", scale.sizes());
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()), "scale must be floating-point, got ", scale.scalar_type());
  return scale;
}

inline at::Tensor check_coef(const at::Tensor& coef, int64_t batch, int64_t classes) {
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == batch && coef.size(1) == classes, "coef must be [B, K] = [", batch,
              ", ", classes, "], got ", coef.sizes());
  TORCH_CHECK(at::isFloatingType(coef.scalar_type()), "coef must be floating-point, got ", coef.scalar_type());
  return coef.detach();
}

// 0 mean, 1 sum, 2 none
inline int parse_reduction(const std::string& reduction) {
  if (reduction == "mean") return 0;
  if (reduction == "sum") return 1;
  if (reduction == "none") return 2;
  TORCH_CHECK(false, "reduction must be 'mean', 'sum' or 'none', got '", reduction, "'");
  return -1;
}

inline at::Tensor reduce(const at::Tensor& losses, int mode) {
  if (mode == 2) return losses;
  return mode == 1 ? losses.sum() : losses.mean();
}

}  // namespace per_class
}  // namespace ffkern
