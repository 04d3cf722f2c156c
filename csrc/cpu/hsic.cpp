// CPU kernel of divfast::hsic: the unbiased HSIC (Song et al. 2012) of every pair of G Gram matrices
// of one batch, from one read of them, with the U-centring folded into the inner products:
//
//   HSIC(K, L) = [tr(K~ L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) (K~1)'(L~1)] / (n(n-3)),
//
// K~ the Gram with its diagonal zeroed. Only the symmetric part S = (K + K')/2 of each Gram enters (a
// Gram matrix is symmetric; rounding in the GEMM that formed it may not be), so tr(S~a S~b) is twice
// the sum over the upper triangle i < j and the kernel streams that triangle only: half the products
// of the plain Frobenius product of full matrices.
//
// The triangle is cut into chunks of whole rows. For each chunk every Gram's entries s = K_ij + K_ji
// are packed (float64) into a buffer that stays in L2 while their row sums accumulate; then every pair
// (a, b) adds its dot product over the chunk, in 3 x 3 register tiles (AVX2 with FMA where the CPU has
// it). No centred copy is written. Each output entry is owned by one tile and chunks are visited in
// order, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "checks.h"
#include "cpu/cpu_features.h"

namespace divfast {

at::Tensor finish_hsic(const at::Tensor& trace, const at::Tensor& rowdot, const at::Tensor& totals,
                       int64_t n) {
  const double nd = static_cast<double>(n);
  return (trace + at::outer(totals, totals) / ((nd - 1) * (nd - 2)) - (2.0 / (nd - 2)) * rowdot) /
         (nd * (nd - 3));
}

namespace {

constexpr int kTile = 3;  // register tile: 3 x 3 pairs of Grams

// Adds sum_k x_r[k] * y_c[k] over len values (len a multiple of 4) to out[r * ld + c]. Generic path.
template <int R, int C>
inline void tile_generic(const double* const* x, const double* const* y, int64_t len, double* out,
                         int64_t ld) {
  double acc[R][C][4] = {};
  for (int64_t k = 0; k < len; k += 4)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c)
        for (int l = 0; l < 4; ++l) acc[r][c][l] = std::fma(x[r][k + l], y[c][k + l], acc[r][c][l]);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * ld + c] += (acc[r][c][0] + acc[r][c][2]) + (acc[r][c][1] + acc[r][c][3]);
}

#if defined(__x86_64__)
template <int R, int C>
__attribute__((target("avx2,fma"))) inline void tile_avx2(const double* const* x, const double* const* y,
                                                          int64_t len, double* out, int64_t ld) {
  __m256d acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_pd();
  for (int64_t k = 0; k < len; k += 4) {
    __m256d xv[R], yv[C];
    for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_pd(x[r] + k);
    for (int c = 0; c < C; ++c) yv[c] = _mm256_loadu_pd(y[c] + k);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_pd(xv[r], yv[c], acc[r][c]);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {  // same lane order as tile_generic: (0 + 2) + (1 + 3)
      const __m128d lo = _mm256_castpd256_pd128(acc[r][c]), hi = _mm256_extractf128_pd(acc[r][c], 1);
      const __m128d pair = _mm_add_pd(lo, hi);  // (l0 + l2, l1 + l3)
      out[r * ld + c] += _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)));
    }
}
#endif

template <int R, int C>
inline void tile(bool avx2, const double* const* x, const double* const* y, int64_t len, double* out,
                 int64_t ld) {
#if defined(__x86_64__)
  if (avx2) return tile_avx2<R, C>(x, y, len, out, ld);
#endif
  tile_generic<R, C>(x, y, len, out, ld);
}

// Dispatches an R x C edge tile (R, C in 1..3) to its instantiation.
inline void tile_any(bool avx2, int r, int c, const double* const* x, const double* const* y, int64_t len,
                     double* out, int64_t ld) {
  switch (r * 4 + c) {
    case 15: return tile<3, 3>(avx2, x, y, len, out, ld);
    case 14: return tile<3, 2>(avx2, x, y, len, out, ld);
    case 13: return tile<3, 1>(avx2, x, y, len, out, ld);
    case 11: return tile<2, 3>(avx2, x, y, len, out, ld);
    case 10: return tile<2, 2>(avx2, x, y, len, out, ld);
    case 9: return tile<2, 1>(avx2, x, y, len, out, ld);
    case 7: return tile<1, 3>(avx2, x, y, len, out, ld);
    case 6: return tile<1, 2>(avx2, x, y, len, out, ld);
    default: return tile<1, 1>(avx2, x, y, len, out, ld);
  }
}

// Products over the rows of `rows` (G rows of len values, stride ld_rows; len a multiple of 4) of every
// pair (a <= b), added to out (G x G, upper triangle). Tiles run in parallel; each owns its entries.
void pair_products(const double* rows, int64_t g, int64_t len, int64_t ld_rows, double* out, bool avx2) {
  const int64_t blocks = (g + kTile - 1) / kTile;
  const int64_t tiles = blocks * (blocks + 1) / 2;
  at::parallel_for(0, tiles, 8, [&](int64_t begin, int64_t end) {
    // Tile t -> (block row bi, block column bj >= bi), row-major over the upper triangle of blocks.
    int64_t bi = 0, first = 0;
    while (first + (blocks - bi) <= begin) first += blocks - bi, ++bi;
    int64_t bj = bi + (begin - first);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t a0 = bi * kTile, b0 = bj * kTile;
      const int r = static_cast<int>(std::min<int64_t>(kTile, g - a0));
      const int c = static_cast<int>(std::min<int64_t>(kTile, g - b0));
      const double* x[kTile];
      const double* y[kTile];
      for (int k = 0; k < r; ++k) x[k] = rows + (a0 + k) * ld_rows;
      for (int k = 0; k < c; ++k) y[k] = rows + (b0 + k) * ld_rows;
      tile_any(avx2, r, c, x, y, len, out + a0 * g + b0, g);
      if (++bj == blocks) ++bi, bj = bi;
    }
  });
}

