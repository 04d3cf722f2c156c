// Argument checks shared by the CPU and CUDA hosts: each names the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <tuple>

namespace divfast {

// Validates pair_counts' inputs; returns true when `predictions` are logits (M, B, C).
inline bool check_pair_counts_args(const at::Tensor& predictions, const at::Tensor& target,
                                   int64_t num_classes) {
  const bool logits = predictions.dim() == 3;
  TORCH_CHECK_VALUE(predictions.dim() == 2 || logits,
              "pair_counts: `predictions` must be logits (M, B, C) or labels (M, B), got shape ",
              predictions.sizes());
  TORCH_CHECK_VALUE(predictions.size(0) >= 1, "pair_counts: `predictions` needs at least one member (M >= 1)");
  if (logits) {
    const auto dt = predictions.scalar_type();
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                "pair_counts: logits `predictions` must be float16, bfloat16, float32 or float64, got ",
                dt);
    TORCH_CHECK_VALUE(predictions.size(2) >= 1, "pair_counts: logits `predictions` need C >= 1 classes");
    TORCH_CHECK_VALUE(num_classes == -1 || num_classes == predictions.size(2),
                "pair_counts: `num_classes` (", num_classes, ") must be -1 or equal the logits' C (",
                predictions.size(2), ")");
  } else {
    TORCH_CHECK_TYPE(predictions.scalar_type() == at::kLong,
                "pair_counts: label `predictions` (M, B) must be int64, got ", predictions.scalar_type());
    TORCH_CHECK_VALUE(num_classes == -1 || num_classes >= 1,
                "pair_counts: `num_classes` must be -1 (unchecked) or >= 1, got ", num_classes);
  }
  TORCH_CHECK_VALUE(target.dim() == 1, "pair_counts: `target` must be a 1-D tensor (B,), got shape ",
                    target.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "pair_counts: `target` must be int64, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.size(0) == predictions.size(1), "pair_counts: `target` has ", target.size(0),
              " samples but `predictions` has B = ", predictions.size(1));
  TORCH_CHECK_VALUE(target.device() == predictions.device(), "pair_counts: `target` is on ",
              target.device(), " but `predictions` on ", predictions.device());
  return logits;
}

// Turns a kernel's error bits into one message naming the argument at fault.
inline void raise_pair_counts_errors(int flags, int64_t num_classes) {
  TORCH_CHECK_VALUE(!(flags & 1), "pair_counts: logits `predictions` contain NaN");
  TORCH_CHECK_VALUE(!(flags & 2), "pair_counts: `target` has a label outside [0, ",
              num_classes < 0 ? std::string("inf") : std::to_string(num_classes), ")");
  TORCH_CHECK_VALUE(!(flags & 4), "pair_counts: label `predictions` have a value outside [0, ",
              num_classes < 0 ? std::string("inf") : std::to_string(num_classes), ")");
}

// Validates attribution_stats' inputs; returns the normalisation code: 0 none, 1 l1, 2 l2, 3 max.
inline int check_attribution_stats_args(const at::Tensor& attributions, c10::string_view normalize,
                                        int64_t ddof) {
  TORCH_CHECK_VALUE(attributions.dim() >= 2,
                    "attribution_stats: `attributions` must be (M, B, ...) maps of M members for B "
                    "samples, got shape ", attributions.sizes());
  const auto dt = attributions.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   "attribution_stats: `attributions` must be float16, bfloat16, float32 or float64, "
                   "got ", dt);
  TORCH_CHECK_VALUE(attributions.size(0) >= 1,
                    "attribution_stats: `attributions` needs at least one member (M >= 1)");
  int code = -1;
  if (normalize == "none") code = 0;
  if (normalize == "l1") code = 1;
  if (normalize == "l2") code = 2;
  if (normalize == "max") code = 3;
  TORCH_CHECK_VALUE(code >= 0, "attribution_stats: `normalize` must be one of none, l1, l2, max, got '",
                    std::string(normalize), "'");
  TORCH_CHECK_VALUE(ddof == 0 || ddof == 1, "attribution_stats: `ddof` must be 0 or 1, got ", ddof);
  TORCH_CHECK_VALUE(ddof < attributions.size(0), "attribution_stats: `ddof` = ", ddof,
                    " needs more than ", ddof, " member(s), got M = ", attributions.size(0));
  return code;
}

