// CPU kernel of divfast::ensemble_sweep: the top-1 / top-5 correct counts of every subset's consensus
// and its histogram of correct members, in one pass over the samples.
//
// Work items are ranges of samples. For each sample, every member's row of C logits is read once: a
// vectorised pass checks it is finite and finds the maximum of each block of 16 values, and only the
// blocks whose maximum beats the current fifth-best are scanned for the member's top classes, its
// bound and its argmax (kernels/ensemble_sweep.h). The union of all members' top classes and the
// target gets a small table of every member's logit for it. Then every subset ranks the target among
// the union of its own members' lists by table lookups, and scans all C classes only when the bound
// cannot certify the rank. Counts are int64 sums, so merging the ranges (in any order) is exact.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include "checks.h"
#include "kernels/ensemble_sweep.h"

namespace divfast {
namespace {

using kernels::SweepKey;
constexpr int kKeep = kernels::kSweepTop + 1;  // a member's top classes and its bound
constexpr int kCap = kernels::kSweepRankCap;
constexpr int64_t kBlock = 16;                 // values per block of the vectorised pre-pass

struct SweepOut {
  int64_t* top1;
  int64_t* top5;
  int64_t* hist;
};

// Top classes of one row: a vectorised pass for finiteness and block maxima, then the selection over
// the blocks that can contribute. Returns false when the row holds NaN or infinity.
template <typename scalar_t>
bool row_top(const scalar_t* row, int64_t c_count, double* vals, int64_t* idx, int* kept,
             std::vector<double>& block_max) {
  const int64_t blocks = (c_count + kBlock - 1) / kBlock;
  double check = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * kBlock, hi = std::min(c_count, lo + kBlock);
    double best = -INFINITY, part = 0.0;
#pragma omp simd reduction(max : best) reduction(+ : part)
    for (int64_t c = lo; c < hi; ++c) {
      const double v = static_cast<double>(row[c]);
      best = std::max(best, v);
      part += v * 0.0;  // NaN if v is NaN or infinite
    }
    block_max[b] = best;
    check += part;
  }
  if (!(check == 0.0)) return false;
  int count = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    if (count == kKeep && !(block_max[b] > vals[kKeep - 1])) continue;
    const int64_t lo = b * kBlock, hi = std::min(c_count, lo + kBlock);
    for (int64_t c = lo; c < hi; ++c) {
      const double v = static_cast<double>(row[c]);
      if (count == kKeep && !(v > vals[kKeep - 1])) continue;
      int pos = count < kKeep ? count++ : kKeep - 1;
      while (pos > 0 && v > vals[pos - 1]) {  // strict: an equal value keeps the earlier index first
        vals[pos] = vals[pos - 1];
        idx[pos] = idx[pos - 1];
        --pos;
      }
      vals[pos] = v;
      idx[pos] = c;
    }
  }
  *kept = count;
  return true;
}

