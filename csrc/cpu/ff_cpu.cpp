// CPU kernels of the FF goodness losses (SPEC 2), registered for the CPU dispatch key.
//
// Each sample is independent: forward reads its activations once (token mean, then the two
// energies of ff_math.h), backward reads them once more and writes dL/dh. Samples are split over
// threads with at::parallel_for; per-sample terms go to a buffer that is then summed in sample
// order, so the loss does not depend on the thread count (bitwise reproducible).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <vector>

#include "../checks.h"
#include "../ff_math.h"
#include "simd.h"

namespace ffkern {
namespace cpu {
namespace {

// Sum of squares of n values, in kLanes independent partial sums: the compiler vectorizes the
// lanes without reassociating a float reduction (which it may not do without -ffast-math). The
// order of the sums is fixed by the source, so every instruction-set clone gives the same bits.
template <typename T, typename acc_t>
FFKERN_ALWAYS_INLINE acc_t sum_squares(const T* x, int64_t n) {
  constexpr int kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const acc_t v = static_cast<acc_t>(x[i + k]);
      lanes[k] += v * v;
    }
  }
  acc_t total = 0;
  for (; i < n; ++i) total += static_cast<acc_t>(x[i]) * static_cast<acc_t>(x[i]);
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

// sum_squares and, in the same pass, the plain sum of the n values (*sum; SFFA's activity term).
// The same kLanes partial sums as sum_squares, held in GCC vector types: written as two lane arrays
// (as sum_squares is) GCC 12 vectorizes the outer loop with lane permutes instead, ~6x slower.
template <typename T, typename acc_t>
FFKERN_ALWAYS_INLINE acc_t sum_squares_and_sum(const T* x, int64_t n, acc_t* sum) {
  constexpr int kLanes = 16;
  typedef acc_t Lanes __attribute__((vector_size(kLanes * sizeof(acc_t))));
  Lanes lanes = {}, plain = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Lanes v;
    if constexpr (std::is_same_v<T, acc_t>) {
      std::memcpy(&v, x + i, sizeof(v));
    } else {
      for (int k = 0; k < kLanes; ++k) v[k] = static_cast<acc_t>(x[i + k]);
    }
    lanes += v * v;
    plain += v;
  }
  acc_t total = 0, total_plain = 0;
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    total += v * v;
    total_plain += v;
  }
  for (int k = 0; k < kLanes; ++k) {
    total += lanes[k];
    total_plain += plain[k];
  }
  *sum = total_plain;
  return total;
}

// E0, E1 of the mean x [dim]; with sum non-null also the sum of its entries, in the same pass.
template <typename T, typename acc_t>
FFKERN_ALWAYS_INLINE void half_energies(const T* x, int64_t dim, acc_t* e0, acc_t* e1, acc_t* sum) {
  const int64_t half = dim / 2;
  if (sum == nullptr) {
    *e0 = sum_squares<T, acc_t>(x, half);
    *e1 = sum_squares<T, acc_t>(x + half, dim - half);
    return;
  }
  acc_t s0, s1;
  *e0 = sum_squares_and_sum<T, acc_t>(x, half, &s0);
  *e1 = sum_squares_and_sum<T, acc_t>(x + half, dim - half, &s1);
  *sum = s0 + s1;
}

// Energies E0 (first D/2 features) and E1 (the rest) of one sample h [T, D], from the token mean
// over tokens skip..T-1. With a single token in the mean ([B, D], or [B, T, D] with skip = T-1) the
// mean is that row itself: read in place, nothing copied. Otherwise the mean goes to m [D].
// Returns the mean's address (the row, or m), which write_grad reads. With sum non-null, *sum is
// the sum of the mean's D entries (SFFA's activity term), taken in the pass of the energies.
template <typename in_t, typename acc_t>
FFKERN_ALWAYS_INLINE const void* sample_energies(const in_t* h, int64_t tokens, int64_t dim, int64_t skip, acc_t* m,
                                                 acc_t* e0, acc_t* e1, acc_t* sum) {
  const in_t* first = h + skip * dim;
  if (tokens - skip == 1 && std::is_same_v<in_t, acc_t>) {
    half_energies<in_t, acc_t>(first, dim, e0, e1, sum);
    return first;
  }
  for (int64_t d = 0; d < dim; ++d) m[d] = static_cast<acc_t>(first[d]);
  if (tokens - skip > 1) {
    for (int64_t t = skip + 1; t < tokens; ++t) {
      const in_t* row = h + t * dim;
      for (int64_t d = 0; d < dim; ++d) m[d] += static_cast<acc_t>(row[d]);
    }
    const acc_t inv_count = acc_t(1) / acc_t(tokens - skip);
    for (int64_t d = 0; d < dim; ++d) m[d] *= inv_count;
  }
  half_energies<acc_t, acc_t>(m, dim, e0, e1, sum);
  return m;
}

