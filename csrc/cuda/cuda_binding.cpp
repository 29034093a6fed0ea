// Torch binding of the CUDA kernels: checks and converts tensors, calls the plain-CUDA launchers of
// ffkern_cuda.h on the current stream, and turns a CUDA error into a torch error. Registered for
// the CUDA dispatch key; compiled only when the extension is built with CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "../checks.h"
#include "ffkern_cuda.h"

namespace ffkern {
namespace cuda_binding {
namespace {

using ffkern::cuda::DType;

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
      TORCH_CHECK(false, "ffkern CUDA kernels take float16, bfloat16, float32 or float64, got ", t.scalar_type());
  }
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ffkern CUDA kernel ", what, " failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor rows(const at::Tensor& z) { return z.detach().contiguous(); }
at::Tensor labels(const at::Tensor& y) { return y.detach().to(at::kLong).contiguous(); }
at::Tensor stat(const at::Tensor& v, at::ScalarType t) { return v.detach().to(t).contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> supcon_forward(
    const at::Tensor& zr_in, const at::Tensor& yr_in, const at::Tensor& zc_in, const at::Tensor& yc_in,
    int64_t row_offset, double temperature, double margin) {
  check_supcon_args(zr_in, yr_in, zc_in, yc_in, row_offset, temperature, margin);
  const c10::cuda::CUDAGuard guard(zr_in.device());
  const at::Tensor zr = rows(zr_in), zc = rows(zc_in), yr = labels(yr_in), yc = labels(yc_in);
  const int64_t n = zr.size(0);
  const auto opts = zr.options().dtype(compute_type(zr.scalar_type()));
  at::Tensor loss = at::empty({n}, opts), lse = at::empty({n}, opts);
  at::Tensor npos = at::empty({n}, zr.options().dtype(at::kInt)), nclip = at::empty({n}, zr.options().dtype(at::kInt));
  check(ffkern::cuda::supcon_forward(dtype_of(zr), zr.data_ptr(), yr.data_ptr<int64_t>(), zc.data_ptr(),
                                     yc.data_ptr<int64_t>(), n, zc.size(0), zr.size(1), row_offset, temperature,
                                     margin, loss.data_ptr(), lse.data_ptr(), npos.data_ptr<int32_t>(),
                                     nclip.data_ptr<int32_t>(), stream()),
        "supcon_forward");
  return {loss, lse, npos, nclip};
}

at::Tensor supcon_backward(const at::Tensor& zr_in, const at::Tensor& yr_in, const at::Tensor& zc_in,
                           const at::Tensor& yc_in, int64_t row_offset, const at::Tensor& lse_r, const at::Tensor& a_r,
                           const at::Tensor& b_r, const at::Tensor& lse_c, const at::Tensor& a_c, const at::Tensor& b_c,
                           double temperature, double margin) {
  check_supcon_args(zr_in, yr_in, zc_in, yc_in, row_offset, temperature, margin);
  const int64_t n = zr_in.size(0), n_all = zc_in.size(0);
  check_stat("lse_r", lse_r, n, zr_in);
  check_stat("a_r", a_r, n, zr_in);
  check_stat("b_r", b_r, n, zr_in);
  check_stat("lse_c", lse_c, n_all, zr_in);
  check_stat("a_c", a_c, n_all, zr_in);
  check_stat("b_c", b_c, n_all, zr_in);
  const c10::cuda::CUDAGuard guard(zr_in.device());
  const at::Tensor zr = rows(zr_in), zc = rows(zc_in), yr = labels(yr_in), yc = labels(yc_in);
  const at::ScalarType ct = compute_type(zr.scalar_type());
  const at::Tensor lr = stat(lse_r, ct), ar = stat(a_r, ct), br = stat(b_r, ct);
  const at::Tensor lc = stat(lse_c, ct), ac = stat(a_c, ct), bc = stat(b_c, ct);
  at::Tensor dz = at::empty({n, zr.size(1)}, zr.options().dtype(ct));
  at::Tensor scratch = at::empty({ffkern::cuda::kSupconScratchBytes}, zr.options().dtype(at::kByte));
  check(ffkern::cuda::supcon_backward(dtype_of(zr), zr.data_ptr(), yr.data_ptr<int64_t>(), zc.data_ptr(),
                                      yc.data_ptr<int64_t>(), n, n_all, zr.size(1), row_offset, lr.data_ptr(),
                                      ar.data_ptr(), br.data_ptr(), lc.data_ptr(), ac.data_ptr(), bc.data_ptr(),
                                      temperature, margin, dz.data_ptr(), scratch.data_ptr(), stream()),
        "supcon_backward");
  return dz;
}

// The token means the forwards return for the backward: [B, D] (acc type) where T - skip > 1, an
// empty tensor where a sample's mean is one row of h (ffkern/cpp/ops.py's fakes say the same).
at::Tensor token_mean_output(const at::Tensor& h, const TokenShape& s, int64_t skip_tokens) {
  const auto opts = h.options().dtype(compute_type(h.scalar_type()));
  return s.tokens - skip_tokens > 1 ? at::empty({s.batch, s.dim}, opts) : at::empty({0}, opts);
}

// A saved token mean given to a backward op: defined and non-empty, else an undefined tensor.
at::Tensor saved_mean(const char* name, const std::optional<at::Tensor>& mean, const at::Tensor& h,
                      const TokenShape& s) {
  if (!mean.has_value() || !mean->defined() || mean->numel() == 0) return at::Tensor();
  TORCH_CHECK(mean->dim() == 2 && mean->size(0) == s.batch && mean->size(1) == s.dim, name, " must be [B, D] = [",
              s.batch, ", ", s.dim, "] (the forward's token means), got shape ", mean->sizes());
  TORCH_CHECK(mean->scalar_type() == compute_type(h.scalar_type()), name, " must be ", compute_type(h.scalar_type()),
              " (the accumulation type of ", h.scalar_type(), "), got ", mean->scalar_type());
  TORCH_CHECK(mean->device() == h.device(), name, " is on ", mean->device(), " but the activations are on ", h.device());
  return mean->detach().contiguous();
}

std::tuple<at::Tensor, at::Tensor> goodness_fused(const at::Tensor& h_in, std::string kind, int64_t skip_tokens) {
  const bool mean = parse_kind_is_mean(kind);
  const TokenShape s = check_activations("h", h_in, skip_tokens);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.detach().contiguous();
  at::Tensor g = at::empty({s.batch}, h.options().dtype(compute_type(h.scalar_type())));
  at::Tensor means = token_mean_output(h, s, skip_tokens);
  check(ffkern::cuda::goodness(dtype_of(h), h.data_ptr(), s.batch, s.tokens, s.dim, skip_tokens, mean, g.data_ptr(),
                               means.numel() ? means.data_ptr() : nullptr, stream()),
        "goodness");
  return {g, means};
}

at::Tensor goodness_backward(const at::Tensor& grad, const at::Tensor& h_in, std::string kind, int64_t skip_tokens,
                             const std::optional<at::Tensor>& mean_in) {
  const bool mean = parse_kind_is_mean(kind);
  const TokenShape s = check_activations("h", h_in, skip_tokens);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == s.batch, "grad must be [B] with B=", s.batch, ", got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor saved = saved_mean("mean", mean_in, h_in, s);
  // with the saved means h is not read: no contiguous copy of it
  const at::Tensor h = saved.defined() ? h_in.detach() : h_in.detach().contiguous();
  const at::ScalarType ct = compute_type(h.scalar_type());
  const at::Tensor g = stat(grad, ct);
  at::Tensor dh = at::empty(h.sizes(), h.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor scratch = saved.defined() ? at::Tensor() : at::empty({s.batch, s.dim}, h.options().dtype(ct));
  check(ffkern::cuda::goodness_backward(dtype_of(h), g.data_ptr(), saved.defined() ? nullptr : h.data_ptr(),
                                        saved.defined() ? saved.data_ptr() : nullptr, s.batch, s.tokens, s.dim,
                                        skip_tokens, mean, dh.data_ptr(),
                                        scratch.defined() ? scratch.data_ptr() : nullptr, stream()),
        "goodness_backward");
  return dh;
}

// SFFA's activity term applies to SFFA only (ffkern.reference.sffa_loss).
void check_activity(bool activity_term, int loss, const std::string& loss_name) {
  TORCH_CHECK(!activity_term || loss == 2, "activity_term is SFFA's factor: it needs loss 'sffa', got '", loss_name,
              "'");
}

// The fifth output, the per-sample energies, is empty: the CUDA backward forms them again from h
// or the saved means (the schema's contract, csrc/ffkern_ops.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_loss_fused(
    const at::Tensor& hp_in, const at::Tensor& hn_in, std::string loss_name, double param, std::string kind,
    int64_t skip_tokens, bool activity_term) {
  const int loss = parse_pair_loss(loss_name);
  const bool mean = parse_kind_is_mean(kind);
  const TokenShape s = check_pair(hp_in, hn_in, loss, skip_tokens);
  check_activity(activity_term, loss, loss_name);
  const c10::cuda::CUDAGuard guard(hp_in.device());
  const at::Tensor hp = hp_in.detach().contiguous(), hn = hn_in.detach().contiguous();
  const at::ScalarType ct = compute_type(hp.scalar_type());
  at::Tensor out = at::empty({}, hp.options().dtype(ct));
  at::Tensor activity = at::empty({activity_term ? 2 : 0}, hp.options().dtype(ct));
  at::Tensor terms = at::empty({activity_term ? 3 : 1, s.batch}, hp.options().dtype(ct));
  at::Tensor means_p = token_mean_output(hp, s, skip_tokens), means_n = token_mean_output(hn, s, skip_tokens);
  const bool saved = means_p.numel() > 0;
  check(ffkern::cuda::pair_loss(dtype_of(hp), hp.data_ptr(), hn.data_ptr(), s.batch, s.tokens, s.dim, skip_tokens,
                                loss, param, mean, out.data_ptr(), activity_term ? activity.data_ptr() : nullptr,
                                saved ? means_p.data_ptr() : nullptr, saved ? means_n.data_ptr() : nullptr,
                                terms.data_ptr(), stream()),
        "pair_loss");
  return {out, activity, means_p, means_n, at::empty({0}, hp.options().dtype(ct))};
}

std::tuple<at::Tensor, at::Tensor> pair_loss_backward(const at::Tensor& grad, const at::Tensor& hp_in,
                                                      const at::Tensor& hn_in, std::string loss_name, double param,
                                                      std::string kind, int64_t skip_tokens,
                                                      const std::optional<at::Tensor>& activity_in,
                                                      const std::optional<at::Tensor>& mean_pos,
                                                      const std::optional<at::Tensor>& mean_neg,
                                                      const std::optional<at::Tensor>& /*energies: formed again*/) {
  const int loss = parse_pair_loss(loss_name);
  const bool mean = parse_kind_is_mean(kind);
  const TokenShape s = check_pair(hp_in, hn_in, loss, skip_tokens);
  TORCH_CHECK(grad.numel() == 1, "grad must hold one value (the loss is a scalar), got shape ", grad.sizes());
  const bool has_activity = activity_in.has_value() && activity_in->defined();
  if (has_activity) {
    TORCH_CHECK(activity_in->numel() == 2, "activity must hold (L_S, A), 2 values, got shape ", activity_in->sizes());
    TORCH_CHECK(activity_in->device() == hp_in.device(), "activity is on ", activity_in->device(),
                " but the activations are on ", hp_in.device());
    check_activity(true, loss, loss_name);
  }
  const c10::cuda::CUDAGuard guard(hp_in.device());
  const at::Tensor saved_p = saved_mean("mean_pos", mean_pos, hp_in, s);
  const at::Tensor saved_n = saved_mean("mean_neg", mean_neg, hn_in, s);
  TORCH_CHECK(saved_p.defined() == saved_n.defined(), "mean_pos and mean_neg must be given together (the CUDA "
              "kernel reads both or neither)");
  const bool saved = saved_p.defined();
  // with the saved means h is not read: no contiguous copy of it
  const at::Tensor hp = saved ? hp_in.detach() : hp_in.detach().contiguous();
  const at::Tensor hn = saved ? hn_in.detach() : hn_in.detach().contiguous();
  const at::ScalarType ct = compute_type(hp.scalar_type());
  const at::Tensor g = grad.detach().reshape({1}).to(ct).contiguous();
  const at::Tensor activity = has_activity ? stat(*activity_in, ct) : at::Tensor();
  const auto contiguous = hp.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dhp = at::empty(hp.sizes(), contiguous), dhn = at::empty(hn.sizes(), contiguous);
  at::Tensor scratch = saved ? at::Tensor() : at::empty({2, s.batch, s.dim}, hp.options().dtype(ct));
  check(ffkern::cuda::pair_loss_backward(dtype_of(hp), g.data_ptr(), saved ? nullptr : hp.data_ptr(),
                                         saved ? nullptr : hn.data_ptr(), s.batch, s.tokens, s.dim, skip_tokens, loss,
                                         param, mean, has_activity ? activity.data_ptr() : nullptr,
                                         saved ? saved_p.data_ptr() : nullptr, saved ? saved_n.data_ptr() : nullptr,
                                         dhp.data_ptr(), dhn.data_ptr(), saved ? nullptr : scratch.data_ptr(),
                                         stream()),
        "pair_loss_backward");
  return {dhp, dhn};
}

}  // namespace
}  // namespace cuda_binding
}  // namespace ffkern

TORCH_LIBRARY_IMPL(ffkern, CUDA, m) {
  m.impl("supcon_forward", &ffkern::cuda_binding::supcon_forward);
  m.impl("supcon_backward", &ffkern::cuda_binding::supcon_backward);
  m.impl("goodness_fused", &ffkern::cuda_binding::goodness_fused);
  m.impl("goodness_backward", &ffkern::cuda_binding::goodness_backward);
  m.impl("pair_loss_fused", &ffkern::cuda_binding::pair_loss_fused);
  m.impl("pair_loss_backward", &ffkern::cuda_binding::pair_loss_backward);
}