template <typename scalar_t>
void sweep_range(const scalar_t* z, const int64_t* target, const int64_t* subsets, int64_t pool,
                 int64_t n_count, int64_t c_count, int64_t s_count, int k, int rule, int64_t n0,
                 int64_t n1, SweepOut out, bool* finite, bool* target_ok) {
  std::vector<double> vals(pool * kKeep), block_max((c_count + kBlock - 1) / kBlock);
  std::vector<int64_t> idx(pool * kKeep), argmax(pool);
  std::vector<int> kept(pool);
  std::vector<char> correct(pool);
  // Candidate table of the sample: slot of each class (-1 if none), the slot's class, and every
  // member's logit for it (pool values per slot); slot_of is reset after each sample.
  std::vector<int> slot_of(c_count, -1);
  std::vector<int64_t> slot_class;
  std::vector<double> table;
  std::vector<int> list_slots(pool * kernels::kSweepTop), listed(pool);
  std::vector<int64_t> seen;  // per slot: the last subset that counted it
  std::vector<double> values(k), scratch(k);
  std::vector<const scalar_t*> rows(k);
  int64_t stamp = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t t = target[n];
    if (t < 0 || t >= c_count) {  // still read the rows: NaN is reported before a bad label
      *target_ok = false;
      for (int64_t i = 0; i < pool; ++i)
        if (!row_top(z + (i * n_count + n) * c_count, c_count, &vals[i * kKeep], &idx[i * kKeep],
                     &kept[i], block_max)) {
          *finite = false;
          return;
        }
      continue;
    }
    slot_class.assign(1, t);  // slot 0: the target
    slot_of[t] = 0;
    for (int64_t i = 0; i < pool; ++i) {
      if (!row_top(z + (i * n_count + n) * c_count, c_count, &vals[i * kKeep], &idx[i * kKeep],
                   &kept[i], block_max)) {
        *finite = false;
        return;
      }
      argmax[i] = idx[i * kKeep];
      correct[i] = argmax[i] == t;
      listed[i] = std::min(kept[i], kernels::kSweepTop);
      for (int q = 0; q < listed[i]; ++q) {
        const int64_t c = idx[i * kKeep + q];
        if (slot_of[c] < 0) {
          slot_of[c] = static_cast<int>(slot_class.size());
          slot_class.push_back(c);
        }
        list_slots[i * kernels::kSweepTop + q] = slot_of[c];
      }
    }
    const int64_t slots = static_cast<int64_t>(slot_class.size());
    table.resize(slots * pool);
    for (int64_t i = 0; i < pool; ++i) {
      const scalar_t* row = z + (i * n_count + n) * c_count;
      for (int64_t sl = 0; sl < slots; ++sl) table[sl * pool + i] = static_cast<double>(row[slot_class[sl]]);
    }
    seen.assign(slots, -1);
    for (int64_t s = 0; s < s_count; ++s) {
      const int64_t* m = subsets + s * k;
      int n_correct = 0;
      for (int j = 0; j < k; ++j) n_correct += correct[m[j]];
      ++out.hist[s * (k + 1) + n_correct];
      auto key_of_class = [&](int64_t c, const double* column) {  // column: every member's logit
        int votes = 0;
        for (int j = 0; j < k; ++j) {
          values[j] = column[m[j]];
          votes += argmax[m[j]] == c;
        }
        return kernels::key_of(rule, values.data(), k, votes, scratch.data());
      };
      const SweepKey kt = key_of_class(t, &table[0]);
      ++stamp;
      seen[0] = stamp;
      int above = 0;
      for (int j = 0; j < k && above < kCap; ++j) {
        const int64_t i = m[j];
        for (int q = 0; q < listed[i]; ++q) {
          const int sl = list_slots[i * kernels::kSweepTop + q];
          if (seen[sl] == stamp) continue;
          seen[sl] = stamp;
          if (kernels::ranks_above(key_of_class(slot_class[sl], &table[sl * pool]), slot_class[sl], kt, t) &&
              ++above >= kCap)
            break;
        }
      }
      if (above < kCap && c_count > kernels::kSweepTop) {
        // Classes outside every list have a key at most the bound's; if the target's exceeds it,
        // the count above is exact. Otherwise scan every class.
        for (int j = 0; j < k; ++j) values[j] = vals[m[j] * kKeep + kernels::kSweepTop];
        const SweepKey bound = kernels::key_of(rule, values.data(), k, 0, scratch.data());
        if (!kernels::key_greater(kt, bound)) {
          for (int j = 0; j < k; ++j) rows[j] = z + (m[j] * n_count + n) * c_count;
          above = 0;
          for (int64_t c = 0; c < c_count && above < kCap; ++c) {
            if (c == t) continue;
            int votes = 0;
            for (int j = 0; j < k; ++j) {
              values[j] = static_cast<double>(rows[j][c]);
              votes += argmax[m[j]] == c;
            }
            if (kernels::ranks_above(kernels::key_of(rule, values.data(), k, votes, scratch.data()), c, kt, t))
              ++above;
          }
        }
      }
      out.top1[s] += above == 0;
      out.top5[s] += above < kCap;
    }
    for (const int64_t c : slot_class) slot_of[c] = -1;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ensemble_sweep_cpu(const at::Tensor& logits,
                                                                  const at::Tensor& target,
                                                                  const at::Tensor& subsets,
                                                                  c10::string_view rule) {
  const int code = check_ensemble_sweep_args(logits, target, subsets, rule);
  const int64_t pool = logits.size(0), n_count = logits.size(1), c_count = logits.size(2);
  const int64_t s_count = subsets.size(0), k = subsets.size(1);
  const at::Tensor z = logits.contiguous(), y = target.contiguous(), sub = subsets.contiguous();
  check_sweep_subsets(sub.const_data_ptr<int64_t>(), s_count, k, pool);
  const auto i64 = logits.options().dtype(at::kLong);
  at::Tensor top1 = at::zeros({s_count}, i64), top5 = at::zeros({s_count}, i64);
  at::Tensor hist = at::zeros({s_count, k + 1}, i64);
  bool finite = true, target_ok = true;
  if (n_count > 0) {  // also with no subsets: the logits and labels are still checked
    std::mutex lock;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ensemble_sweep_cpu", [&] {
      at::parallel_for(0, n_count, 32, [&](int64_t n0, int64_t n1) {
        std::vector<int64_t> local(s_count * (k + 3), 0);
        SweepOut part{local.data(), local.data() + s_count, local.data() + 2 * s_count};
        bool part_finite = true, part_target = true;
        sweep_range<scalar_t>(z.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(),
                              sub.const_data_ptr<int64_t>(), pool, n_count, c_count, s_count,
                              static_cast<int>(k), code, n0, n1, part, &part_finite, &part_target);
        const std::lock_guard<std::mutex> guard(lock);  // int64 sums: the order does not matter
        int64_t* t1 = top1.data_ptr<int64_t>();
        int64_t* t5 = top5.data_ptr<int64_t>();
        int64_t* h = hist.data_ptr<int64_t>();
        for (int64_t s = 0; s < s_count; ++s) t1[s] += part.top1[s], t5[s] += part.top5[s];
        for (int64_t e = 0; e < s_count * (k + 1); ++e) h[e] += part.hist[e];
        finite = finite && part_finite;
        target_ok = target_ok && part_target;
      });
    });
  }
  TORCH_CHECK_VALUE(finite, "ensemble_sweep: `logits` contain NaN or infinity");
  TORCH_CHECK_VALUE(target_ok, "ensemble_sweep: `target` has a label outside [0, ", c_count, ")");
  return {top1, top5, hist};
}

}  // namespace

TORCH_LIBRARY_IMPL(divfast, CPU, m) { m.impl("ensemble_sweep", &ensemble_sweep_cpu); }

}  // namespace divfast