// c m + k, SFFA's activity term's gradient. float32 (the instruction-set clones and the streamed
// path) takes one fused multiply-add, so that every clone and both store paths give the same bits
// (GCC would contract c m + k into an FMA where the target has one and not elsewhere); the
// portable types compile for the baseline ISA, where nothing is contracted.
template <typename acc_t>
FFKERN_ALWAYS_INLINE acc_t affine(acc_t c, acc_t m, acc_t k) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return std::fma(c, m, k);
  } else {
    return c * m + k;
  }
}

// dL/dh of one sample: dL/dE_half(d) * 2 m_d / T' (+ shift, when shifted) for the mean's tokens,
// 0 for skipped ones. mean: what sample_energies returned (in_t when it is the row itself, else
// acc_t). shift: SFFA's activity term's constant (sffa_activity_shift); without it no add at all.
template <typename in_t, typename acc_t>
FFKERN_ALWAYS_INLINE void write_grad(in_t* dh, int64_t tokens, int64_t dim, int64_t skip, const void* mean,
                                     bool mean_is_row, acc_t d0, acc_t d1, bool shifted, acc_t shift) {
  const int64_t half = dim / 2;
  const acc_t c0 = acc_t(2) * d0 / acc_t(tokens - skip), c1 = acc_t(2) * d1 / acc_t(tokens - skip);
  for (int64_t t = 0; t < skip; ++t) {
    in_t* row = dh + t * dim;
    for (int64_t d = 0; d < dim; ++d) row[d] = in_t(0);
  }
  const auto fill = [&](const auto* m) {
    for (int64_t t = skip; t < tokens; ++t) {
      in_t* row = dh + t * dim;
      if (shifted) {
        for (int64_t d = 0; d < half; ++d) row[d] = static_cast<in_t>(affine(c0, static_cast<acc_t>(m[d]), shift));
        for (int64_t d = half; d < dim; ++d) row[d] = static_cast<in_t>(affine(c1, static_cast<acc_t>(m[d]), shift));
      } else {
        for (int64_t d = 0; d < half; ++d) row[d] = static_cast<in_t>(c0 * static_cast<acc_t>(m[d]));
        for (int64_t d = half; d < dim; ++d) row[d] = static_cast<in_t>(c1 * static_cast<acc_t>(m[d]));
      }
    }
  };
  if (mean_is_row) {
    fill(static_cast<const in_t*>(mean));
  } else {
    fill(static_cast<const acc_t*>(mean));
  }
}

