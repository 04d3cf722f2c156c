// CPU kernel of divfast::ensemble_sweep: the top-1 / top-5 correct counts of every subset's consensus
// and its histogram of correct members, in one pass over the samples.
//
// Work items are ranges of samples. Two paths:
// - average and geometric (summed logits; sweep_range_sum): each sample's member rows are converted
//   once to float32 with the maxima of blocks of 4 classes; every subset sums its members' block
//   maxima 8 blocks per vector and sums the classes of only the blocks that reach the target's key,
//   with an exact float64 decision for the sums within rounding of it (see sum_member below).
// - vote and median (sweep_range): every member row is read once: a vectorised pass checks it is
//   finite and finds the maximum of each block of 4 classes, and only the blocks whose maximum beats
//   the current sixth-best are scanned for the member's top classes and its argmax. Each subset then
//   ranks the target by the threshold algorithm over its members' top lists, gathering only the
//   logits of the classes it meets; what the lists cannot settle goes to a scan of the blocks whose
//   bound (from the members' block maxima) reaches the target's key.
// Counts are int64 sums, so merging the ranges (in any order) is exact.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "checks.h"
#include "cpu/cpu_features.h"
#include "kernels/ensemble_sweep.h"

namespace divfast {
namespace {

using kernels::SweepKey;
constexpr int kKeep = kernels::kSweepTop + 1;     // a member's top five classes and the next one
constexpr int kCap = kernels::kSweepRankCap;
constexpr int64_t kBlock = 4;                      // classes per block of the pre-pass and the scan

struct SweepOut {
  int64_t* top1;
  int64_t* top5;
  int64_t* hist;
};

// A vectorised pass over a row: the maximum of each block of kBlock values; returns false when the
// row holds NaN or infinity.
template <typename scalar_t>
bool block_maxima(const scalar_t* row, int64_t c_count, double* block_max) {
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
  return check == 0.0;
}

// The top `keep` values of a row with their indices, descending, the lower index first among equal
// values (entry 0 is the argmax, first maximum), scanning only the blocks whose maximum can enter.
template <typename scalar_t>
int row_top(const scalar_t* row, int64_t c_count, int keep, const double* block_max, double* vals,
            int64_t* idx) {
  const int64_t blocks = (c_count + kBlock - 1) / kBlock;
  int count = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    if (count == keep && !(block_max[b] > vals[keep - 1])) continue;
    const int64_t lo = b * kBlock, hi = std::min(c_count, lo + kBlock);
    for (int64_t c = lo; c < hi; ++c) {
      const double v = static_cast<double>(row[c]);
      if (count == keep && !(v > vals[keep - 1])) continue;
      int pos = count < keep ? count++ : keep - 1;
      while (pos > 0 && v > vals[pos - 1]) {  // strict: an equal value keeps the earlier index first
        vals[pos] = vals[pos - 1];
        idx[pos] = idx[pos - 1];
        --pos;
      }
      vals[pos] = v;
      idx[pos] = c;
    }
  }
  return count;
}

// The target's rank (capped at kCap) by a scan of every class, in blocks whose keys are formed by
// vectorisable loops: the summed logits (average, geometric; vote's secondary key), the median of
// three by min/max. Other medians take the scalar path. Same keys, same order of additions as
// kernels::key_of, so the same results.
#define DIVFAST_SCAN_ARGS(scalar_t)                                                             \
  const scalar_t *const *rows, const double *const *maxima, int k, int64_t c_count, int rule,     \
      int64_t t, SweepKey kt, const int64_t *argmax, const int64_t *m, double *values,             \
      double *scratch, double *sums, double *bounds
#define DIVFAST_SCAN_CALL rows, maxima, k, c_count, rule, t, kt, argmax, m, values, scratch, sums, bounds

template <typename scalar_t>
inline __attribute__((always_inline)) int scan_rank_impl(DIVFAST_SCAN_ARGS(scalar_t)) {
  if (rule == kernels::kRuleVote && kt.primary > 0) {
    // Only classes with votes can rank above a target that has votes: they are the members' argmaxes.
    int above = 0;
    for (int j = 0; j < k; ++j) {
      const int64_t c = argmax[m[j]];
      bool first = true;  // count each voted class once
      for (int q = 0; q < j; ++q) first = first && argmax[m[q]] != c;
      if (!first || c == t) continue;
      int votes = 0;
      for (int q = 0; q < k; ++q) {
        values[q] = static_cast<double>(rows[q][c]);
        votes += argmax[m[q]] == c;
      }
      above += kernels::ranks_above(kernels::key_of(rule, values, k, votes, scratch), c, kt, t);
    }
    return above < kCap ? above : kCap;
  }
  const bool median3 = rule == kernels::kRuleMedian && k == 3;
  if (rule == kernels::kRuleMedian && !median3) {
    int above = 0;
    for (int64_t c = 0; c < c_count && above < kCap; ++c) {
      if (c == t) continue;
      for (int q = 0; q < k; ++q) values[q] = static_cast<double>(rows[q][c]);
      above += kernels::ranks_above(kernels::key_of(rule, values, k, 0, scratch), c, kt, t);
    }
    return above;
  }
  // Per block of kBlock classes, an upper bound of every key in it from the members' block maxima
  // (keys are non-decreasing in each value); only blocks whose bound reaches the target's key are
  // scanned: their sums (or medians of three), then a count of the classes above the target. For vote
  // with a voteless target, every voted class ranks above it, and the voteless ones by their sums.
  const double target_key = rule == kernels::kRuleVote ? kt.secondary : kt.primary;
  const int64_t blocks = (c_count + kBlock - 1) / kBlock;
  if (median3) {
    const double *a = maxima[0], *b = maxima[1], *d = maxima[2];
#pragma omp simd
    for (int64_t q = 0; q < blocks; ++q) {
      const double lo = a[q] < b[q] ? a[q] : b[q], hi = a[q] < b[q] ? b[q] : a[q];
      const double mid = hi < d[q] ? hi : d[q];
      bounds[q] = lo > mid ? lo : mid;
    }
  } else {
#pragma omp simd
    for (int64_t q = 0; q < blocks; ++q) bounds[q] = maxima[0][q];
    for (int j = 1; j < k; ++j) {
      const double* row = maxima[j];
#pragma omp simd
      for (int64_t q = 0; q < blocks; ++q) bounds[q] = bounds[q] + row[q];
    }
  }
  int above = 0;
  for (int64_t blk = 0; blk < blocks && above < kCap; ++blk) {
    if (bounds[blk] < target_key) continue;  // no class of this block reaches the target's key
    const int64_t c0 = blk * kBlock, len = std::min(kBlock, c_count - c0);
    if (median3) {
      const scalar_t *a = rows[0] + c0, *b = rows[1] + c0, *d = rows[2] + c0;
      for (int64_t q = 0; q < len; ++q) {
        const double x = static_cast<double>(a[q]), y = static_cast<double>(b[q]), w = static_cast<double>(d[q]);
        const double lo = x < y ? x : y, hi = x < y ? y : x;
        const double mid = hi < w ? hi : w;
        sums[q] = lo > mid ? lo : mid;
      }
    } else {
      const scalar_t* first = rows[0] + c0;
      for (int64_t q = 0; q < len; ++q) sums[q] = static_cast<double>(first[q]);
      for (int j = 1; j < k; ++j) {
        const scalar_t* row = rows[j] + c0;
        for (int64_t q = 0; q < len; ++q) sums[q] = sums[q] + static_cast<double>(row[q]);
      }
    }
    for (int64_t q = 0; q < len; ++q) {
      const int64_t c = c0 + q;
      above += (sums[q] > target_key || (sums[q] == target_key && c < t)) && c != t;
    }
  }
  if (rule == kernels::kRuleVote) {  // voted classes: above whatever their sums; fix their counts
    for (int j = 0; j < k; ++j) {
      const int64_t c = argmax[m[j]];
      bool first = true;
      for (int q = 0; q < j; ++q) first = first && argmax[m[q]] != c;
      if (!first || c == t) continue;
      double sum = static_cast<double>(rows[0][c]);
      for (int q = 1; q < k; ++q) sum = sum + static_cast<double>(rows[q][c]);
      above += !(sum > target_key || (sum == target_key && c < t));  // counted now if it was not
    }
  }
  return above < kCap ? above : kCap;
}

#if defined(__x86_64__)
template <typename scalar_t>
__attribute__((target("avx2"))) int scan_rank_avx2(DIVFAST_SCAN_ARGS(scalar_t)) {
  return scan_rank_impl<scalar_t>(DIVFAST_SCAN_CALL);
}
#endif

template <typename scalar_t>
int scan_rank(DIVFAST_SCAN_ARGS(scalar_t)) {
#if defined(__x86_64__)
  if (cpu_has_avx2_fma()) return scan_rank_avx2<scalar_t>(DIVFAST_SCAN_CALL);
#endif
  return scan_rank_impl<scalar_t>(DIVFAST_SCAN_CALL);
}

// The vote and median path (it ranks every rule correctly; average and geometric take the faster
// sweep_range_sum). For each sample: every member's top classes, and a table of every member's
// logit for each class in any member's list (gathered once per sample, shared by all subsets); then
// per subset the threshold algorithm (Fagin et al.): walk the members' lists level by level, ranking
// each new class against the target by table lookups, until five rank above it (out of the top five)
// or the key of the members' next values falls below the target's (no class not yet seen can rank
// above it: every key is non-decreasing in each member's value, and rounding is monotone). Lists
// that run out before either happens fall back to the bounded scan (scan_rank).
template <typename scalar_t>
void sweep_range(const scalar_t* z, const int64_t* target, const int64_t* subsets, int64_t pool,
                 int64_t n_count, int64_t c_count, int64_t s_count, int k, int rule, int64_t n0,
                 int64_t n1, SweepOut out, bool* finite, bool* target_ok) {
  const int64_t blocks = (c_count + kBlock - 1) / kBlock;
  std::vector<double> vals(pool * kKeep), block_max(pool * blocks);
  std::vector<int64_t> idx(pool * kKeep), argmax(pool);
  std::vector<int> kept(pool), list_slot(pool * kKeep), slot_of(c_count, -1);
  std::vector<char> correct(pool);
  std::vector<int64_t> slot_class, seen;  // per slot: its class; the last subset that met it
  std::vector<double> table;              // slot-major: every member's logit for the slot's class
  std::vector<double> values(k), scratch(k);
  std::vector<const scalar_t*> rows(k);
  double sums[kBlock];
  std::vector<double> bounds(blocks);
  std::vector<const double*> maxima(k);
  int64_t stamp = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t t = target[n];
    for (int64_t i = 0; i < pool; ++i) {
      const scalar_t* row = z + (i * n_count + n) * c_count;
      if (!block_maxima(row, c_count, &block_max[i * blocks])) {
        *finite = false;
        return;
      }
      kept[i] = row_top(row, c_count, kKeep, &block_max[i * blocks], &vals[i * kKeep], &idx[i * kKeep]);
      argmax[i] = idx[i * kKeep];
      correct[i] = argmax[i] == t;
    }
    if (t < 0 || t >= c_count) {  // after the rows: NaN is reported before a bad label
      *target_ok = false;
      continue;
    }
    slot_class.assign(1, t);  // slot 0: the target
    slot_of[t] = 0;
    for (int64_t i = 0; i < pool; ++i)
      for (int q = 0; q < kept[i]; ++q) {
        const int64_t c = idx[i * kKeep + q];
        if (slot_of[c] < 0) {
          slot_of[c] = static_cast<int>(slot_class.size());
          slot_class.push_back(c);
        }
        list_slot[i * kKeep + q] = slot_of[c];
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
      auto key_of_slot = [&](int64_t sl) {
        const double* column = &table[sl * pool];
        const int64_t c = slot_class[sl];
        int votes = 0;
        for (int j = 0; j < k; ++j) {
          values[j] = column[m[j]];
          votes += argmax[m[j]] == c;
        }
        return kernels::key_of(rule, values.data(), k, votes, scratch.data());
      };
      const SweepKey kt = key_of_slot(0);
      seen[0] = ++stamp;
      int above = 0;
      bool decided = false;
      for (int64_t d = 0; !decided; ++d) {
        for (int j = 0; j < k; ++j) {  // the classes at depth d of each member's list
          const int sl = list_slot[m[j] * kKeep + d];
          if (seen[sl] == stamp) continue;
          seen[sl] = stamp;
          if (kernels::ranks_above(key_of_slot(sl), slot_class[sl], kt, t) && ++above >= kCap) {
            decided = true;  // out of the top five, whatever the rest do
            break;
          }
        }
        if (decided || d + 1 >= c_count) break;  // every class of the row has been seen: exact
        bool listed = true;
        for (int j = 0; j < k && listed; ++j) listed = d + 1 < kept[m[j]];
        if (!listed) break;  // the lists ran out: scan
        for (int j = 0; j < k; ++j) values[j] = vals[m[j] * kKeep + d + 1];
        // A class not yet seen sits below depth d in every list: its values are at most these.
        decided = kernels::key_greater(kt, kernels::key_of(rule, values.data(), k, 0, scratch.data()));
      }
      if (!decided && above < kCap && c_count > 1) {
        for (int j = 0; j < k; ++j) {
          rows[j] = z + (m[j] * n_count + n) * c_count;
          maxima[j] = &block_max[m[j] * blocks];
        }
        above = scan_rank(rows.data(), maxima.data(), k, c_count, rule, t, kt, argmax.data(), m,
                          values.data(), scratch.data(), sums, bounds.data());
      }
      out.top1[s] += above == 0;
      out.top5[s] += above < kCap;
    }
    for (const int64_t c : slot_class) slot_of[c] = -1;
  }
}

