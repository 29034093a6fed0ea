// Argument checks shared by the CPU kernels and the CUDA binding (torch headers allowed here; the
// plain-CUDA kernel files never include this). The Python API validates user input first; these
// checks guard direct calls of the torch.ops.ffkern.* operators with clear messages.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace ffkern {

// float32 for float16 / bfloat16 / float32 inputs, float64 for float64 (the accumulation type).
inline at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_rows(const char* name, const at::Tensor& z) {
  TORCH_CHECK(z.dim() == 2, name, " must be 2-D [rows, D], got ", z.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), name, " must be a floating-point tensor, got ",
              z.scalar_type());
}

inline void check_labels(const char* name, const at::Tensor& y, int64_t rows, const at::Tensor& z) {
  TORCH_CHECK(y.dim() == 1 && y.size(0) == rows, name, " must be 1-D of length ", rows, ", got shape ",
              y.sizes());
  TORCH_CHECK(at::isIntegralType(y.scalar_type(), /*includeBool=*/false), name,
              " must have an integer dtype, got ", y.scalar_type());
  TORCH_CHECK(y.device() == z.device(), name, " is on ", y.device(), " but the features are on ", z.device());
}

inline void check_stat(const char* name, const at::Tensor& v, int64_t rows, const at::Tensor& z) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == rows, name, " must be 1-D of length ", rows, ", got shape ",
              v.sizes());
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), name, " must be floating-point, got ", v.scalar_type());
  TORCH_CHECK(v.device() == z.device(), name, " is on ", v.device(), " but the features are on ", z.device());
}

inline void check_supcon_args(const at::Tensor& zr, const at::Tensor& yr, const at::Tensor& zc,
                              const at::Tensor& yc, int64_t row_offset, double temperature, double margin) {
  check_rows("zr", zr);
  check_rows("zc", zc);
  TORCH_CHECK(zr.scalar_type() == zc.scalar_type(), "zr and zc must have the same dtype, got ",
              zr.scalar_type(), " and ", zc.scalar_type());
  TORCH_CHECK(zr.device() == zc.device(), "zr and zc must be on the same device");
  TORCH_CHECK(zr.size(1) == zc.size(1), "zr and zc must have the same feature dimension D, got ", zr.size(1),
              " and ", zc.size(1));
  check_labels("yr", yr, zr.size(0), zr);
  check_labels("yc", yc, zc.size(0), zc);
  TORCH_CHECK(row_offset >= 0 && row_offset + zr.size(0) <= zc.size(0), "row_offset=", row_offset,
              " puts the ", zr.size(0), " anchor rows outside the ", zc.size(0), " rows of zc");
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), "temperature must be > 0, got ", temperature);
  TORCH_CHECK(margin >= 0.0 && std::isfinite(margin), "margin must be >= 0, got ", margin);
}

// [B, D] is treated as [B, 1, D]. Returns {B, T, D}.
struct TokenShape {
  int64_t batch, tokens, dim;
};

inline TokenShape check_activations(const char* name, const at::Tensor& h, int64_t skip_tokens) {
  TORCH_CHECK(h.dim() == 2 || h.dim() == 3, name, " must be [B, D] or [B, T, D], got shape ", h.sizes());
  TORCH_CHECK(at::isFloatingType(h.scalar_type()), name, " must be a floating-point tensor, got ",
              h.scalar_type());
  TORCH_CHECK(h.size(0) > 0 && h.size(-1) > 0, name, " must not be empty, got shape ", h.sizes());
  const int64_t tokens = h.dim() == 3 ? h.size(1) : 1;
  TORCH_CHECK(skip_tokens >= 0 && skip_tokens < tokens, "skip_tokens=", skip_tokens, " must be in [0, ", tokens,
              ") for ", name, " of shape ", h.sizes());
  return {h.size(0), tokens, h.size(-1)};
}

inline bool parse_kind_is_mean(const std::string& kind) {
  TORCH_CHECK(kind == "mean" || kind == "sum", "kind must be 'mean' or 'sum', got '", kind, "'");
  return kind == "mean";
}

inline int parse_pair_loss(const std::string& loss) {
  if (loss == "ff") return 0;
  if (loss == "symba") return 1;
  if (loss == "sffa") return 2;
  TORCH_CHECK(false, "loss must be 'ff', 'symba' or 'sffa', got '", loss, "'");
  return -1;
}

inline TokenShape check_pair(const at::Tensor& h_pos, const at::Tensor& h_neg, int loss, int64_t skip_tokens) {
  TokenShape s = check_activations("h_pos", h_pos, skip_tokens);
  TORCH_CHECK(h_pos.sizes() == h_neg.sizes(), "h_pos and h_neg must have the same shape, got ", h_pos.sizes(),
              " and ", h_neg.sizes());
  TORCH_CHECK(h_pos.scalar_type() == h_neg.scalar_type(), "h_pos and h_neg must have the same dtype");
  TORCH_CHECK(h_pos.device() == h_neg.device(), "h_pos and h_neg must be on the same device");
  TORCH_CHECK(loss != 2 || s.dim % 2 == 0, "sffa splits the D units into two halves: D must be even, got D=",
              s.dim);
  return s;
}

}  // namespace ffkern