// Gradients larger than the caches are written with non-temporal (streaming) stores: a plain
// store first reads the line it writes (read for ownership), so dh would cost a read and a write
// of memory; streamed it costs the write only, which is what a copy costs. Small gradients keep
// plain stores, so that they are still in cache for whoever reads them next. The values are the
// same products either way (bitwise).
constexpr int64_t kStreamBytes = int64_t(8) << 20;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FFKERN_HAVE_STREAM 1
__attribute__((target("avx512f"))) void stream_scaled(float* dst, const float* src, int64_t n, float c) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63) != 0; ++i) dst[i] = c * src[i];
  const __m512 vc = _mm512_set1_ps(c);
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_mul_ps(vc, _mm512_loadu_ps(src + i)));
  for (; i < n; ++i) dst[i] = c * src[i];
}
__attribute__((target("avx512f"))) void stream_affine(float* dst, const float* src, int64_t n, float c, float k) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63) != 0; ++i) dst[i] = std::fma(c, src[i], k);
  const __m512 vc = _mm512_set1_ps(c), vk = _mm512_set1_ps(k);
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_fmadd_ps(vc, _mm512_loadu_ps(src + i), vk));
  for (; i < n; ++i) dst[i] = std::fma(c, src[i], k);
}
__attribute__((target("avx512f"))) void stream_zeros(float* dst, int64_t n) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63) != 0; ++i) dst[i] = 0.0f;
  const __m512 zero = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, zero);
  for (; i < n; ++i) dst[i] = 0.0f;
}
bool can_stream() {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512;
}
// Streaming stores are weakly ordered: fence them before the thread's results are used.
void store_fence() { _mm_sfence(); }
#else
void stream_scaled(float*, const float*, int64_t, float) {}
void stream_affine(float*, const float*, int64_t, float, float) {}
void stream_zeros(float*, int64_t) {}
bool can_stream() { return false; }
void store_fence() {}
#endif

bool stream_output(int64_t output_bytes) { return output_bytes >= kStreamBytes && can_stream(); }

// write_grad for float32 with streaming stores (same values as write_grad).
void write_grad_streamed(float* dh, int64_t tokens, int64_t dim, int64_t skip, const float* m, float d0, float d1,
                         bool shifted, float shift) {
  const int64_t half = dim / 2;
  const float c0 = 2.0f * d0 / float(tokens - skip), c1 = 2.0f * d1 / float(tokens - skip);
  stream_zeros(dh, skip * dim);
  for (int64_t t = skip; t < tokens; ++t) {
    float* row = dh + t * dim;
    if (shifted) {
      stream_affine(row, m, half, c0, shift);
      stream_affine(row + half, m + half, dim - half, c1, shift);
    } else {
      stream_scaled(row, m, half, c0);
      stream_scaled(row + half, m + half, dim - half, c1);
    }
  }
}

// The per-sample work as plain functions: float32 (the common case) gets one copy per instruction
// set (FFKERN_CLONES, AVX-512 where the CPU has it; a portable build is SSE2 otherwise), the other
// types the portable template.
template <typename in_t, typename acc_t>
struct Sample {
  static const void* energies(const in_t* h, int64_t tokens, int64_t dim, int64_t skip, acc_t* m, acc_t* e0,
                              acc_t* e1, acc_t* sum = nullptr) {
    return sample_energies<in_t, acc_t>(h, tokens, dim, skip, m, e0, e1, sum);
  }
  static void grad(in_t* dh, int64_t tokens, int64_t dim, int64_t skip, const void* mean, bool mean_is_row, acc_t d0,
                   acc_t d1, bool /*stream*/, bool shifted = false, acc_t shift = acc_t(0)) {
    write_grad<in_t, acc_t>(dh, tokens, dim, skip, mean, mean_is_row, d0, d1, shifted, shift);
  }
};

FFKERN_CLONES const void* energies_f32(const float* h, int64_t tokens, int64_t dim, int64_t skip, float* m, float* e0,
                                       float* e1, float* sum) {
  return sample_energies<float, float>(h, tokens, dim, skip, m, e0, e1, sum);
}
FFKERN_CLONES void grad_f32(float* dh, int64_t tokens, int64_t dim, int64_t skip, const void* mean, bool mean_is_row,
                            float d0, float d1, bool shifted, float shift) {
  write_grad<float, float>(dh, tokens, dim, skip, mean, mean_is_row, d0, d1, shifted, shift);
}
template <>
struct Sample<float, float> {
  static const void* energies(const float* h, int64_t tokens, int64_t dim, int64_t skip, float* m, float* e0,
                              float* e1, float* sum = nullptr) {
    return energies_f32(h, tokens, dim, skip, m, e0, e1, sum);
  }
  static void grad(float* dh, int64_t tokens, int64_t dim, int64_t skip, const void* mean, bool mean_is_row, float d0,
                   float d1, bool stream, bool shifted = false, float shift = 0.0f) {
    if (stream) {
      write_grad_streamed(dh, tokens, dim, skip, static_cast<const float*>(mean), d0, d1, shifted, shift);
    } else {
      grad_f32(dh, tokens, dim, skip, mean, mean_is_row, d0, d1, shifted, shift);
    }
  }
};

