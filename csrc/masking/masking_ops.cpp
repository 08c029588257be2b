// torch glue of the masking ops: argument checks, and dispatch to the CPU / CUDA launchers (the schemas are
// defined in Python, masklm_kernels/masking/ops.py).
// The Python API (masklm_kernels/masking/api.py) validates user input with friendly messages and
// normalises it; the TORCH_CHECKs here guard the op boundary for direct torch.ops callers.
#include <torch/library.h>
#include <ATen/ATen.h>

#if defined(MLK_WITH_CUDA)
// c10's stream / guard / launch-check headers only: ATen/cuda/CUDAContext.h would also pull in the
// cuBLAS and cuSPARSE headers, which a minimal toolkit does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <cstring>

#include "masking_launch.h"

namespace mlk {
namespace {

const int64_t* opt_i64(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<int64_t>() : nullptr;
}

void check_meta(const std::optional<at::Tensor>& t, const at::Tensor& ids, const char* name,
                at::ScalarType dtype, bool per_token) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == ids.device(), name, " must be on ", ids.device(), ", got ", t->device());
  TORCH_CHECK(t->scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t->scalar_type());
  TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
  if (per_token) {
    TORCH_CHECK(t->sizes() == ids.sizes(), name, " must have shape ", ids.sizes(), ", got ", t->sizes());
  } else {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == ids.size(0), name, " must have shape (", ids.size(0), ",), got ",
                t->sizes());
  }
}

// A 0-dim integer tensor on the host is read now (no device sync); on the device its pointer is passed.
void scalar_arg(const at::Tensor& t, const at::Tensor& ids, const char* name, const int64_t** ptr, uint64_t* val) {
  TORCH_CHECK(t.dim() == 0 && t.scalar_type() == at::kLong, name, " must be a 0-dim int64 tensor");
  if (t.device().is_cpu()) {
    *ptr = nullptr;
    *val = static_cast<uint64_t>(t.item<int64_t>());
  } else {
    TORCH_CHECK(t.device() == ids.device(), name, " must be on the CPU or on ", ids.device());
    *ptr = t.data_ptr<int64_t>();
    *val = 0;
  }
}

Replace make_replace(int64_t mask_token_id, int64_t t_mask, int64_t t_rand, int64_t rand_lo, int64_t rand_hi) {
  TORCH_CHECK(0 <= t_mask && t_mask <= t_rand && t_rand <= (int64_t(1) << 32), "invalid replacement thresholds");
  TORCH_CHECK(rand_lo < rand_hi, "random_token_range must be non-empty");
  Replace rp;
  rp.t_mask = static_cast<uint64_t>(t_mask);
  rp.t_rand = static_cast<uint64_t>(t_rand);
  rp.mask_token_id = mask_token_id;
  rp.rand_lo = rand_lo;
  rp.rand_range = rand_hi - rand_lo;
  return rp;
}

void check_ids(const at::Tensor& ids) {
  TORCH_CHECK(ids.dim() == 2, "input_ids must be 2-D (B, S), got ", ids.dim(), "-D");
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
              "input_ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK(ids.is_contiguous(), "input_ids must be contiguous");
  TORCH_CHECK(ids.size(1) < (int64_t(1) << kPosBits), "sequence length must be < 2^24");
}