// The summed-logits rules (average, geometric): a bounded scan per subset in float32.
//
// Every member row of a sample is converted once to float32 and cut into blocks of 4 classes taken a
// stride apart (block b holds classes b, b + nb, b + 2 nb, b + 3 nb), so the block maxima of all
// blocks are the elementwise maximum of four contiguous vectors. A subset sums its members' block
// maxima 8 blocks at a time; only the blocks whose bound reaches the target's key (less tol) have
// their classes summed. Float32 is a filter: a class sum above the target's by more than tol counts,
// one below by more than tol does not, and the rare class in between is decided by the exact float64
// keys of kernels::key_of, so the counts are exactly those of the reference. tol bounds the rounding
// of the conversions and of the k additions on both sides: (2k^2 + 2k + 4) 2^-24 max|z|, plus a floor
// for values float32 holds only as subnormals. A sample whose logits reach 1e30 in magnitude takes
// the exact float64 scan of every class instead. nb, the number of blocks, is a multiple of 8, and
// a member's float32 row holds 4 nb values, -inf past the last class.

// One member's row: float32 copy, block maxima, first argmax (on the values as given), max |z|.
// Returns false on NaN or infinity.
template <typename scalar_t>
inline __attribute__((always_inline)) bool sum_member_impl(const scalar_t* row, int64_t c_count, int64_t nb,
                                                           float* fz, float* bm, int64_t* argmax,
                                                           float* biggest) {
  double check = 0.0, best = -INFINITY;
  float big = 0.0f;
#pragma omp simd reduction(+ : check) reduction(max : best, big)
  for (int64_t x = 0; x < c_count; ++x) {
    const double v = static_cast<double>(row[x]);
    check += v * 0.0;  // NaN if v is NaN or infinite
    best = std::max(best, v);
    const float f = static_cast<float>(row[x]);
    fz[x] = f;
    big = std::max(big, std::fabs(f));
  }
  if (!(check == 0.0)) return false;
  for (int64_t x = c_count; x < 4 * nb; ++x) fz[x] = -INFINITY;
  int64_t first = 0;
  while (static_cast<double>(row[first]) != best) ++first;
  *argmax = first;
  *biggest = std::max(*biggest, big);
#pragma omp simd
  for (int64_t b = 0; b < nb; ++b)
    bm[b] = std::max(std::max(fz[b], fz[nb + b]), std::max(fz[2 * nb + b], fz[3 * nb + b]));
  return true;
}