int64_t grain_for(int64_t per_sample) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, per_sample)); }

// The token means [B, D] the forward returns for the backward (acc type): only where a sample's
// mean is not one row of h (T' = T - skip_tokens > 1); an empty tensor otherwise, and the backward
// then reads that row of h in place.
at::Tensor token_mean_output(const at::Tensor& h, const TokenShape& s, int64_t skip_tokens) {
  const bool saved = s.tokens - skip_tokens > 1;
  return saved ? at::empty({s.batch, s.dim}, h.options().dtype(compute_type(h.scalar_type())))
               : at::empty({0}, h.options().dtype(compute_type(h.scalar_type())));
}

// A saved token mean given to a backward op: defined and non-empty, else null (read h instead).
const at::Tensor* saved_mean(const char* name, const std::optional<at::Tensor>& mean, const at::Tensor& h,
                             const TokenShape& s) {
  if (!mean.has_value() || !mean->defined() || mean->numel() == 0) return nullptr;
  TORCH_CHECK(mean->dim() == 2 && mean->size(0) == s.batch && mean->size(1) == s.dim, name, " must be [B, D] = [",
              s.batch, ", ", s.dim, "] (the forward's token means), got shape ", mean->sizes());
  TORCH_CHECK(mean->scalar_type() == compute_type(h.scalar_type()), name, " must be ", compute_type(h.scalar_type()),
              " (the accumulation type of ", h.scalar_type(), "), got ", mean->scalar_type());
  TORCH_CHECK(mean->device() == h.device() && mean->is_contiguous(), name, " must be contiguous, on ", h.device());
  return &*mean;
}

// One sample's energies for a backward: from its saved token mean (saved non-null: [D], acc type;
// T' rows of dh are the same function of it) or from h. Returns the mean write_grad reads and sets
// *is_row (the mean is a row of h, in_t).
template <typename in_t, typename acc_t>
FFKERN_ALWAYS_INLINE const void* backward_energies(const acc_t* saved, const in_t* h, int64_t tokens, int64_t dim,
                                                   int64_t skip, acc_t* m, acc_t* e0, acc_t* e1, bool* is_row) {
  if (saved != nullptr) {
    *is_row = false;
    return Sample<acc_t, acc_t>::energies(saved, 1, dim, 0, nullptr, e0, e1);  // read in place
  }
  const void* mean = Sample<in_t, acc_t>::energies(h, tokens, dim, skip, m, e0, e1);
  *is_row = mean != m;
  return mean;
}

// Returns (g [B], token means [B, D] or empty: token_mean_output).
std::tuple<at::Tensor, at::Tensor> goodness_fused(const at::Tensor& h_in, std::string kind, int64_t skip_tokens) {
  const bool mean = parse_kind_is_mean(kind);
  const TokenShape s = check_activations("h", h_in, skip_tokens);
  const at::Tensor h = h_in.detach().contiguous();
  at::Tensor g = at::empty({s.batch}, h.options().dtype(compute_type(h.scalar_type())));
  at::Tensor means = token_mean_output(h, s, skip_tokens);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "ffkern_goodness_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hp = h.data_ptr<scalar_t>();
    acc_t* gp = g.data_ptr<acc_t>();
    acc_t* mp = means.numel() ? means.data_ptr<acc_t>() : nullptr;
    const acc_t gscale = mean ? acc_t(1) / acc_t(s.dim) : acc_t(1);
    at::parallel_for(0, s.batch, grain_for(s.tokens * s.dim), [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> m(s.dim);
      for (int64_t b = b0; b < b1; ++b) {
        acc_t e0, e1;
        acc_t* mean_b = mp != nullptr ? mp + b * s.dim : m.data();  // the mean goes straight to the output
        Sample<scalar_t, acc_t>::energies(hp + b * s.tokens * s.dim, s.tokens, s.dim, skip_tokens, mean_b, &e0, &e1);
        gp[b] = (e0 + e1) * gscale;
      }
    });
  });
  return {g, means};
}

