// Argument checks shared by the CPU and CUDA hosts: each names the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace divfast
