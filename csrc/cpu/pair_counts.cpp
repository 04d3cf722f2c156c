// CPU kernel of divfast::pair_counts: OpenMP over 64-sample tiles, thread-local accumulators.
//
// Each tile turns the members' predictions into one 64-bit correctness word per member; N11 of a pair
// is then a popcount of two words, so the cost per sample is dominated by reading the logits once
// (the argmax is fused in and vectorised with AVX2 where the CPU has it).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "checks.h"
#include "kernels/pair_counts.h"

namespace divfast {
namespace {

using kernels::kTile;

// First index of the maximum (torch.argmax's tie rule); sets *nan and returns 0 on a NaN.
template <typename T>
int64_t argmax_scalar(const T* x, int64_t n, bool* nan) {
  using acc_t = at::opmath_type<T>;
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  int64_t idx = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    if (v != v) {
      *nan = true;
      return 0;
    }
    if (v > best) {
      best = v;
      idx = i;
    }
  }
  return idx;
}

#if defined(__x86_64__)
// Two passes over a row that sits in L1 after the first: a 4-way unrolled max with NaN detection
// (unordered compares of two loads flag a NaN in either), then the first lane equal to the max.
__attribute__((target("avx2"))) int64_t argmax_f32_avx2(const float* x, int64_t n, bool* nan) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf;
  __m256 unord = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256 a = _mm256_loadu_ps(x + i);
    const __m256 b = _mm256_loadu_ps(x + i + 8);
    const __m256 c = _mm256_loadu_ps(x + i + 16);
    const __m256 d = _mm256_loadu_ps(x + i + 24);
    unord = _mm256_or_ps(unord, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q),
                                             _mm256_cmp_ps(c, d, _CMP_UNORD_Q)));
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
    m2 = _mm256_max_ps(m2, c);
    m3 = _mm256_max_ps(m3, d);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i);
    unord = _mm256_or_ps(unord, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    m0 = _mm256_max_ps(m0, a);
  }
  if (_mm256_movemask_ps(unord)) {
    *nan = true;
    return 0;
  }
  __m256 m = _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float best = lanes[0];
  for (int l = 1; l < 8; ++l) best = lanes[l] > best ? lanes[l] : best;
  for (int64_t j = i; j < n; ++j) {
    const float v = x[j];
    if (v != v) {
      *nan = true;
      return 0;
    }
    best = v > best ? v : best;
  }
  const __m256 target = _mm256_set1_ps(best);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), target, _CMP_EQ_OQ));
    if (mask) return j + __builtin_ctz(mask);
  }
  for (; j < n; ++j) {
    if (x[j] == best) return j;
  }
  return 0;  // all -inf rows end in the vector loop; unreachable otherwise
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
  return has;
}
#endif

template <typename T>
int64_t row_argmax(const T* x, int64_t n, bool* nan, float* /*scratch*/) {
  return argmax_scalar(x, n, nan);
}

template <>
int64_t row_argmax<float>(const float* x, int64_t n, bool* nan, float* scratch) {
#if defined(__x86_64__)
  if (cpu_has_avx2()) return argmax_f32_avx2(x, n, nan);
#endif
  return argmax_scalar(x, n, nan);
}

// Half-precision rows are widened into a float scratch row (exact), then share the float path.
template <typename T>
int64_t row_argmax_widened(const T* x, int64_t n, bool* nan, float* scratch) {
  for (int64_t i = 0; i < n; ++i) scratch[i] = static_cast<float>(x[i]);
  return row_argmax<float>(scratch, n, nan, nullptr);
}

template <>
int64_t row_argmax<at::Half>(const at::Half* x, int64_t n, bool* nan, float* scratch) {
  return row_argmax_widened(x, n, nan, scratch);
}

template <>
int64_t row_argmax<at::BFloat16>(const at::BFloat16* x, int64_t n, bool* nan, float* scratch) {
  return row_argmax_widened(x, n, nan, scratch);
}

// Sums one thread accumulates over its tiles.
struct Accum {
  std::vector<int64_t> n11;    // (M, M) upper triangle, diagonal = member correct counts
  std::vector<int64_t> agree;  // (M, M) upper triangle
  std::vector<int64_t> hist;   // (M + 1)
  int flags = 0;
  explicit Accum(int64_t m) : n11(m * m, 0), agree(m * m, 0), hist(m + 1, 0) {}
};

// Folds one tile of labels (M rows of `t` samples, leading dimension `ld`) into `acc`.
// Always inlined into the per-ISA entry points below, so that the compiler vectorises the label
// comparisons with AVX2 (64-bit compares) and uses the popcnt instruction where the CPU has them.
__attribute__((always_inline)) inline void tile_update_impl(const int64_t* lab, int64_t ld, const int64_t* target, int64_t t, int64_t m,
                 int64_t num_classes, bool check_labels, bool* correct, int64_t b_total,
                 uint64_t* words, int32_t* n_correct, Accum& acc) {
  for (int64_t j = 0; j < t; ++j) {
    const int64_t y = target[j];
    if (y < 0 || (num_classes > 0 && y >= num_classes)) acc.flags |= kernels::kErrTarget;
    n_correct[j] = 0;
  }
  for (int64_t i = 0; i < m; ++i) {
    const int64_t* li = lab + i * ld;
    uint64_t w = 0;
    bool* ci = correct + i * b_total;
    for (int64_t j = 0; j < t; ++j) {
      const int64_t v = li[j];
      if (check_labels && (v < 0 || (num_classes > 0 && v >= num_classes))) {
        acc.flags |= kernels::kErrLabel;
      }
      const bool c = v == target[j];
      w |= static_cast<uint64_t>(c) << j;
      ci[j] = c;
      n_correct[j] += c;
    }
    words[i] = w;
  }
  for (int64_t j = 0; j < t; ++j) acc.hist[n_correct[j]] += 1;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t* li = lab + i * ld;
    acc.n11[i * m + i] += __builtin_popcountll(words[i]);
    acc.agree[i * m + i] += t;
    for (int64_t k = i + 1; k < m; ++k) {
      acc.n11[i * m + k] += __builtin_popcountll(words[i] & words[k]);
      const int64_t* lk = lab + k * ld;
      int64_t same = 0;
      for (int64_t j = 0; j < t; ++j) same += li[j] == lk[j];
      acc.agree[i * m + k] += same;
    }
  }
}