at::Tensor goodness_backward(const at::Tensor& grad_in, const at::Tensor& h_in, std::string kind, int64_t skip_tokens,
                             const std::optional<at::Tensor>& mean_in) {
  const bool mean = parse_kind_is_mean(kind);
  const TokenShape s = check_activations("h", h_in, skip_tokens);
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == s.batch, "grad must be [B] with B=", s.batch, ", got ",
              grad_in.sizes());
  const at::Tensor* saved = saved_mean("mean", mean_in, h_in, s);
  // with the saved means h is not read: only its shape matters, so no contiguous copy of it
  const at::Tensor h = saved != nullptr ? h_in.detach() : h_in.detach().contiguous();
  at::Tensor dh = at::empty(h.sizes(), h.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "ffkern_goodness_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor grad = grad_in.detach().to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* gr = grad.data_ptr<acc_t>();
    const scalar_t* hp = saved != nullptr ? nullptr : h.data_ptr<scalar_t>();
    const acc_t* sm = saved != nullptr ? saved->data_ptr<acc_t>() : nullptr;
    scalar_t* dp = dh.data_ptr<scalar_t>();
    const acc_t gscale = mean ? acc_t(1) / acc_t(s.dim) : acc_t(1);
    const bool stream = std::is_same_v<scalar_t, float> && stream_output(dh.nbytes());
    at::parallel_for(0, s.batch, grain_for(s.tokens * s.dim), [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> m(s.dim);
      for (int64_t b = b0; b < b1; ++b) {
        acc_t e0, e1;
        bool is_row;
        const int64_t off = b * s.tokens * s.dim;
        const void* mean_b = backward_energies<scalar_t, acc_t>(sm != nullptr ? sm + b * s.dim : nullptr,
                                                                hp + (hp != nullptr ? off : 0), s.tokens, s.dim,
                                                                skip_tokens, m.data(), &e0, &e1, &is_row);
        const acc_t de = gr[b] * gscale;  // dL/dE = dL/dg * dg/dE for both halves
        Sample<scalar_t, acc_t>::grad(dp + off, s.tokens, s.dim, skip_tokens, mean_b, is_row, de, de, stream);
      }
      if (stream) store_fence();
    });
  });
  return dh;
}

// SFFA's activity term applies to SFFA only (ffkern.reference.sffa_loss).
void check_activity(bool activity_term, int loss, const std::string& loss_name) {
  TORCH_CHECK(!activity_term || loss == kLossSFFA, "activity_term is SFFA's factor: it needs loss 'sffa', got '",
              loss_name, "'");
}

