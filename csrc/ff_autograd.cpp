// Autograd of the fused FF operators ffkern::goodness_fused and ffkern::pair_loss_fused, for every
// device (the Autograd alias key): first-order reverse mode, and the refusals of ffkern._op_autograd
// (forward-mode AD, torch.func.grad) with the same messages.
//
// Why C++ and not torch.library.register_autograd: a Python Autograd kernel runs on every call of
// the operator, grad or no grad. Measured on a 2-core AVX2 EPYC (torch 2.13, [8, 16] inputs, so the
// kernels cost next to nothing; minima of 2000 interleaved calls): goodness_fused without grad took
// 13-17 us against 4 us for torch.add, 4-6.5 us with this kernel; ff_loss fwd + bwd through the
// public function 200 -> 118 us, ff_goodness(h).sum() fwd + bwd 204 -> 137 us.
//
// The formulas are those of SPEC 2 as the kernels implement them: the backward operators take the
// upstream gradient and the forwards' saved statistics (token means, SFFA's (L_S, A)). Those extra
// outputs are saved for the backward, not results: non-differentiable, and with
// set_materialize_grads(false) autograd hands None for them instead of writing zeros (1/T of h's
// bytes per call). The *_backward operators keep their Python Autograd kernels (ffkern/cpp/ops.py),
// which raise when something is differentiated through them: double backward is refused there.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>
#include <tuple>

namespace ffkern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kFallback = "use backend='reference' (plain PyTorch, supports every mode)";

std::string pair_function(const std::string& loss) {
  if (loss == "ff") return "ff_loss";
  if (loss == "symba") return "symba_loss";
  if (loss == "sffa") return "sffa_loss";
  return "the FF pair losses";
}

// ffkern._op_autograd.refuse_unsupported_modes: a tangent on an input (forward-mode AD: torch.func.jvp
// and torch.autograd.forward_ad both attach it at level 0, the one level torch's own derivatives
// support), or an input of torch.func.grad/vjp that requires grad (such an input is a functorch
// TensorWrapper: its key set holds FuncTorchGradWrapper; functorch's layer stack is not in the
// headers an extension can use). Inputs that do not depend on the differentiated variable are not
// refused.
void refuse_unsupported_modes(const char* op, const std::string& function,
                              std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (!t->defined()) continue;
    TORCH_CHECK(!t->_fw_grad(/*level=*/0).defined(), "ffkern: backend 'cpp' does not support ",
                "forward-mode AD (torch.func.jvp, torch.func.jacfwd, torch.autograd.forward_ad) of ", function,
                " (operator ffkern::", op, "); ", kFallback);
  }
  for (const at::Tensor* t : tensors) {
    if (!t->defined()) continue;
    TORCH_CHECK(!(t->key_set().has(c10::DispatchKey::FuncTorchGradWrapper) && t->requires_grad()),
                "ffkern: backend 'cpp' does not support torch.func.grad/vjp/jacrev/hessian of ", function,
                " (operator ffkern::", op, "); use torch.autograd.grad or loss.backward(), or ", kFallback);
  }
}

bool needs_graph(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors)
    if (t->requires_grad()) return true;
  return false;
}

using GoodnessOut = std::tuple<at::Tensor, at::Tensor>;
using PairOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

const c10::TypedOperatorHandle<GoodnessOut(const at::Tensor&, std::string, int64_t)>& goodness_fused_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ffkern::goodness_fused", "")
                             .typed<GoodnessOut(const at::Tensor&, std::string, int64_t)>();
  return op;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, std::string, int64_t,
                                          const std::optional<at::Tensor>&)>&
goodness_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ffkern::goodness_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, std::string, int64_t,
                                               const std::optional<at::Tensor>&)>();
  return op;
}

const c10::TypedOperatorHandle<PairOut(const at::Tensor&, const at::Tensor&, std::string, double, std::string,
                                       int64_t, bool)>&
pair_loss_fused_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ffkern::pair_loss_fused", "")
                             .typed<PairOut(const at::Tensor&, const at::Tensor&, std::string, double, std::string,
                                            int64_t, bool)>();
  return op;
}

using PairBackward = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, std::string, double, std::string, int64_t,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&);