// Packs rows [i0, i1) of the upper triangle of Gram a (entries K_ij + K_ji, j > i) into dst, zero-pads
// to a multiple of 4, and adds each entry to the row sums of both its row and its column. Returns
// whether every entry was finite.
template <typename scalar_t>
bool pack_rows(const scalar_t* k, int64_t n, int64_t i0, int64_t i1, int64_t padded, double* dst,
               double* rowsum) {
  double check = 0;  // stays 0 unless an entry is NaN or infinite (x * 0)
  int64_t pos = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const scalar_t* row = k + i * n;
    check += static_cast<double>(row[i]) * 0.0;  // the diagonal is not used, but must be finite too
    double own = 0;
    for (int64_t j = i + 1; j < n; ++j) {
      const double s = static_cast<double>(row[j]) + static_cast<double>(k[j * n + i]);
      dst[pos++] = s;
      own += s;
      rowsum[j] += s;
      check += s * 0.0;
    }
    rowsum[i] += own;
  }
  for (; pos < padded; ++pos) dst[pos] = 0.0;
  return check == 0.0;
}

template <typename scalar_t>
void hsic_kernel(const scalar_t* grams, int64_t g, int64_t n, double* trace, double* rows, double* rowdot,
                 bool* nonfinite) {
  // Chunks of whole rows of about `target` triangle entries each: G chunk rows of float64 fit in L2.
  const int64_t target = std::clamp<int64_t>((int64_t{1} << 20) / (8 * g), 256, 4096);
  std::vector<int64_t> bounds{0};
  for (int64_t i = 0, len = 0; i < n; ++i) {
    len += n - 1 - i;
    if (len >= target || i == n - 1) bounds.push_back(i + 1), len = 0;
  }
  int64_t widest = 0;
  for (size_t c = 0; c + 1 < bounds.size(); ++c) {
    const int64_t i0 = bounds[c], i1 = bounds[c + 1];
    widest = std::max(widest, (i1 - i0) * (2 * n - i0 - i1 - 1) / 2);
  }
  const int64_t ld = (widest + 3) / 4 * 4;
  std::vector<double> buf(static_cast<size_t>(g * ld));
  std::vector<char> bad(g, 0);
  const bool avx2 = cpu_has_avx2_fma();
  for (size_t c = 0; c + 1 < bounds.size(); ++c) {
    const int64_t i0 = bounds[c], i1 = bounds[c + 1];
    const int64_t len = (i1 - i0) * (2 * n - i0 - i1 - 1) / 2, padded = (len + 3) / 4 * 4;
    if (len == 0) continue;
    at::parallel_for(0, g, 1, [&](int64_t begin, int64_t end) {
      for (int64_t a = begin; a < end; ++a)
        bad[a] |= !pack_rows(grams + a * n * n, n, i0, i1, padded, buf.data() + a * ld, rows + a * n);
    });
    pair_products(buf.data(), g, padded, ld, trace, avx2);
  }
  for (int64_t a = 0; a < g; ++a) *nonfinite |= bad[a] != 0;
  // Row sums of K~ + K~' (twice those of S~), padded to a multiple of 4 for the tiles.
  const int64_t ldr = (n + 3) / 4 * 4;
  std::vector<double> rpad(static_cast<size_t>(g * ldr), 0.0);
  for (int64_t a = 0; a < g; ++a) std::copy(rows + a * n, rows + (a + 1) * n, rpad.begin() + a * ldr);
  pair_products(rpad.data(), g, ldr, ldr, rowdot, avx2);
}

at::Tensor hsic_cpu(const at::Tensor& grams) {
  check_hsic_args(grams);
  const int64_t g = grams.size(0), n = grams.size(1);
  const auto f64 = grams.options().dtype(at::kDouble);
  const at::Tensor x = grams.contiguous();
  at::Tensor trace = at::zeros({g, g}, f64), rowdot = at::zeros({g, g}, f64), rows = at::zeros({g, n}, f64);
  bool nonfinite = false;
  if (g > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hsic_cpu", [&] {
      hsic_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), g, n, trace.data_ptr<double>(),
                            rows.data_ptr<double>(), rowdot.data_ptr<double>(), &nonfinite);
    });
  }
  TORCH_CHECK_VALUE(!nonfinite, "hsic: `grams` contain NaN or infinity");
  // trace holds sum_{i<j} (2 S_a)(2 S_b) = 2 tr(S~a S~b); rows hold 2 S~1, so rowdot is 4x.
  at::Tensor upper = trace.triu();
  trace = (upper + upper.triu(1).t()) * 0.5;
  at::Tensor rd = rowdot.triu();
  rowdot = (rd + rd.triu(1).t()) * 0.25;
  at::Tensor hsic = finish_hsic(trace, rowdot, rows.sum(1) * 0.5, n);
  TORCH_CHECK_VALUE(hsic.isfinite().all().item<bool>(),
                    "hsic: the products of `grams` overflow float64 (entries near 1e154); scale the "
                    "features down");
  return hsic;
}

}  // namespace

TORCH_LIBRARY_IMPL(divfast, CPU, m) { m.impl("hsic", &hsic_cpu); }

}  // namespace divfast
