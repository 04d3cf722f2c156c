// CPU kernel of divfast::attribution_stats: one read of the maps, per-sample products of every member
// pair, then a tiny finish (normalisation, variance, Gram) shared with the CUDA host.
//
// Work items are (sample, chunk of pixels). An item streams its chunk in blocks of kBlock pixels: the
// M members' blocks are converted (and |.|'d) into a small L1-resident buffer, then every member pair's
// dot product over the block is formed in the accumulation type (float for 16/32-bit maps, double for
// float64) in 2x2 register blocks, and added to the item's float64 sums. Sums per item are reduced in
// a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"

namespace divfast {

std::tuple<at::Tensor, at::Tensor> finish_attribution_stats(const at::Tensor& raw, const at::Tensor& l1,
                                                            const at::Tensor& amax, int code,
                                                            int64_t ddof) {
  const int64_t m = raw.size(1);
  at::Tensor q = raw;
  if (code != 0) {
    at::Tensor norm = code == 1 ? l1 : code == 2 ? raw.diagonal(0, 1, 2).sqrt() : amax;  // (B, M)
    at::Tensor inv = at::where(norm > 0, norm.reciprocal(), at::zeros_like(norm));
    q = raw * inv.unsqueeze(2) * inv.unsqueeze(1);  // a map scaled by 1/n_i: products by 1/(n_i n_j)
  }
  // Sum over pixels of the variance across members: (sum_m Q_mm - sum_ij Q_ij / M) / (M - ddof).
  at::Tensor variance = (q.diagonal(0, 1, 2).sum(-1) - q.sum({1, 2}) / static_cast<double>(m)) /
                        static_cast<double>(m - ddof);
  return {variance.clamp_min(0.0), q.sum(0)};
}

namespace {

constexpr int64_t kBlock = 128;   // pixels per block: M * kBlock values stay in L1
constexpr int64_t kChunk = 8192;  // pixels per work item

#define DIVFAST_INLINE inline __attribute__((always_inline))

// Dot products of rows i, i+1 with rows j, j+1 of the block buffer (n values each). std::fma lets the
// AVX2 build fuse the multiply-adds (C++20 mode forbids contracting a * b + c by itself).
template <typename acc_t>
DIVFAST_INLINE void dot2x2(const acc_t* xi, const acc_t* xi1, const acc_t* xj, const acc_t* xj1, int64_t n,
                   acc_t out[4]) {
  acc_t s00 = 0, s01 = 0, s10 = 0, s11 = 0;
#pragma omp simd reduction(+ : s00, s01, s10, s11)
  for (int64_t k = 0; k < n; ++k) {
    s00 = std::fma(xi[k], xj[k], s00);
    s01 = std::fma(xi[k], xj1[k], s01);
    s10 = std::fma(xi1[k], xj[k], s10);
    s11 = std::fma(xi1[k], xj1[k], s11);
  }
  out[0] = s00, out[1] = s01, out[2] = s10, out[3] = s11;
}

template <typename acc_t>
DIVFAST_INLINE acc_t dot1(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s = std::fma(a[k], b[k], s);
  return s;
}

// Adds the products of every member pair over buf (M rows of n values, row stride kBlock) to raw
// (M x M, upper triangle).
template <typename acc_t>
DIVFAST_INLINE void add_block_products(const acc_t* buf, int64_t m, int64_t n, double* raw) {
  acc_t d[4];
  int64_t i = 0;
  for (; i + 1 < m; i += 2) {
    const acc_t* xi = buf + i * kBlock;
    const acc_t* xi1 = xi + kBlock;
    int64_t j = i;
    for (; j + 1 < m; j += 2) {
      dot2x2(xi, xi1, buf + j * kBlock, buf + (j + 1) * kBlock, n, d);
      raw[i * m + j] += d[0];
      raw[i * m + j + 1] += d[1];
      if (j > i) raw[(i + 1) * m + j] += d[2];  // on the diagonal block this is (i+1, i): skip
      raw[(i + 1) * m + j + 1] += d[3];
    }
    if (j < m) {  // odd M: the last column
      raw[i * m + j] += dot1(xi, buf + j * kBlock, n);
      raw[(i + 1) * m + j] += dot1(xi1, buf + j * kBlock, n);
    }
  }
  if (i < m) raw[i * m + i] += dot1(buf + i * kBlock, buf + i * kBlock, n);
}

// One work item: pixels [lo, hi) of sample s, into its own products r (M x M), l1 and max sums.
// Returns whether a NaN or an infinity was seen.
template <typename scalar_t, typename acc_t>
DIVFAST_INLINE bool item_impl(const scalar_t* x, int64_t m, int64_t b, int64_t d, int64_t s, int64_t lo,
                              int64_t hi, bool take_abs, acc_t* buf, double* r, double* pl1,
                              double* pmax) {
  bool bad = false;
  for (int64_t p0 = lo; p0 < hi; p0 += kBlock) {
    const int64_t n = std::min(kBlock, hi - p0);
    for (int64_t i = 0; i < m; ++i) {
      const scalar_t* src = x + (i * b + s) * d + p0;
      acc_t* dst = buf + i * kBlock;
      acc_t sum_abs = 0, mx = 0, check = 0;
#pragma omp simd reduction(+ : sum_abs, check) reduction(max : mx)
      for (int64_t k = 0; k < n; ++k) {
        const acc_t v = static_cast<acc_t>(src[k]);
        const acc_t a = std::abs(v);
        dst[k] = take_abs ? a : v;
        sum_abs += a;
        mx = std::max(mx, a);
        check += v * acc_t(0);  // NaN for a NaN or an infinity, else 0
      }
      pl1[i] += sum_abs;
      pmax[i] = std::max(pmax[i], static_cast<double>(mx));
      bad |= check != check;
    }
    add_block_products(buf, m, n, r);
  }
  return bad;
}

#define DIVFAST_ITEM_ARGS(scalar_t, acc_t)                                                        \
  const scalar_t *x, int64_t m, int64_t b, int64_t d, int64_t s, int64_t lo, int64_t hi,        \
      bool take_abs, acc_t *buf, double *r, double *pl1, double *pmax
#define DIVFAST_ITEM_CALL x, m, b, d, s, lo, hi, take_abs, buf, r, pl1, pmax

#if defined(__x86_64__)
bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

template <typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) bool item_avx2(DIVFAST_ITEM_ARGS(scalar_t, acc_t)) {
  return item_impl(DIVFAST_ITEM_CALL);
}
#endif

template <typename scalar_t, typename acc_t>
bool item(DIVFAST_ITEM_ARGS(scalar_t, acc_t)) {
#if defined(__x86_64__)
  if (cpu_has_avx2_fma()) return item_avx2<scalar_t, acc_t>(DIVFAST_ITEM_CALL);
#endif
  return item_impl(DIVFAST_ITEM_CALL);
}

template <typename scalar_t>
void attribution_stats_kernel(const scalar_t* x, int64_t m, int64_t b, int64_t d, bool take_abs,
                              double* raw, double* l1, double* amax, bool* nonfinite) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t chunks = std::max<int64_t>(1, (d + kChunk - 1) / kChunk);
  const int64_t items = b * chunks;
  // Per item: M*M products, M l1 sums, M maxima; reduced per sample afterwards in chunk order.
  std::vector<double> part_raw(items * m * m, 0.0), part_l1(items * m, 0.0), part_max(items * m, 0.0);
  std::vector<char> part_bad(items, 0);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(m * kBlock);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t s = it / chunks, c = it % chunks;
      const int64_t lo = c * kChunk, hi = std::min(d, lo + kChunk);
      part_bad[it] = item<scalar_t, acc_t>(x, m, b, d, s, lo, hi, take_abs, buf.data(),
                                           part_raw.data() + it * m * m, part_l1.data() + it * m,
                                           part_max.data() + it * m);
    }
  });
  for (int64_t s = 0; s < b; ++s) {
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t it = s * chunks + c;
      for (int64_t k = 0; k < m * m; ++k) raw[s * m * m + k] += part_raw[it * m * m + k];
      for (int64_t i = 0; i < m; ++i) {
        l1[s * m + i] += part_l1[it * m + i];
        amax[s * m + i] = std::max(amax[s * m + i], part_max[it * m + i]);
      }
      *nonfinite |= part_bad[it] != 0;
    }
    for (int64_t i = 0; i < m; ++i)  // mirror the upper triangle
      for (int64_t j = 0; j < i; ++j) raw[s * m * m + i * m + j] = raw[s * m * m + j * m + i];
  }
}

std::tuple<at::Tensor, at::Tensor> attribution_stats_cpu(const at::Tensor& attributions, bool abs,
                                                         c10::string_view normalize, int64_t ddof) {
  const int code = check_attribution_stats_args(attributions, normalize, ddof);
  const int64_t m = attributions.size(0), b = attributions.size(1);
  const int64_t d = b == 0 ? 0 : attributions.numel() / (m * b);
  const at::Tensor x = attributions.contiguous();
  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor raw = at::zeros({b, m, m}, f64), l1 = at::zeros({b, m}, f64), amax = at::zeros({b, m}, f64);
  bool nonfinite = false;
  if (b > 0 && d > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attribution_stats_cpu", [&] {
      attribution_stats_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), m, b, d, abs,
                                         raw.data_ptr<double>(), l1.data_ptr<double>(),
                                         amax.data_ptr<double>(), &nonfinite);
    });
  }
  TORCH_CHECK_VALUE(!nonfinite, "attribution_stats: `attributions` contain NaN or infinity");
  return finish_attribution_stats(raw, l1, amax, code, ddof);
}

}  // namespace

TORCH_LIBRARY_IMPL(divfast, CPU, m) { m.impl("attribution_stats", &attribution_stats_cpu); }

}  // namespace divfast