#if defined(__x86_64__)
template <typename scalar_t>
__attribute__((target("avx2,fma"))) bool sum_member_avx2(const scalar_t* row, int64_t c_count, int64_t nb,
                                                          float* fz, float* bm, int64_t* argmax,
                                                          float* biggest) {
  return sum_member_impl(row, c_count, nb, fz, bm, argmax, biggest);
}
#endif

template <typename scalar_t>
bool sum_member(const scalar_t* row, int64_t c_count, int64_t nb, float* fz, float* bm, int64_t* argmax,
                float* biggest) {
#if defined(__x86_64__)
  if (cpu_has_avx2_fma()) return sum_member_avx2(row, c_count, nb, fz, bm, argmax, biggest);
#endif
  return sum_member_impl(row, c_count, nb, fz, bm, argmax, biggest);
}

// What a class in the band [lo, hi] around the target's float32 key needs: the exact keys.
template <typename scalar_t>
struct ExactKeys {
  const scalar_t* const* rows;  // the subset's original rows
  int k;
  int rule;
  int64_t t;
  SweepKey kt;
  double* values;
  double* scratch;
  bool above(int64_t x) const {
    for (int j = 0; j < k; ++j) values[j] = static_cast<double>(rows[j][x]);
    return kernels::ranks_above(kernels::key_of(rule, values, k, 0, scratch), x, kt, t);
  }
};