template <typename id_t>
void run_mask_tokens(MaskArgs<id_t>& a, const at::Tensor& ids) {
  if (ids.device().is_cpu()) {
    mask_tokens_cpu(a);
    return;
  }
#if defined(MLK_WITH_CUDA)
  const c10::cuda::CUDAGuard guard(ids.device());
  at::Tensor sel, keys;
  if (a.mode != kBernoulli) {  // workspaces come from the caching allocator: no sync, no cudaMalloc
    sel = at::empty(ids.sizes(), ids.options().dtype(at::kByte));
    keys = at::empty(ids.sizes(), ids.options().dtype(at::kLong));
    a.sel_ws = sel.data_ptr<uint8_t>();
    a.key_ws = keys.data_ptr<int64_t>();
  }
  mask_tokens_cuda(a, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  TORCH_CHECK(false, "masklm_kernels._C was built without CUDA support");
#endif
}

std::tuple<at::Tensor, at::Tensor> mask_tokens_impl(
    const at::Tensor& input_ids, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& attention_mask, const std::optional<at::Tensor>& special_tokens_mask,
    const at::Tensor& special_token_ids, const std::optional<at::Tensor>& word_ids, const at::Tensor& rates,
    const std::optional<at::Tensor>& sample_ids, const at::Tensor& seed, const at::Tensor& step, int64_t mode,
    at::IntArrayRef span_cdf, int64_t mask_token_id, int64_t t_mask, int64_t t_rand, int64_t rand_lo,
    int64_t rand_hi, int64_t ignore_index) {
  check_ids(input_ids);
  check_meta(lengths, input_ids, "lengths", at::kLong, false);
  check_meta(attention_mask, input_ids, "attention_mask", at::kByte, true);
  check_meta(special_tokens_mask, input_ids, "special_tokens_mask", at::kByte, true);
  check_meta(word_ids, input_ids, "word_ids", at::kLong, true);
  check_meta(sample_ids, input_ids, "sample_ids", at::kLong, false);
  TORCH_CHECK(special_token_ids.device() == input_ids.device() && special_token_ids.scalar_type() == at::kLong &&
                  special_token_ids.dim() == 1 && special_token_ids.is_contiguous(),
              "special_token_ids must be a contiguous 1-D int64 tensor on ", input_ids.device());
  TORCH_CHECK(rates.scalar_type() == at::kFloat && rates.is_contiguous(), "rates must be contiguous float32");
  TORCH_CHECK(mode >= kBernoulli && mode <= kSpanMode, "mode must be 0 (bernoulli), 1 (exact) or 2 (span)");
  TORCH_CHECK(static_cast<int64_t>(span_cdf.size()) < kMaxSpanLen, "at most ", kMaxSpanLen - 1, " span CDF entries");

  auto out = at::empty_like(input_ids);
  auto labels = at::empty_like(input_ids);
  const int64_t B = input_ids.size(0), S = input_ids.size(1);

  AT_DISPATCH_INDEX_TYPES(input_ids.scalar_type(), "mask_tokens", [&] {
    MaskArgs<index_t> a;
    std::memset(&a, 0, sizeof(a));
    a.ids = input_ids.data_ptr<index_t>();
    a.out_ids = out.data_ptr<index_t>();
    a.labels = labels.data_ptr<index_t>();
    a.B = B;
    a.S = S;
    a.lengths = opt_i64(lengths);
    a.attn = attention_mask.has_value() ? attention_mask->data_ptr<uint8_t>() : nullptr;
    a.special_mask = special_tokens_mask.has_value() ? special_tokens_mask->data_ptr<uint8_t>() : nullptr;
    a.special_ids = special_token_ids.data_ptr<int64_t>();
    a.n_special = special_token_ids.numel();
    a.word_ids = opt_i64(word_ids);
    if (rates.dim() == 0 && rates.device().is_cpu()) {
      a.rates = nullptr;
      a.rate_scalar = rates.item<float>();
    } else {
      TORCH_CHECK(rates.device() == input_ids.device(), "rates must be on ", input_ids.device());
      TORCH_CHECK(rates.dim() == 0 || (rates.dim() == 1 && rates.size(0) == B) || rates.sizes() == input_ids.sizes(),
                  "rates must be 0-dim, (B,) or (B, S)");
      a.rates = rates.data_ptr<float>();
      a.rate_sb = rates.dim() >= 1 ? (rates.dim() == 2 ? S : 1) : 0;
      a.rate_ss = rates.dim() == 2 ? 1 : 0;
    }
    a.sample_ids = opt_i64(sample_ids);
    scalar_arg(seed, input_ids, "seed", &a.seed_ptr, &a.seed_val);
    scalar_arg(step, input_ids, "step", &a.step_ptr, &a.step_val);
    a.rp = make_replace(mask_token_id, t_mask, t_rand, rand_lo, rand_hi);
    a.ignore_index = ignore_index;
    a.mode = static_cast<int>(mode);
    a.span_ncdf = static_cast<int>(span_cdf.size());
    for (size_t i = 0; i < span_cdf.size(); ++i) {
      TORCH_CHECK(span_cdf[i] >= 0 && span_cdf[i] <= (int64_t(1) << 32), "span CDF thresholds must be in [0, 2^32]");
      // a threshold of 2^32 can never be reached by a 32-bit word: saturate to keep it unreachable
      a.span_cdf[i] = span_cdf[i] >= (int64_t(1) << 32) ? 0xFFFFFFFFu : static_cast<uint32_t>(span_cdf[i]);
    }
    run_mask_tokens(a, input_ids);
  });
  return {out, labels};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mass_mask_impl(
    const at::Tensor& input_ids, const at::Tensor& lengths, const at::Tensor& special_token_ids,
    const std::optional<at::Tensor>& sample_ids, const at::Tensor& seed, const at::Tensor& step, int64_t ratio_fx,
    int64_t mask_token_id, int64_t t_mask, int64_t t_rand, int64_t rand_lo, int64_t rand_hi, int64_t pad_token_id,
    int64_t ignore_index) {
  check_ids(input_ids);
  check_meta(lengths, input_ids, "lengths", at::kLong, false);
  check_meta(sample_ids, input_ids, "sample_ids", at::kLong, false);
  TORCH_CHECK(special_token_ids.device() == input_ids.device() && special_token_ids.scalar_type() == at::kLong &&
                  special_token_ids.dim() == 1 && special_token_ids.is_contiguous(),
              "special_token_ids must be a contiguous 1-D int64 tensor on ", input_ids.device());
  TORCH_CHECK(ratio_fx > 0 && ratio_fx <= (int64_t(1) << kFxBits), "fragment ratio must be in (0, 1]");
  auto enc = at::empty_like(input_ids);
  auto dec = at::empty_like(input_ids);
  auto labels = at::empty_like(input_ids);
  auto spans = at::empty({input_ids.size(0), 2}, input_ids.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(input_ids.scalar_type(), "mass_mask", [&] {
    MassArgs<index_t> a;
    std::memset(&a, 0, sizeof(a));
    a.ids = input_ids.data_ptr<index_t>();
    a.enc = enc.data_ptr<index_t>();
    a.dec = dec.data_ptr<index_t>();
    a.labels = labels.data_ptr<index_t>();
    a.spans = spans.data_ptr<int64_t>();
    a.B = input_ids.size(0);
    a.S = input_ids.size(1);
    a.lengths = lengths.data_ptr<int64_t>();
    a.special_ids = special_token_ids.data_ptr<int64_t>();
    a.n_special = special_token_ids.numel();
    a.sample_ids = opt_i64(sample_ids);
    scalar_arg(seed, input_ids, "seed", &a.seed_ptr, &a.seed_val);
    scalar_arg(step, input_ids, "step", &a.step_ptr, &a.step_val);
    a.ratio_fx = ratio_fx;
    a.rp = make_replace(mask_token_id, t_mask, t_rand, rand_lo, rand_hi);
    a.pad_token_id = pad_token_id;
    a.ignore_index = ignore_index;
    if (input_ids.device().is_cpu()) {
      mass_mask_cpu(a);
    } else {
#if defined(MLK_WITH_CUDA)
      const c10::cuda::CUDAGuard guard(input_ids.device());
      mass_mask_cuda(a, c10::cuda::getCurrentCUDAStream().stream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
      TORCH_CHECK(false, "masklm_kernels._C was built without CUDA support");
#endif
    }
  });
  return {enc, dec, labels, spans};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> t5_span_corruption_impl(
    const at::Tensor& input_ids, const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& sample_ids,
    const at::Tensor& seed, const at::Tensor& step, double noise_density, double mean_noise_span_length,
    int64_t sentinel_start_id, int64_t eos_token_id, int64_t pad_token_id, int64_t decoder_start_token_id,
    int64_t ignore_index, int64_t enc_width, int64_t dec_width) {
  check_ids(input_ids);
  check_meta(lengths, input_ids, "lengths", at::kLong, false);
  check_meta(sample_ids, input_ids, "sample_ids", at::kLong, false);
  TORCH_CHECK(noise_density > 0.0 && noise_density < 1.0, "noise_density must be in (0, 1), got ", noise_density);
  TORCH_CHECK(mean_noise_span_length >= 1.0 && mean_noise_span_length < 1e9,
              "mean_noise_span_length must be in [1, 1e9), got ", mean_noise_span_length);
  // the widest outputs any row length can make, and the most spans: the buffers and the sentinel ids
  // must hold them whatever the (unchecked, device-side) lengths are
  const int64_t S = input_ids.size(1);
  int64_t max_enc = 1, max_dec = 1, max_spans = 0;
  for (int64_t n = 0; n <= S; ++n) {
    int64_t noise = 0, spans = 0;
    t5_counts(n, noise_density, mean_noise_span_length, &noise, &spans);
    max_enc = std::max(max_enc, n - noise + spans + 1);
    max_dec = std::max(max_dec, noise + spans + 1);
    max_spans = std::max(max_spans, spans);
  }
  TORCH_CHECK(enc_width >= max_enc && dec_width >= max_dec, "output widths (", enc_width, ", ", dec_width,
              ") are below what rows of length <= ", S, " need (", max_enc, ", ", max_dec, ")");
  TORCH_CHECK(sentinel_start_id - (max_spans - 1) >= 0, "sentinel ids would go below 0: ", max_spans,
              " spans from sentinel_start_id ", sentinel_start_id);
  const int64_t B = input_ids.size(0);
  auto enc = at::empty({B, enc_width}, input_ids.options());
  auto labels = at::empty({B, dec_width}, input_ids.options());
  auto dec = at::empty({B, dec_width}, input_ids.options());
  auto enc_len = at::empty({B}, input_ids.options().dtype(at::kLong));
  auto dec_len = at::empty({B}, input_ids.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(input_ids.scalar_type(), "t5_span_corruption", [&] {
    T5Args<index_t> a;
    std::memset(&a, 0, sizeof(a));
    a.ids = input_ids.data_ptr<index_t>();
    a.enc = enc.data_ptr<index_t>();
    a.enc_len = enc_len.data_ptr<int64_t>();
    a.dec = dec.data_ptr<index_t>();
    a.labels = labels.data_ptr<index_t>();
    a.dec_len = dec_len.data_ptr<int64_t>();
    a.B = B;
    a.S = S;
    a.enc_width = enc_width;
    a.dec_width = dec_width;
    a.lengths = opt_i64(lengths);
    a.sample_ids = opt_i64(sample_ids);
    scalar_arg(seed, input_ids, "seed", &a.seed_ptr, &a.seed_val);
    scalar_arg(step, input_ids, "step", &a.step_ptr, &a.step_val);
    a.density = noise_density;
    a.mean_span = mean_noise_span_length;
    a.sentinel_start = sentinel_start_id;
    a.eos = eos_token_id;
    a.pad = pad_token_id;
    a.decoder_start = decoder_start_token_id;
    a.ignore_index = ignore_index;
    if (input_ids.device().is_cpu()) {
      t5_span_corruption_cpu(a);
    } else {
#if defined(MLK_WITH_CUDA)
      const c10::cuda::CUDAGuard guard(input_ids.device());
      t5_span_corruption_cuda(a, c10::cuda::getCurrentCUDAStream().stream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
      TORCH_CHECK(false, "masklm_kernels._C was built without CUDA support");
#endif
    }
  });
  return {enc, enc_len, dec, labels, dec_len};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bart_infill_impl(
    const at::Tensor& input_ids, const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& sample_ids,
    const at::Tensor& seed, const at::Tensor& step, double mask_ratio, at::IntArrayRef poisson_cdf,
    int64_t replace_length, int64_t mask_token_id, int64_t t_mask, int64_t rand_lo, int64_t rand_hi,
    int64_t pad_token_id, int64_t decoder_start_token_id, int64_t ignore_index, int64_t width) {
  check_ids(input_ids);
  check_meta(lengths, input_ids, "lengths", at::kLong, false);
  check_meta(sample_ids, input_ids, "sample_ids", at::kLong, false);
  TORCH_CHECK(mask_ratio > 0.0 && mask_ratio <= 1.0, "mask_ratio must be in (0, 1], got ", mask_ratio);
  TORCH_CHECK(replace_length >= -1 && replace_length <= 1, "replace_length must be -1, 0 or 1, got ", replace_length);
  TORCH_CHECK(!poisson_cdf.empty() && static_cast<int>(poisson_cdf.size()) <= kMaxPoisson,
              "poisson_cdf must have 1 to ", kMaxPoisson, " thresholds, got ", poisson_cdf.size());
  const int64_t S = input_ids.size(1);
  // the longest output: a row of S tokens with every span of length 0 (one insertion per budget token)
  const int64_t most = S + (S >= 3 ? bart_budget(S - 2, mask_ratio) : 0);
  TORCH_CHECK(width >= most, "output width ", width, " is below what rows of length <= ", S, " need (", most, ")");
  const int64_t B = input_ids.size(0);
  auto out = at::empty({B, width}, input_ids.options());
  auto out_len = at::empty({B}, input_ids.options().dtype(at::kLong));
  auto dec = at::empty({B, S}, input_ids.options());
  auto labels = at::empty({B, S}, input_ids.options());
  auto label_len = at::empty({B}, input_ids.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(input_ids.scalar_type(), "bart_infill", [&] {
    BartArgs<index_t> a;
    std::memset(&a, 0, sizeof(a));
    a.ids = input_ids.data_ptr<index_t>();
    a.out = out.data_ptr<index_t>();
    a.out_len = out_len.data_ptr<int64_t>();
    a.dec = dec.data_ptr<index_t>();
    a.labels = labels.data_ptr<index_t>();
    a.label_len = label_len.data_ptr<int64_t>();
    a.B = B;
    a.S = S;
    a.width = width;
    a.lengths = opt_i64(lengths);
    a.sample_ids = opt_i64(sample_ids);
    scalar_arg(seed, input_ids, "seed", &a.seed_ptr, &a.seed_val);
    scalar_arg(step, input_ids, "step", &a.step_ptr, &a.step_val);
    a.mask_ratio = mask_ratio;
    a.n_cdf = static_cast<int>(poisson_cdf.size());
    for (size_t i = 0; i < poisson_cdf.size(); ++i) {
      TORCH_CHECK(poisson_cdf[i] >= 0 && poisson_cdf[i] <= (int64_t(1) << 32), "Poisson thresholds must be in [0, 2^32]");
      a.cdf[i] = poisson_cdf[i] >= (int64_t(1) << 32) ? 0xFFFFFFFFu : static_cast<uint32_t>(poisson_cdf[i]);
    }
    a.replace_length = static_cast<int>(replace_length);
    a.rp = make_replace(mask_token_id, t_mask, int64_t(1) << 32, rand_lo, rand_hi);
    a.pad = pad_token_id;
    a.decoder_start = decoder_start_token_id;
    a.ignore_index = ignore_index;
    if (input_ids.device().is_cpu()) {
      bart_infill_cpu(a);
    } else {
#if defined(MLK_WITH_CUDA)
      const c10::cuda::CUDAGuard guard(input_ids.device());
      auto ws = at::empty({B, S > 0 ? S : 1}, input_ids.options().dtype(at::kInt));
      bart_infill_cuda(a, ws.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream().stream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
      TORCH_CHECK(false, "masklm_kernels._C was built without CUDA support");
#endif
    }
  });
  return {out, out_len, dec, labels, label_len};
}

}  // namespace

// The schemas of mask_tokens and mass_mask are defined in Python (masklm_kernels/masking/ops.py, from the
// typed arguments of masking/inputs.py), with their fake implementations, so that the package needs this
// extension only when a kernel runs. Registering a kernel whose signature disagrees with the schema fails
// when the extension is imported.
TORCH_LIBRARY_IMPL(masklm_kernels, CPU, m) {
  m.impl("mask_tokens", &mask_tokens_impl);
  m.impl("mass_mask", &mass_mask_impl);
  m.impl("t5_span_corruption", &t5_span_corruption_impl);
  m.impl("bart_infill", &bart_infill_impl);
}

#if defined(MLK_WITH_CUDA)
TORCH_LIBRARY_IMPL(masklm_kernels, CUDA, m) {
  m.impl("mask_tokens", &mask_tokens_impl);
  m.impl("mass_mask", &mass_mask_impl);
  m.impl("t5_span_corruption", &t5_span_corruption_impl);
  m.impl("bart_infill", &bart_infill_impl);
}
#endif

}  // namespace mlk