// Returns (L, activity, means of h+, means of h-): L the 0-dim loss (L_S A with the activity term),
// activity = (L_S, A) [2] for the backward with the term (an empty tensor without it), and the token
// means [B, D] for the backward (token_mean_output).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_loss_fused(const at::Tensor& hp_in, const at::Tensor& hn_in,
                                                   std::string loss_name, double param, std::string kind,
                                                   int64_t skip_tokens, bool activity_term) {
  const int loss = parse_pair_loss(loss_name);
  const bool mean = parse_kind_is_mean(kind);
  const TokenShape s = check_pair(hp_in, hn_in, loss, skip_tokens);
  check_activity(activity_term, loss, loss_name);
  const at::Tensor hp = hp_in.detach().contiguous(), hn = hn_in.detach().contiguous();
  const at::ScalarType ct = compute_type(hp.scalar_type());
  at::Tensor out = at::empty({}, hp.options().dtype(ct));
  at::Tensor activity = at::empty({activity_term ? 2 : 0}, hp.options().dtype(ct));
  at::Tensor means_p = token_mean_output(hp, s, skip_tokens), means_n = token_mean_output(hn, s, skip_tokens);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hp.scalar_type(), "ffkern_pair_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = hp.data_ptr<scalar_t>();
    const scalar_t* np = hn.data_ptr<scalar_t>();
    acc_t* mpp = means_p.numel() ? means_p.data_ptr<acc_t>() : nullptr;
    acc_t* mnp = means_n.numel() ? means_n.data_ptr<acc_t>() : nullptr;
    const acc_t gscale = mean ? acc_t(1) / acc_t(s.dim) : acc_t(1);
    // per sample: the loss term, and with the activity term the sums of the token means of h+, h-
    const int64_t per = activity_term ? 3 : 1;
    std::vector<acc_t> terms(s.batch * per);
    at::parallel_for(0, s.batch, grain_for(2 * s.tokens * s.dim), [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> m(s.dim);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t off = b * s.tokens * s.dim;
        acc_t e0p, e1p, e0n, e1n;
        acc_t* sums = activity_term ? &terms[b * per + 1] : nullptr;
        // the means go straight to the outputs
        acc_t* m_p = mpp != nullptr ? mpp + b * s.dim : m.data();
        acc_t* m_n = mnp != nullptr ? mnp + b * s.dim : m.data();
        Sample<scalar_t, acc_t>::energies(pp + off, s.tokens, s.dim, skip_tokens, m_p, &e0p, &e1p, sums);
        Sample<scalar_t, acc_t>::energies(np + off, s.tokens, s.dim, skip_tokens, m_n, &e0n, &e1n,
                                          sums == nullptr ? nullptr : sums + 1);
        terms[b * per] = pair_term<acc_t>(loss, acc_t(param), gscale, e0p, e1p, e0n, e1n);
      }
    });
    double total = 0, sum_pos = 0, sum_neg = 0;  // in sample order: independent of the thread split
    for (int64_t b = 0; b < s.batch; ++b) total += double(terms[b * per]);
    const double loss_s = total * pair_normalizer<double>(loss, s.batch);
    if (!activity_term) {
      out.fill_(loss_s);
      return;
    }
    for (int64_t b = 0; b < s.batch; ++b) {
      sum_pos += double(terms[b * per + 1]);
      sum_neg += double(terms[b * per + 2]);
    }
    // mu = sum over samples of the token means' sums / (B D): the mean of the kept entries
    const double entries = double(s.batch) * double(s.dim);
    const acc_t a = sffa_activity<acc_t>(acc_t((sum_pos + sum_neg) / entries));
    acc_t* act = activity.data_ptr<acc_t>();
    act[0] = acc_t(loss_s);
    act[1] = a;
    out.fill_(acc_t(loss_s) * a);
  });
  return {out, activity, means_p, means_n};
}

// (L_S, A) from pair_loss_fused's activity output, when given (as doubles; has = false without it).
struct Activity {
  bool has = false;
  double loss_s = 0, a = 1;
};

Activity read_activity(const std::optional<at::Tensor>& activity, int loss, const std::string& loss_name) {
  Activity out;
  if (!activity.has_value() || !activity->defined()) return out;
  TORCH_CHECK(activity->numel() == 2, "activity must hold (L_S, A), 2 values, got shape ", activity->sizes());
  check_activity(true, loss, loss_name);
  const at::Tensor v = activity->detach().to(at::kDouble).cpu();
  out.has = true;
  out.loss_s = v.data_ptr<double>()[0];
  out.a = v.data_ptr<double>()[1];
  return out;
}

