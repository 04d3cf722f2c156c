// Torch-free math of divfast::ensemble_sweep, shared by the CPU and CUDA kernels.
//
// For one sample, a subset of k members with logit rows z_1..z_k (in subset order) ranks the C classes
// by a key, higher first, and among exactly equal keys the lower class index first:
//   average, geometric: a(c) = z_1(c) + ... + z_k(c), summed in float64 in subset order (the geometric
//                       mean of softmax probabilities ranks classes exactly as the summed logits, since
//                       log p_i(c) = z_i(c) - lse_i);
//   median:             the median of the k values in float64; (a + b) * 0.5 of the middle two for even k;
//   vote:               (v(c), a(c)) lexicographically, v(c) = the number of members whose argmax (first
//                       maximum) is c: ties in votes go to the class the averaging consensus prefers.
// The target's rank (classes above it) decides top-1 (rank 0) and top-5 (rank < 5).
//
// Pruning (exact, cpu/ensemble_sweep.cpp): each key is non-decreasing in every z_i and float rounding
// is monotone, so the key of the members' d-th largest values bounds every class below depth d of all
// their sorted lists, and the key of their block maxima bounds every class of a block. The summed
// rules bound and compare in float32 and decide the sums within a proven rounding bound of the
// target's by these float64 keys.
#pragma once

#include <cstdint>

#ifndef DIVFAST_HD
#if defined(__CUDACC__)
#define DIVFAST_HD __host__ __device__ __forceinline__
#else
#define DIVFAST_HD inline
#endif
#endif

namespace divfast {
namespace kernels {

constexpr int kSweepTop = 5;      // classes each member keeps (the top-5 needs at least five)
constexpr int kSweepRankCap = 5;  // ranks are counted up to here: top-5 is all that is asked
constexpr int kRuleAverage = 0, kRuleVote = 1, kRuleMedian = 2, kRuleGeometric = 3;

// A consensus key: primary, and for vote the summed logits as secondary (0 otherwise).
struct SweepKey {
  double primary;
  double secondary;
};

DIVFAST_HD bool key_greater(SweepKey a, SweepKey b) {
  return a.primary > b.primary || (a.primary == b.primary && a.secondary > b.secondary);
}

DIVFAST_HD bool key_equal(SweepKey a, SweepKey b) {
  return a.primary == b.primary && a.secondary == b.secondary;
}

// Whether class c ranks above the target t: a greater key, or an equal key and a lower index.
DIVFAST_HD bool ranks_above(SweepKey kc, int64_t c, SweepKey kt, int64_t t) {
  return key_greater(kc, kt) || (key_equal(kc, kt) && c < t);
}

// Median of v[0..k) in float64 (v is reordered): insertion sort, k is small.
DIVFAST_HD double median_of(double* v, int k) {
  for (int i = 1; i < k; ++i) {
    const double x = v[i];
    int j = i;
    while (j > 0 && v[j - 1] > x) {
      v[j] = v[j - 1];
      --j;
    }
    v[j] = x;
  }
  return k % 2 ? v[k / 2] : (v[k / 2 - 1] + v[k / 2]) * 0.5;
}

// The key of a class from its k values (subset order), the votes it got, and a scratch of k doubles.
DIVFAST_HD SweepKey key_of(int rule, const double* values, int k, int votes, double* scratch) {
  if (rule == kRuleMedian) {
    if (k == 3) {  // the common triple, branch-free: max(min(a, b), min(max(a, b), c))
      const double a = values[0], b = values[1], c = values[2];
      const double lo = a < b ? a : b, hi = a < b ? b : a;
      const double mid = hi < c ? hi : c;
      return {lo > mid ? lo : mid, 0.0};
    }
    for (int j = 0; j < k; ++j) scratch[j] = values[j];
    return {median_of(scratch, k), 0.0};
  }
  double sum = values[0];
  for (int j = 1; j < k; ++j) sum = sum + values[j];
  if (rule == kRuleVote) return {static_cast<double>(votes), sum};
  return {sum, 0.0};
}

}  // namespace kernels
}  // namespace divfast