// Shared by the CPU and CUDA hosts, defined in cpu/attribution_stats.cpp so nvcc never compiles
// ATen's operators. finish: per-sample centred products (B, M, M) -> (variance (B,), gram (M, M)).
// finite: whether every product is finite, when the caller has already looked (else finish looks).
std::tuple<at::Tensor, at::Tensor> finish_attribution_stats(const at::Tensor& centred, int64_t ddof,
                                                            std::optional<bool> finite = std::nullopt);
// 1 / norm of every map (B, M) float64: 1 without a normalisation, 0 for a map whose norm is 0.
at::Tensor inverse_map_norms(const at::Tensor& maps, int code);

// Validates hsic's input: `grams` (G, n, n) floating point, n >= 4 (the unbiased estimator divides by
// n (n - 3)).
inline void check_hsic_args(const at::Tensor& grams) {
  TORCH_CHECK_VALUE(grams.dim() == 3 && grams.size(1) == grams.size(2),
                    "hsic: `grams` must be G square Gram matrices (G, n, n) of the same n samples, "
                    "got shape ", grams.sizes());
  const auto dt = grams.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   "hsic: `grams` must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK_VALUE(grams.size(1) >= 4, "hsic: the unbiased HSIC needs n >= 4 samples per batch, got "
                    "`grams` of n = ", grams.size(1));
}

// Validates ensemble_sweep's inputs; returns the rule code: 0 average, 1 vote, 2 median, 3 geometric.
// Subset entries (range, distinct) are checked by the kernels, which read them anyway.
inline int check_ensemble_sweep_args(const at::Tensor& logits, const at::Tensor& target,
                                     const at::Tensor& subsets, c10::string_view rule) {
  TORCH_CHECK_VALUE(logits.dim() == 3, "ensemble_sweep: `logits` must be (K, N, C) logits of K members, "
                    "got shape ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   "ensemble_sweep: `logits` must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK_VALUE(logits.size(0) >= 1 && logits.size(2) >= 1,
                    "ensemble_sweep: `logits` needs K >= 1 members and C >= 1 classes, got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(1),
                    "ensemble_sweep: `target` must be (N,) with N = ", logits.size(1), ", got shape ",
                    target.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "ensemble_sweep: `target` must be int64, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(subsets.dim() == 2 && subsets.size(1) >= 1,
                    "ensemble_sweep: `subsets` must be (S, k) member indices with k >= 1, got shape ",
                    subsets.sizes());
  TORCH_CHECK_TYPE(subsets.scalar_type() == at::kLong, "ensemble_sweep: `subsets` must be int64, got ",
                   subsets.scalar_type());
  TORCH_CHECK_VALUE(subsets.size(1) <= logits.size(0), "ensemble_sweep: subsets of k = ", subsets.size(1),
                    " members from a pool of K = ", logits.size(0));
  TORCH_CHECK_VALUE(target.device() == logits.device() && subsets.device() == logits.device(),
                    "ensemble_sweep: `logits`, `target` and `subsets` must be on one device, got ",
                    logits.device(), ", ", target.device(), ", ", subsets.device());
  int code = -1;
  if (rule == "average") code = 0;
  if (rule == "vote") code = 1;
  if (rule == "median") code = 2;
  if (rule == "geometric") code = 3;
  TORCH_CHECK_VALUE(code >= 0, "ensemble_sweep: `rule` must be one of average, vote, median, geometric, "
                    "got '", std::string(rule), "'");
  return code;
}

// Validates the subsets (S, k) on the host: every entry in [0, K), distinct within a row.
inline void check_sweep_subsets(const int64_t* subsets, int64_t s, int64_t k, int64_t pool) {
  for (int64_t r = 0; r < s; ++r) {
    const int64_t* row = subsets + r * k;
    for (int64_t j = 0; j < k; ++j) {
      TORCH_CHECK_VALUE(row[j] >= 0 && row[j] < pool, "ensemble_sweep: `subsets` row ", r,
                        " has member index ", row[j], " outside [0, ", pool, ")");
      for (int64_t q = 0; q < j; ++q)
        TORCH_CHECK_VALUE(row[q] != row[j], "ensemble_sweep: `subsets` row ", r, " repeats member ",
                          row[j]);
    }
  }
}

// Shared by the CPU and CUDA hosts, defined in cpu/hsic.cpp. From the sums over pairs i != j of
// products of the symmetric parts S (trace (G, G)), the products of their off-diagonal row sums
// (rowdot (G, G)) and the totals (G,): the unbiased HSIC (G, G) float64 of Song et al. (2012).
at::Tensor finish_hsic(const at::Tensor& trace, const at::Tensor& rowdot, const at::Tensor& totals,
                       int64_t n);

}  // namespace divfast