#define DIVFAST_TILE_ARGS                                                                       \
  const int64_t *lab, int64_t ld, const int64_t *target, int64_t t, int64_t m, int64_t num_classes, \
      bool check_labels, bool *correct, int64_t b_total, uint64_t *words, int32_t *n_correct,     \
      Accum &acc
#define DIVFAST_TILE_CALL \
  lab, ld, target, t, m, num_classes, check_labels, correct, b_total, words, n_correct, acc

#if defined(__x86_64__)
__attribute__((target("avx2,popcnt"))) void tile_update_avx2(DIVFAST_TILE_ARGS) {
  tile_update_impl(DIVFAST_TILE_CALL);
}
#endif

void tile_update(DIVFAST_TILE_ARGS) {
#if defined(__x86_64__)
  if (cpu_has_avx2()) return tile_update_avx2(DIVFAST_TILE_CALL);
#endif
  tile_update_impl(DIVFAST_TILE_CALL);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_counts_cpu(
    const at::Tensor& predictions, const at::Tensor& target, int64_t num_classes) {
  const bool is_logits = check_pair_counts_args(predictions, target, num_classes);
  TORCH_INTERNAL_ASSERT(predictions.device().is_cpu());
  const int64_t m = predictions.size(0);
  const int64_t b = predictions.size(1);
  const int64_t c = is_logits ? predictions.size(2) : 0;
  const int64_t checked_classes = is_logits ? c : num_classes;

  const at::Tensor preds = predictions.contiguous();
  const at::Tensor tgt = target.contiguous();
  const auto long_opts = tgt.options().dtype(at::kLong);
  at::Tensor correct = at::empty({m, b}, tgt.options().dtype(at::kBool));
  Accum total(m);
  std::mutex merge_mutex;
  const int64_t n_tiles = (b + kTile - 1) / kTile;
  const int64_t* t_ptr = tgt.data_ptr<int64_t>();
  bool* correct_ptr = correct.data_ptr<bool>();

  auto run = [&](auto tile_labels) {
    at::parallel_for(0, n_tiles, /*grain_size=*/8, [&](int64_t begin, int64_t end) {
      Accum acc(m);
      std::vector<uint64_t> words(m);
      std::vector<int32_t> n_correct(kTile);
      std::vector<int64_t> buffer;
      std::vector<float> scratch;
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t b0 = tile * kTile;
        const int64_t t = std::min<int64_t>(kTile, b - b0);
        int64_t ld = 0;
        const int64_t* lab = tile_labels(b0, t, buffer, scratch, acc, &ld);
        tile_update(lab, ld, t_ptr + b0, t, m, checked_classes, !is_logits, correct_ptr + b0, b,
                    words.data(), n_correct.data(), acc);
      }
      std::lock_guard<std::mutex> lock(merge_mutex);
      for (size_t i = 0; i < acc.n11.size(); ++i) total.n11[i] += acc.n11[i];
      for (size_t i = 0; i < acc.agree.size(); ++i) total.agree[i] += acc.agree[i];
      for (size_t i = 0; i < acc.hist.size(); ++i) total.hist[i] += acc.hist[i];
      total.flags |= acc.flags;
    });
  };

  if (is_logits) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, preds.scalar_type(), "pair_counts_cpu",
                                    [&] {
      const scalar_t* x = preds.data_ptr<scalar_t>();
      run([&](int64_t b0, int64_t t, std::vector<int64_t>& buffer, std::vector<float>& scratch,
              Accum& acc, int64_t* ld) -> const int64_t* {
        buffer.resize(m * kTile);
        scratch.resize(c);
        bool nan = false;
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < t; ++j) {
            buffer[i * kTile + j] = row_argmax<scalar_t>(x + ((i * b) + b0 + j) * c, c, &nan,
                                                         scratch.data());
          }
        }
        if (nan) acc.flags |= kernels::kErrNaN;
        *ld = kTile;
        return buffer.data();
      });
    });
  } else {
    const int64_t* labels = preds.data_ptr<int64_t>();
    run([&](int64_t b0, int64_t, std::vector<int64_t>&, std::vector<float>&, Accum&,
            int64_t* ld) -> const int64_t* {
      *ld = b;
      return labels + b0;
    });
  }
  raise_pair_counts_errors(total.flags, checked_classes);

  at::Tensor counts = at::empty({m, m, 2, 2}, long_opts);
  at::Tensor agreement = at::empty({m, m}, long_opts);
  int64_t* counts_ptr = counts.data_ptr<int64_t>();
  int64_t* agree_ptr = agreement.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t k = 0; k < m; ++k) {
      kernels::finalize_pair(total.n11.data(), total.agree.data(), m, i, k, b, counts_ptr,
                             agree_ptr);
    }
  }
  at::Tensor histogram = at::from_blob(total.hist.data(), {m + 1}, long_opts).clone();
  return {counts, agreement, histogram, correct};
}

}  // namespace

TORCH_LIBRARY_IMPL(divfast, CPU, m) { m.impl("pair_counts", &pair_counts_cpu); }

}  // namespace divfast