// The classes of block b of the subset whose float32 rows are zr: how many rank above the target.
template <typename scalar_t>
inline __attribute__((always_inline)) int sum_block(const float* const* zr, int k, int64_t nb, int64_t b,
                                                    float lo, float hi, const ExactKeys<scalar_t>& exact) {
  int above = 0;
  for (int q = 0; q < 4; ++q) {
    const int64_t x = q * nb + b;
    float v = zr[0][x];
    for (int j = 1; j < k; ++j) v = v + zr[j][x];
    if (v > hi) {
      above += x != exact.t;
    } else if (v >= lo && x != exact.t) {
      above += exact.above(x);
    }
  }
  return above;
}

template <typename scalar_t>
int sum_rank_scalar(const float* const* zr, const float* const* br, int k, int64_t nb, float lo, float hi,
                    const ExactKeys<scalar_t>& exact) {
  int above = 0;
  for (int64_t b = 0; b < nb; ++b) {
    float bound = br[0][b];
    for (int j = 1; j < k; ++j) bound = bound + br[j][b];
    if (!(bound >= lo)) continue;
    above += sum_block(zr, k, nb, b, lo, hi, exact);
    if (above >= kCap) return kCap;
  }
  return above;
}

#if defined(__x86_64__)
// The AVX2 scan, 8 blocks at a time; K > 0 fixes k at compile time (0: k at run time). When any of the
// 8 blocks passes, all 32 of their classes are summed as four contiguous vectors (no branch per block).
template <int K, typename scalar_t>
__attribute__((target("avx2,fma"))) int sum_rank_avx2(const float* const* zr, const float* const* br, int k,
                                                       int64_t nb, float lo, float hi,
                                                       const ExactKeys<scalar_t>& exact) {
  const int kk = K > 0 ? K : k;
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  int above = 0;
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    __m256 bound = _mm256_loadu_ps(br[0] + b0);
    for (int j = 1; j < kk; ++j) bound = _mm256_add_ps(bound, _mm256_loadu_ps(br[j] + b0));
    if (!_mm256_movemask_ps(_mm256_cmp_ps(bound, vlo, _CMP_GE_OQ))) continue;
    for (int64_t x0 = b0; x0 < 4 * nb; x0 += nb) {  // classes x0 .. x0 + 7: one of each block
      __m256 v = _mm256_loadu_ps(zr[0] + x0);
      for (int j = 1; j < kk; ++j) v = _mm256_add_ps(v, _mm256_loadu_ps(zr[j] + x0));
      const unsigned gt = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v, vhi, _CMP_GT_OQ)));
      unsigned near = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v, vlo, _CMP_GE_OQ))) & ~gt;
      above += __builtin_popcount(gt);  // never the target: its own sum is the key, not above hi
      while (near) {
        const int64_t x = x0 + __builtin_ctz(near);
        above += x != exact.t && exact.above(x);
        near &= near - 1;
      }
    }
    if (above >= kCap) return kCap;
  }
  return above;
}
#endif

