// Operator schemas of the "ffkern" library (the backend "cpp").
//
// Kernels live in cpu/ (TORCH_LIBRARY_IMPL(ffkern, CPU, ...)) and cuda/ (TORCH_LIBRARY_IMPL(ffkern,
// CUDA, ...)); autograd formulas and fake (meta) implementations are registered from Python in
// ffkern/cpp/ops.py, so that the ops trace under torch.compile(fullgraph=True); the fused FF
// operators' autograd is C++ (ff_autograd.cpp).
//
// Math: SPEC.md sections 1 (marginal SupCon) and 2 (FF goodness losses). Row order, statistics and
// the symmetric pair term are those of ffkern/reference.py's supcon_forward / supcon_backward.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

TORCH_LIBRARY(ffkern, m) {
  // Tells torch which Python module registers the fake implementations of these ops.
  m.set_python_module("ffkern.cpp.ops");

  // Anchors zr (global rows row_offset .. row_offset+n-1) against all rows zc.
  // Returns (L [n], lse [n], |P(i)| [n] int32, clipped positives [n] int32); L and lse are float32
  // (float64 for float64 inputs). No autograd: it is a primitive.
  m.def(
      "supcon_forward(Tensor zr, Tensor yr, Tensor zc, Tensor yc, int row_offset, float temperature, "
      "float margin) -> (Tensor, Tensor, Tensor, Tensor)");

  // dL/dzr [n, D] by the symmetric pair term of SPEC 1.3:
  //   dz_k = sum_{j != k} (G_kj + G_jk) z_j,  G_ij = kappa_ij (a_i p_ij - b_i M_ij).
  m.def(
      "supcon_backward(Tensor zr, Tensor yr, Tensor zc, Tensor yc, int row_offset, Tensor lse_r, "
      "Tensor a_r, Tensor b_r, Tensor lse_c, Tensor a_c, Tensor b_c, float temperature, float margin) "
      "-> Tensor");

  // All rows against all rows, differentiable in z (autograd registered in Python). operand_dtype
  // float16/bfloat16 rounds z to that type for the similarity products (accumulation stays fp32),
  // as a fused GPU kernel reading half-precision features does. Returns (L, lse, |P|, clipped).
  m.def(
      "supcon_rows(Tensor z, Tensor labels, float temperature, float margin, ScalarType? "
      "operand_dtype=None) -> (Tensor, Tensor, Tensor, Tensor)");

  // FF goodness g(h) [B] of [B, D] or [B, T, D] (token mean over tokens skip_tokens..T-1);
  // kind "mean" or "sum" over features. goodness_fused returns (g, token means): the means [B, D]
  // (float32, float64 for float64) where T - skip_tokens > 1, so that the backward reads them
  // instead of h (dh of every kept token of a sample is the same function of its mean); an empty
  // tensor where the mean is one row of h. Its autograd: ff_autograd.cpp.
  m.def("goodness_fused(Tensor h, str kind, int skip_tokens) -> (Tensor, Tensor)");
  // g only: goodness_fused's first output (CompositeImplicitAutograd, below).
  m.def("goodness(Tensor h, str kind, int skip_tokens) -> Tensor");
  // dL/dh from grad [B]; mean: goodness_fused's token means (h is then not read; None or an empty
  // tensor: the means are computed from h).
  m.def("goodness_backward(Tensor grad, Tensor h, str kind, int skip_tokens, Tensor? mean=None) -> Tensor");

  // Pair losses, loss in {"ff", "symba", "sffa"}; param = threshold (ff), alpha (symba), unused
  // (sffa). activity_term (sffa only): SFFA's factor A = 1 + exp(-10 (mu+ + mu-)) (SPEC 2), fused:
  // the forward kernels sum the activations in the pass that computes the energies.
  // pair_loss_fused returns (L, activity, means of h_pos, means of h_neg, energies): the 0-dim loss
  // (L_S A with the term), (L_S, A) [2] for the backward (an empty tensor without the term), the
  // token means as goodness_fused returns them, and the per-sample energies (E0+, E1+, E0-, E1-)
  // [B, 4] in the accumulation type (the CPU kernels; the CUDA kernels return an empty tensor and
  // form them again in the backward). Its autograd: ff_autograd.cpp.
  m.def(
      "pair_loss_fused(Tensor h_pos, Tensor h_neg, str loss, float param, str kind, int skip_tokens, "
      "bool activity_term) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The 0-dim loss only: pair_loss_fused's first output (CompositeImplicitAutograd, below).
  m.def(
      "pair_loss(Tensor h_pos, Tensor h_neg, str loss, float param, str kind, int skip_tokens, "
      "bool activity_term=False) -> Tensor");
  // (dL/dh_pos, dL/dh_neg); activity: pair_loss_fused's (L_S, A) for the loss with SFFA's factor;
  // mean_pos, mean_neg: its token means (as goodness_backward's mean); energies: its energies (None
  // or empty: formed again from the means or h; the CUDA kernels always form them).
  m.def(
      "pair_loss_backward(Tensor grad, Tensor h_pos, Tensor h_neg, str loss, float param, str kind, "
      "int skip_tokens, Tensor? activity=None, Tensor? mean_pos=None, Tensor? mean_neg=None, "
      "Tensor? energies=None) -> (Tensor, Tensor)");
}

namespace ffkern {
namespace {

// supcon_rows is supcon_forward of all rows against all rows, for every device at once (the CPU
// and CUDA kernels are those of supcon_forward). With operand_dtype float16/bfloat16 a float32 z
// is rounded to it first, as a kernel reading half-precision features sees it; products still
// accumulate in fp32. Its autograd formula (ffkern/cpp/ops.py) rounds z the same way.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> supcon_rows(const at::Tensor& z, const at::Tensor& labels,
                                                                       double temperature, double margin,
                                                                       std::optional<at::ScalarType> operand_dtype) {
  at::Tensor zq = z;
  if (operand_dtype.has_value() && (*operand_dtype == at::kHalf || *operand_dtype == at::kBFloat16) &&
      z.scalar_type() == at::kFloat) {
    zq = z.detach().to(*operand_dtype);
  }
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ffkern::supcon_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, double)>();
  return forward.call(zq, labels, zq, labels, 0, temperature, margin);
}

// goodness / pair_loss = the first output of goodness_fused / pair_loss_fused: composites of those
// ops, so that autograd (registered on the fused ops) saves their other outputs (token means, SFFA's
// (L_S, A)) for the backward while callers keep one tensor. (std::string arguments: the C++
// signature the CPU and CUDA kernels register with.)
at::Tensor goodness(const at::Tensor& h, std::string kind, int64_t skip_tokens) {
  static const auto fused = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("ffkern::goodness_fused", "")
                                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, std::string, int64_t)>();
  return std::get<0>(fused.call(h, kind, skip_tokens));
}

at::Tensor pair_loss(const at::Tensor& h_pos, const at::Tensor& h_neg, std::string loss, double param,
                     std::string kind, int64_t skip_tokens, bool activity_term) {
  using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  static const auto fused =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ffkern::pair_loss_fused", "")
          .typed<Out(const at::Tensor&, const at::Tensor&, std::string, double, std::string, int64_t, bool)>();
  return std::get<0>(fused.call(h_pos, h_neg, loss, param, kind, skip_tokens, activity_term));
}

}  // namespace
}  // namespace ffkern

TORCH_LIBRARY_IMPL(ffkern, CompositeExplicitAutograd, m) { m.impl("supcon_rows", &ffkern::supcon_rows); }
TORCH_LIBRARY_IMPL(ffkern, CompositeImplicitAutograd, m) {
  m.impl("goodness", &ffkern::goodness);
  m.impl("pair_loss", &ffkern::pair_loss);
}