const c10::TypedOperatorHandle<PairBackward>& pair_loss_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ffkern::pair_loss_backward", "").typed<PairBackward>();
  return op;
}

// A *_backward operator from a backward formula (ffkern._op_autograd.call_backward_op): under
// create_graph=True (grad mode on) through its Autograd kernel, which refuses double backward;
// otherwise straight to the kernel, as the autograd kernel would find nothing to record.
template <typename F>
auto call_backward(F&& call) {
  if (at::GradMode::is_enabled()) return call();
  at::AutoDispatchBelowADInplaceOrView below;
  return call();
}

struct GoodnessFunction : public torch::autograd::Function<GoodnessFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, std::string kind, int64_t skip_tokens) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [g, mean] = goodness_fused_op().call(h, kind, skip_tokens);
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({mean});
    ctx->save_for_backward({h, mean});
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["skip_tokens"] = skip_tokens;
    return {g, mean};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};  // g unused
    const auto saved = ctx->get_saved_variables();
    const std::string kind = ctx->saved_data["kind"].toStringRef();
    const int64_t skip_tokens = ctx->saved_data["skip_tokens"].toInt();
    at::Tensor dh = call_backward([&] {
      return goodness_backward_op().call(grads[0], saved[0], kind, skip_tokens, saved[1]);
    });
    return {dh, at::Tensor(), at::Tensor()};
  }
};

struct PairLossFunction : public torch::autograd::Function<PairLossFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h_pos, const at::Tensor& h_neg,
                               std::string loss, double param, std::string kind, int64_t skip_tokens,
                               bool activity_term) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [value, activity, mean_pos, mean_neg, energies] =
        pair_loss_fused_op().call(h_pos, h_neg, loss, param, kind, skip_tokens, activity_term);
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({activity, mean_pos, mean_neg, energies});
    ctx->save_for_backward({h_pos, h_neg, activity_term ? activity : at::Tensor(), mean_pos, mean_neg, energies});
    ctx->saved_data["loss"] = loss;
    ctx->saved_data["param"] = param;
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["skip_tokens"] = skip_tokens;
    return {value, activity, mean_pos, mean_neg, energies};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);
    if (!grads[0].defined()) return out;  // the loss unused
    const auto saved = ctx->get_saved_variables();
    const std::string loss = ctx->saved_data["loss"].toStringRef();
    const std::string kind = ctx->saved_data["kind"].toStringRef();
    const double param = ctx->saved_data["param"].toDouble();
    const int64_t skip_tokens = ctx->saved_data["skip_tokens"].toInt();
    const std::optional<at::Tensor> activity =
        saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::optional<at::Tensor>();
    auto [d_pos, d_neg] = call_backward([&] {
      return pair_loss_backward_op().call(grads[0], saved[0], saved[1], loss, param, kind, skip_tokens, activity,
                                          saved[3], saved[4], saved[5]);
    });
    out[0] = d_pos;
    out[1] = d_neg;
    return out;
  }
};

GoodnessOut goodness_fused_autograd(const at::Tensor& h, std::string kind, int64_t skip_tokens) {
  refuse_unsupported_modes("goodness_fused", "ff_goodness", {&h});
  if (!needs_graph({&h})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return goodness_fused_op().call(h, kind, skip_tokens);
  }
  auto out = GoodnessFunction::apply(h, kind, skip_tokens);
  return {out[0], out[1]};
}

PairOut pair_loss_fused_autograd(const at::Tensor& h_pos, const at::Tensor& h_neg, std::string loss, double param,
                                 std::string kind, int64_t skip_tokens, bool activity_term) {
  refuse_unsupported_modes("pair_loss_fused", pair_function(loss), {&h_pos, &h_neg});
  if (!needs_graph({&h_pos, &h_neg})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return pair_loss_fused_op().call(h_pos, h_neg, loss, param, kind, skip_tokens, activity_term);
  }
  auto out = PairLossFunction::apply(h_pos, h_neg, loss, param, kind, skip_tokens, activity_term);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace
}  // namespace ffkern

TORCH_LIBRARY_IMPL(ffkern, Autograd, m) {
  m.impl("goodness_fused", &ffkern::goodness_fused_autograd);
  m.impl("pair_loss_fused", &ffkern::pair_loss_fused_autograd);
}