std::tuple<at::Tensor, at::Tensor> pair_loss_backward(const at::Tensor& grad_in, const at::Tensor& hp_in,
                                                      const at::Tensor& hn_in, std::string loss_name, double param,
                                                      std::string kind, int64_t skip_tokens,
                                                      const std::optional<at::Tensor>& activity_in,
                                                      const std::optional<at::Tensor>& mean_pos,
                                                      const std::optional<at::Tensor>& mean_neg) {
  const int loss = parse_pair_loss(loss_name);
  const bool mean = parse_kind_is_mean(kind);
  const TokenShape s = check_pair(hp_in, hn_in, loss, skip_tokens);
  TORCH_CHECK(grad_in.numel() == 1, "grad must hold one value (the loss is a scalar), got shape ", grad_in.sizes());
  const Activity activity = read_activity(activity_in, loss, loss_name);
  const at::Tensor* saved_p = saved_mean("mean_pos", mean_pos, hp_in, s);
  const at::Tensor* saved_n = saved_mean("mean_neg", mean_neg, hn_in, s);
  // h is read only where its means were not saved (else only its shape matters: no contiguous copy)
  const at::Tensor hp = saved_p != nullptr ? hp_in.detach() : hp_in.detach().contiguous();
  const at::Tensor hn = saved_n != nullptr ? hn_in.detach() : hn_in.detach().contiguous();
  const auto contiguous = hp.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dhp = at::empty(hp.sizes(), contiguous), dhn = at::empty(hn.sizes(), contiguous);
  const double grad = grad_in.detach().to(at::kDouble).item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hp.scalar_type(), "ffkern_pair_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = saved_p != nullptr ? nullptr : hp.data_ptr<scalar_t>();
    const scalar_t* np = saved_n != nullptr ? nullptr : hn.data_ptr<scalar_t>();
    const acc_t* smp = saved_p != nullptr ? saved_p->data_ptr<acc_t>() : nullptr;
    const acc_t* smn = saved_n != nullptr ? saved_n->data_ptr<acc_t>() : nullptr;
    scalar_t* dpp = dhp.data_ptr<scalar_t>();
    scalar_t* dnp = dhn.data_ptr<scalar_t>();
    const acc_t gscale = mean ? acc_t(1) / acc_t(s.dim) : acc_t(1);
    // dL/dh = A dL_S/dh + L_S dA/dh: the pair gradient scaled by A, plus a constant per kept element
    const acc_t a = acc_t(activity.a), loss_s = acc_t(activity.loss_s);
    const acc_t scale = acc_t(grad * pair_normalizer<double>(loss, s.batch)) * a;
    const acc_t inv_count = acc_t(1.0 / (double(s.batch) * double(s.tokens - skip_tokens) * double(s.dim)));
    const acc_t shift = activity.has ? sffa_activity_shift<acc_t>(acc_t(grad), loss_s, a, inv_count) : acc_t(0);
    const bool stream = std::is_same_v<scalar_t, float> && stream_output(dhp.nbytes() + dhn.nbytes());
    at::parallel_for(0, s.batch, grain_for(4 * s.tokens * s.dim), [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> mp(s.dim), mn(s.dim);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t off = b * s.tokens * s.dim;
        acc_t e0p, e1p, e0n, e1n, dp[2], dn[2];
        bool row_p, row_n;
        const void* mean_p = backward_energies<scalar_t, acc_t>(smp != nullptr ? smp + b * s.dim : nullptr,
                                                                pp + (pp != nullptr ? off : 0), s.tokens, s.dim,
                                                                skip_tokens, mp.data(), &e0p, &e1p, &row_p);
        const void* mean_n = backward_energies<scalar_t, acc_t>(smn != nullptr ? smn + b * s.dim : nullptr,
                                                                np + (np != nullptr ? off : 0), s.tokens, s.dim,
                                                                skip_tokens, mn.data(), &e0n, &e1n, &row_n);
        pair_grad<acc_t>(loss, acc_t(param), gscale, e0p, e1p, e0n, e1n, scale, dp, dn);
        Sample<scalar_t, acc_t>::grad(dpp + off, s.tokens, s.dim, skip_tokens, mean_p, row_p, dp[0], dp[1], stream,
                                      activity.has, shift);
        Sample<scalar_t, acc_t>::grad(dnp + off, s.tokens, s.dim, skip_tokens, mean_n, row_n, dn[0], dn[1], stream,
                                      activity.has, shift);
      }
      if (stream) store_fence();
    });
  });
  return {dhp, dhn};
}

}  // namespace
}  // namespace cpu
}  // namespace ffkern

TORCH_LIBRARY_IMPL(ffkern, CPU, m) {
  m.impl("goodness_fused", &ffkern::cpu::goodness_fused);
  m.impl("goodness_backward", &ffkern::cpu::goodness_backward);
  m.impl("pair_loss_fused", &ffkern::cpu::pair_loss_fused);
  m.impl("pair_loss_backward", &ffkern::cpu::pair_loss_backward);
}