// The target's rank (capped at kCap) from the exact float64 keys of every class: samples whose logits
// are too large for the float32 filter.
template <typename scalar_t>
int exact_rank(int64_t c_count, const ExactKeys<scalar_t>& exact) {
  int above = 0;
  for (int64_t x = 0; x < c_count && above < kCap; ++x) above += x != exact.t && exact.above(x);
  return above;
}

template <typename scalar_t>
void sweep_range_sum(const scalar_t* z, const int64_t* target, const int64_t* subsets, int64_t pool,
                     int64_t n_count, int64_t c_count, int64_t s_count, int k, int rule, int64_t n0,
                     int64_t n1, SweepOut out, bool* finite, bool* target_ok) {
  const int64_t nb = ((c_count + 3) / 4 + 7) / 8 * 8;
  std::vector<float> rows(pool * 4 * nb), maxima(pool * nb);
  std::vector<int64_t> argmax(pool);
  std::vector<double> values(k), scratch(k);
  std::vector<const float*> zr(k), br(k);
  std::vector<const scalar_t*> orig(k);
  const double u = std::ldexp(1.0, -24);
#if defined(__x86_64__)
  const bool avx2 = cpu_has_avx2_fma();
#endif
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t t = target[n];
    float biggest = 0.0f;
    for (int64_t i = 0; i < pool; ++i) {
      const scalar_t* row = z + (i * n_count + n) * c_count;
      if (!sum_member(row, c_count, nb, &rows[i * 4 * nb], &maxima[i * nb], &argmax[i], &biggest)) {
        *finite = false;
        return;
      }
    }
    if (t < 0 || t >= c_count) {  // after the rows: NaN is reported before a bad label
      *target_ok = false;
      continue;
    }
    const bool filter = biggest < 1e30f;
    const float tol = static_cast<float>((2.0 * k * k + 2.0 * k + 4.0) * u * biggest +
                                         k * std::ldexp(1.0, -120));
    for (int64_t s = 0; s < s_count; ++s) {
      const int64_t* m = subsets + s * k;
      int n_correct = 0;
      for (int j = 0; j < k; ++j) {
        n_correct += argmax[m[j]] == t;
        orig[j] = z + (m[j] * n_count + n) * c_count;
        values[j] = static_cast<double>(orig[j][t]);
      }
      ++out.hist[s * (k + 1) + n_correct];
      const ExactKeys<scalar_t> exact{orig.data(), k, rule, t,
                                      kernels::key_of(rule, values.data(), k, 0, scratch.data()),
                                      values.data(), scratch.data()};
      int above;
      if (filter) {
        float kt = rows[m[0] * 4 * nb + t];
        for (int j = 0; j < k; ++j) {
          zr[j] = &rows[m[j] * 4 * nb];
          br[j] = &maxima[m[j] * nb];
          if (j > 0) kt = kt + zr[j][t];
        }
        const float lo = kt - tol, hi = kt + tol;
#if defined(__x86_64__)
        if (avx2 && k == 3)
          above = sum_rank_avx2<3>(zr.data(), br.data(), k, nb, lo, hi, exact);
        else if (avx2 && k == 2)
          above = sum_rank_avx2<2>(zr.data(), br.data(), k, nb, lo, hi, exact);
        else if (avx2)
          above = sum_rank_avx2<0>(zr.data(), br.data(), k, nb, lo, hi, exact);
        else
#endif
          above = sum_rank_scalar(zr.data(), br.data(), k, nb, lo, hi, exact);
      } else {
        above = exact_rank(c_count, exact);
      }
      out.top1[s] += above == 0;
      out.top5[s] += above < kCap;
    }
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
        const bool sum_rule = code == kernels::kRuleAverage || code == kernels::kRuleGeometric;
        (sum_rule ? sweep_range_sum<scalar_t> : sweep_range<scalar_t>)(
            z.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), sub.const_data_ptr<int64_t>(), pool,
            n_count, c_count, s_count, static_cast<int>(k), code, n0, n1, part, &part_finite, &part_target);
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
