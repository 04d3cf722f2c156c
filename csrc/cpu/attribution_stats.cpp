// CPU kernel of divfast::attribution_stats: per-sample products of every member pair of the maps,
// centred at each pixel on the members' mean, from one read of the maps (two with a normalisation,
// whose norms come first).
//
// Work items are (sample, chunk of pixels). An item streams its chunk in blocks of kBlock pixels: the
// M members' blocks are converted (|.|, times 1/norm) into a small L1-resident buffer as differences
// from member 0's value at each pixel (whole blocks by the SIMD tiles that read them first), and
// every pair of those M - 1 rows' dot product over the block is formed in the accumulation type
// (float for 16/32-bit maps, double for float64) in register tiles (the SIMD tiles keep each pair's
// vector lanes across kFlushBlocks blocks, and ask for a later block's lines as they go), then
// added to the item's float64 sums; each sample's sums are then centred on the members' mean in
// float64 (centre_products). Shifting first makes the products those of differences (no
// cancellation between large Gram entries), so members that differ by 1e-4 of their values still get
// an accurate diversity. Sums per item are reduced in a fixed order, so results do not depend on the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "checks.h"
#include "cpu/cpu_features.h"

namespace divfast {

namespace {
// Whether every value of a contiguous float64 CPU tensor is finite: a loop, where the tensor ops cost
// several dispatches (features.py calls the kernel for every wide layer of every batch). Looked at
// once per call: attribution_stats_cpu passes the answer on to finish_attribution_stats.
bool all_finite_cpu(const at::Tensor& t) {
  const double* v = t.const_data_ptr<double>();
  bool finite = true;
  for (int64_t k = 0, n = t.numel(); k < n; ++k) finite &= std::isfinite(v[k]);
  return finite;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> finish_attribution_stats(const at::Tensor& centred, int64_t ddof,
                                                            std::optional<bool> finite) {
  // centred (B, M, M): products of the maps centred on the members' mean. Its trace is the sum over
  // pixels of the squared deviations: the variance times (M - ddof).
  const int64_t m = centred.size(1);
  TORCH_CHECK_VALUE(finite.has_value() ? *finite : centred.isfinite().all().item<bool>(),
                    "attribution_stats: the products of `attributions` overflow (values near the "
                    "float32 range); pass float64 maps or normalise them");
  at::Tensor variance = centred.diagonal(0, 1, 2).sum(-1) / static_cast<double>(m - ddof);
  return {variance, centred.sum(0)};
}

namespace {

// Norm of each map (B, M): l1 = sum |a|, l2 = sqrt(sum a^2), max = max |a|; one read of the maps.
template <typename scalar_t>
void map_norms_cpu(const scalar_t* x, int64_t m, int64_t b, int64_t d, int code, double* out) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, m * b, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = member * B + sample
      const scalar_t* src = x + row * d;
      double total = 0;  // float64 throughout: the squares of large maps overflow float
      if (code == 3) {
        for (int64_t k = 0; k < d; ++k) total = std::max(total, std::abs(static_cast<double>(src[k])));
      } else if (code == 2) {
#pragma omp simd reduction(+ : total)
        for (int64_t k = 0; k < d; ++k) total += static_cast<double>(src[k]) * static_cast<double>(src[k]);
      } else {
#pragma omp simd reduction(+ : total)
        for (int64_t k = 0; k < d; ++k) total += std::abs(static_cast<double>(src[k]));
      }
      out[(row % b) * m + row / b] = code == 2 ? std::sqrt(total) : total;
    }
  });
}

}  // namespace

at::Tensor inverse_map_norms(const at::Tensor& maps, int code) {
  // maps (M, B, D) contiguous -> 1 / norm (B, M) float64 (1 without a normalisation; 0 for a zero map).
  const int64_t m = maps.size(0), b = maps.size(1), d = maps.size(2);
  const auto f64 = maps.options().dtype(at::kDouble);
  if (code == 0) return at::ones({b, m}, f64);
  at::Tensor norm;
  if (maps.is_cpu()) {
    norm = at::empty({b, m}, f64);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps.scalar_type(), "map_norms_cpu", [&] {
      map_norms_cpu<scalar_t>(maps.const_data_ptr<scalar_t>(), m, b, d, code, norm.data_ptr<double>());
    });
  } else {  // CUDA: torch's reductions in float64 (the squares of large maps overflow float)
    const double ord = code == 1 ? 1.0 : code == 2 ? 2.0 : std::numeric_limits<double>::infinity();
    norm = at::linalg_vector_norm(maps, ord, {2}, false, at::kDouble).t().contiguous();
  }
  return at::where(norm > 0, norm.reciprocal(), at::zeros_like(norm)).contiguous();
}

namespace {

// Pixels per block: the M - 1 shifted rows stay in L1 (14 KB at M = 14). 256 pixels against 128:
// the tiles' accumulators are loaded and stored half as often (tiles alone: 217 against 245 ns per
// 128 pixels at M = 14), and with the prefetches spread over the tiles (below) the DRAM-bound
// M = 14 case ran the same or faster.
constexpr int64_t kBlock = 256;
constexpr int64_t kChunk = 8192;  // pixels per work item
constexpr int64_t kSplit = 16;       // a shorter map is cut into up to this many chunks ...
constexpr int64_t kMinChunk = 1024;  // ... of at least this many pixels
// Blocks between a row's prefetch (into L2) and its use.
constexpr int64_t kPrefetchBlocks = 2;
// Blocks whose products the AVX2 / AVX-512 tiles keep in float vector lanes (vacc) before adding
// them to the float64 sums: 4 blocks of 256 pixels = 128 (AVX2) or 64 (AVX-512) terms per lane.
constexpr int64_t kFlushBlocks = 4;

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

// Adds the products of every pair of buf's m rows (n values each, row stride kBlock) to raw (upper
// triangle, row stride ld).
template <typename acc_t>
DIVFAST_INLINE void add_block_products(const acc_t* buf, int64_t m, int64_t n, double* raw, int64_t ld) {
  acc_t d[4];
  int64_t i = 0;
  for (; i + 1 < m; i += 2) {
    const acc_t* xi = buf + i * kBlock;
    const acc_t* xi1 = xi + kBlock;
    int64_t j = i;
    for (; j + 1 < m; j += 2) {
      dot2x2(xi, xi1, buf + j * kBlock, buf + (j + 1) * kBlock, n, d);
      raw[i * ld + j] += d[0];
      raw[i * ld + j + 1] += d[1];
      if (j > i) raw[(i + 1) * ld + j] += d[2];  // on the diagonal block this is (i+1, i): skip
      raw[(i + 1) * ld + j + 1] += d[3];
    }
    if (j < m) {  // odd m: the last column
      raw[i * ld + j] += dot1(xi, buf + j * kBlock, n);
      raw[(i + 1) * ld + j] += dot1(xi1, buf + j * kBlock, n);
    }
  }
  if (i < m) raw[i * ld + i] += dot1(buf + i * kBlock, buf + i * kBlock, n);
}

// The SIMD tiles also issue the software prefetches of a later block, spread over their vector
// steps: tile t of a block asks for up to 3 rows of the block kPrefetchBlocks ahead, a cache line of
// each whenever a vector step (`step` bytes) starts one. Asking for all M rows at once, at each
// block's conversion (M times 16 lines in a burst), ran M = 14 at 2 threads 15-20 % slower; a few
// lines per step run beside the FMAs (the burst likely waits on the core's few miss buffers).
struct TilePrefetch {
  const char* at = nullptr;  // the tile's first row's window
  int64_t rows = 0, row_stride = 0, step = 0;
};

// A block's prefetches: `rows` rows from `first`, row_stride bytes apart, at most kPrefetchRowsPerTile
// per tile in tile order (item_impl asks for the rows beyond tiles * kPrefetchRowsPerTile itself).
constexpr int64_t kPrefetchRowsPerTile = 3;
struct BlockPrefetch {
  const char* first = nullptr;
  int64_t rows = 0, row_stride = 0, step = 0;
  TilePrefetch tile(int64_t t) const {
    const int64_t r0 = std::min(rows, t * kPrefetchRowsPerTile);
    const int64_t r1 = std::min(rows, r0 + kPrefetchRowsPerTile);
    return {first + r0 * row_stride, r1 - r0, row_stride, step};
  }
};

// Tiles per block for m shifted rows in groups of g: a triangle per group, a rectangle per pair.
constexpr int64_t tiles_per_block(int64_t m, int64_t g) {
  const int64_t groups = (m + g - 1) / g;
  return groups * (groups + 1) / 2;
}
constexpr int64_t kGroupAvx2 = 3, kGroupAvx512 = 5;

// A tile's prefetches for vector step v: a line of each of its rows whenever the step starts one.
inline __attribute__((always_inline)) void prefetch_step(const TilePrefetch& pf, int64_t v) {
  const int64_t offset = v * pf.step;
  if (pf.rows == 0 || offset % 64 != 0) return;
  __builtin_prefetch(pf.at + offset, 0, 2);
  if (pf.rows > 1) __builtin_prefetch(pf.at + pf.row_stride + offset, 0, 2);
  if (pf.rows > 2) __builtin_prefetch(pf.at + 2 * pf.row_stride + offset, 0, 2);
}
static_assert(kPrefetchRowsPerTile == 3, "prefetch_step asks for up to 3 rows");

#if defined(__x86_64__)
// A full block's maps, read by the SIMD diagonal tiles themselves (see gram_block_f32_avx512):
// member i's block starts at first + i * row_stride values; inv[i] is its 1 / norm.
template <typename scalar_t>
struct BlockSource {
  const scalar_t* first = nullptr;
  int64_t row_stride = 0;
  const float* inv = nullptr;
  bool take_abs = false, scaled = false;  // scaled: some inv[i] != 1
};

// 8 map values as floats, exactly as static_cast<float> converts them (F16C for float16).
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256 load8(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    static_assert(std::is_same_v<scalar_t, at::BFloat16>);
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
}

// load8 converted as the conversion loop does: |x| (abs_mask clears the sign bit, or is all ones),
// times scale when scaled.
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256 converted8(
    const scalar_t* p, __m256 abs_mask, bool scaled, float scale) {
  const __m256 v = _mm256_and_ps(load8(p), abs_mask);
  return scaled ? _mm256_mul_ps(v, _mm256_set1_ps(scale)) : v;
}

// The AVX2 twin of diag_tile_converting_f32_avx512 (below): the diagonal tile of shifted rows
// i0..i0+R-1 over a full block converts those rows from the maps, stores them in buf for the
// rectangles, and forms their products.
template <typename scalar_t, int R>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void diag_tile_converting_f32_avx2(
    float* buf, int64_t nvec, int64_t i0, float* vacc, int64_t vld, TilePrefetch pf,
    const BlockSource<scalar_t>& src) {
  __m256 acc[R][R];
#pragma GCC unroll 3
  for (int di = 0; di < R; ++di)
#pragma GCC unroll 3
    for (int dj = di; dj < R; ++dj) acc[di][dj] = _mm256_loadu_ps(vacc + ((i0 + di) * vld + i0 + dj) * 16);
  const scalar_t* row[R + 1];  // member 0, then members i0 + 1 ..; locals (buf's stores alias nothing)
  float scale[R + 1];
  row[0] = src.first, scale[0] = src.inv[0];
#pragma GCC unroll 3
  for (int di = 0; di < R; ++di)
    row[di + 1] = src.first + (i0 + di + 1) * src.row_stride, scale[di + 1] = src.inv[i0 + di + 1];
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(src.take_abs ? 0x7fffffff : -1));
  const bool scaled = src.scaled;
  for (int64_t v = 0; v < nvec; ++v) {
    prefetch_step(pf, v);
    const int64_t k = v * 8;
    const __m256 base = converted8(row[0] + k, abs_mask, scaled, scale[0]);
    __m256 x[R];
#pragma GCC unroll 3
    for (int di = 0; di < R; ++di) {
      x[di] = _mm256_sub_ps(converted8(row[di + 1] + k, abs_mask, scaled, scale[di + 1]), base);
      _mm256_storeu_ps(buf + (i0 + di) * kBlock + k, x[di]);
    }
#pragma GCC unroll 3
    for (int dj = 0; dj < R; ++dj)
#pragma GCC unroll 3
      for (int di = 0; di <= dj; ++di) acc[di][dj] = _mm256_fmadd_ps(x[di], x[dj], acc[di][dj]);
  }
#pragma GCC unroll 3
  for (int di = 0; di < R; ++di)
#pragma GCC unroll 3
    for (int dj = di; dj < R; ++dj) _mm256_storeu_ps(vacc + ((i0 + di) * vld + i0 + dj) * 16, acc[di][dj]);
}

// One R x C tile of member pairs (rows i0.., columns j0..) over a block of nvec * 8 floats. The R
// rows' vectors are loaded once per step and each column's once, as its R FMAs need it: R * C
// accumulators, R rows and a column stay in registers (at most 9 + 3 + 1 of AVX2's 16). A diagonal
// tile (kDiag: i0 == j0, R == C) forms only its upper triangle and takes its columns from the rows'
// registers. The accumulators are not reduced per block: each pair's 8 lanes live in vacc (row
// stride vld pairs) for kFlushBlocks blocks, loaded and stored once per tile (two instructions per
// pair instead of a horizontal sum of about ten); flush_f32_avx2 adds them to the float64 sums.
template <int R, int C, bool kDiag = false>
__attribute__((target("avx2,fma"), always_inline)) inline void tile_f32_avx2(
    const float* buf, int64_t nvec, int64_t i0, int64_t j0, float* vacc, int64_t vld, TilePrefetch pf) {
  __m256 acc[R][C];
#pragma GCC unroll 3
  for (int di = 0; di < R; ++di)
#pragma GCC unroll 3
    for (int dj = 0; dj < C; ++dj)
      if (!kDiag || di <= dj) acc[di][dj] = _mm256_loadu_ps(vacc + ((i0 + di) * vld + j0 + dj) * 16);
  for (int64_t v = 0; v < nvec; ++v) {
    prefetch_step(pf, v);
    const int64_t k = v * 8;
    __m256 x[R];
#pragma GCC unroll 3
    for (int di = 0; di < R; ++di) x[di] = _mm256_loadu_ps(buf + (i0 + di) * kBlock + k);
#pragma GCC unroll 3
    for (int dj = 0; dj < C; ++dj) {
      const __m256 y = kDiag ? x[dj] : _mm256_loadu_ps(buf + (j0 + dj) * kBlock + k);
#pragma GCC unroll 3
      for (int di = 0; di < R; ++di)
        if (!kDiag || di <= dj) acc[di][dj] = _mm256_fmadd_ps(x[di], y, acc[di][dj]);
    }
  }
#pragma GCC unroll 3
  for (int di = 0; di < R; ++di)
#pragma GCC unroll 3
    for (int dj = 0; dj < C; ++dj)
      if (!kDiag || di <= dj) _mm256_storeu_ps(vacc + ((i0 + di) * vld + j0 + dj) * 16, acc[di][dj]);
}

// Rows i0..i0+R-1 against `cols` (1..3) columns from j0.
template <int R>
__attribute__((target("avx2,fma"), always_inline)) inline void row_tiles_f32_avx2(
    const float* buf, int64_t nvec, int64_t i0, int64_t j0, int64_t cols, float* vacc, int64_t vld,
    TilePrefetch pf) {
  switch (cols) {
    case 3: tile_f32_avx2<R, 3>(buf, nvec, i0, j0, vacc, vld, pf); break;
    case 2: tile_f32_avx2<R, 2>(buf, nvec, i0, j0, vacc, vld, pf); break;
    default: tile_f32_avx2<R, 1>(buf, nvec, i0, j0, vacc, vld, pf); break;
  }
}

// The rectangles of a block (tiles t, t + 1, ... in prefetch order): a group with a later group is
// never the short last one, so every rectangle has kGroupAvx2 rows.
__attribute__((target("avx2,fma"))) void rectangles_f32_avx2(const float* buf, int64_t m, int64_t nvec,
                                                             float* vacc, const BlockPrefetch& prefetch,
                                                             int64_t t) {
  for (int64_t i0 = 0; i0 + kGroupAvx2 < m; i0 += kGroupAvx2)
    for (int64_t j0 = i0 + kGroupAvx2; j0 < m; j0 += kGroupAvx2)
      row_tiles_f32_avx2<kGroupAvx2>(buf, nvec, i0, j0, std::min(kGroupAvx2, m - j0), vacc, m,
                                     prefetch.tile(t++));
}

// The float path's hot loop: products of every pair of buf's m rows over one block (nvec * 8 floats
// each, zero-padded, row stride kBlock) added to vacc (m x m pairs of 8 lanes, stride 16 floats):
// rows in groups of 3, a triangle tile per group and a 3 x 3 rectangle (9 FMAs per 6 loads) per
// pair of groups, smaller at the edge. All triangles first: with `src` (a full block) they convert
// their rows from the maps (diag_tile_converting_f32_avx2) for the rectangles; without, buf holds
// them already.
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) void gram_block_f32_avx2(
    float* buf, int64_t m, int64_t nvec, float* vacc, const BlockPrefetch& prefetch,
    const BlockSource<scalar_t>* src) {
  int64_t t = 0;
  for (int64_t i0 = 0; i0 < m; i0 += kGroupAvx2) {
    const int64_t rows = std::min(kGroupAvx2, m - i0);
    const TilePrefetch pf = prefetch.tile(t++);
    if (src != nullptr) {
      switch (rows) {
        case 3: diag_tile_converting_f32_avx2<scalar_t, 3>(buf, nvec, i0, vacc, m, pf, *src); break;
        case 2: diag_tile_converting_f32_avx2<scalar_t, 2>(buf, nvec, i0, vacc, m, pf, *src); break;
        default: diag_tile_converting_f32_avx2<scalar_t, 1>(buf, nvec, i0, vacc, m, pf, *src); break;
      }
      continue;
    }
    switch (rows) {
      case 3: tile_f32_avx2<3, 3, true>(buf, nvec, i0, i0, vacc, m, pf); break;
      case 2: tile_f32_avx2<2, 2, true>(buf, nvec, i0, i0, vacc, m, pf); break;
      default: tile_f32_avx2<1, 1, true>(buf, nvec, i0, i0, vacc, m, pf); break;
    }
  }
  rectangles_f32_avx2(buf, m, nvec, vacc, prefetch, t);
}

// Adds vacc's upper triangle (m x m pairs of 8 float lanes, 16 floats apart) to raw (float64, row
// stride ld) in a fixed order, and zeroes it.
__attribute__((target("avx2"))) void flush_f32_avx2(float* vacc, int64_t m, double* raw, int64_t ld) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = i; j < m; ++j) {
      float* v = vacc + (i * m + j) * 16;
      const __m128 lanes_lo = _mm_loadu_ps(v), lanes_hi = _mm_loadu_ps(v + 4);
      const __m256d sum = _mm256_add_pd(_mm256_cvtps_pd(lanes_lo), _mm256_cvtps_pd(lanes_hi));
      __m128d half = _mm_add_pd(_mm256_castpd256_pd128(sum), _mm256_extractf128_pd(sum, 1));
      half = _mm_add_sd(half, _mm_unpackhi_pd(half, half));
      raw[i * ld + j] += _mm_cvtsd_f64(half);
      _mm256_storeu_ps(v, _mm256_setzero_ps());
    }
}

// The same with AVX-512 (32 registers): tiles of up to 5 x 5 pairs over vectors of 16 floats (25
// accumulators, 5 rows and a column: 31 registers). At M = 13 shifted rows: 6 tiles of 15, 25, 15,
// 15, 15 and 6 pairs, 39 loads per 91 FMAs. The tiles alone on a block in L1 ran at 92 % of the
// FMA peak (the 4 x 4 tiles they replace, on 128-pixel blocks: 65 %). nvec: vectors of 16; each
// pair's 16 lanes live in vacc as the AVX2 tile's 8 do.
template <int R, int C, bool kDiag = false>
__attribute__((target("avx512f"), always_inline)) inline void tile_f32_avx512(
    const float* buf, int64_t nvec, int64_t i0, int64_t j0, float* vacc, int64_t vld, TilePrefetch pf) {
  __m512 acc[R][C];
#pragma GCC unroll 5
  for (int di = 0; di < R; ++di)
#pragma GCC unroll 5
    for (int dj = 0; dj < C; ++dj)
      if (!kDiag || di <= dj) acc[di][dj] = _mm512_loadu_ps(vacc + ((i0 + di) * vld + j0 + dj) * 16);
  // Two steps per trip measured about 10 % faster than one.
#pragma GCC unroll 2
  for (int64_t v = 0; v < nvec; ++v) {
    prefetch_step(pf, v);
    const int64_t k = v * 16;
    __m512 x[R];
#pragma GCC unroll 5
    for (int di = 0; di < R; ++di) x[di] = _mm512_loadu_ps(buf + (i0 + di) * kBlock + k);
#pragma GCC unroll 5
    for (int dj = 0; dj < C; ++dj) {
      const __m512 y = kDiag ? x[dj] : _mm512_loadu_ps(buf + (j0 + dj) * kBlock + k);
#pragma GCC unroll 5
      for (int di = 0; di < R; ++di)
        if (!kDiag || di <= dj) acc[di][dj] = _mm512_fmadd_ps(x[di], y, acc[di][dj]);
    }
  }
#pragma GCC unroll 5
  for (int di = 0; di < R; ++di)
#pragma GCC unroll 5
    for (int dj = 0; dj < C; ++dj)
      if (!kDiag || di <= dj) _mm512_storeu_ps(vacc + ((i0 + di) * vld + j0 + dj) * 16, acc[di][dj]);
}

// 16 map values as floats, exactly as static_cast<float> converts them.
template <typename scalar_t>
__attribute__((target("avx512f"), always_inline)) inline __m512 load16(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {
    static_assert(std::is_same_v<scalar_t, at::BFloat16>);
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
}

// 16 values at p converted as the conversion loop does: |x| (abs_mask clears the sign bit, or is
// all ones), times scale when scaled.
template <typename scalar_t>
__attribute__((target("avx512f"), always_inline)) inline __m512 converted16(
    const scalar_t* p, __m512i abs_mask, bool scaled, float scale) {
  __m512 v = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(load16(p)), abs_mask));
  return scaled ? _mm512_mul_ps(v, _mm512_set1_ps(scale)) : v;
}

// The diagonal tile of shifted rows i0..i0+R-1 over a full block, converting those rows itself: each
// step reads the R members' values (and member 0's) from the maps, shifts them, stores them in buf
// for the rectangles that follow, and forms their products, so the conversion's loads and stores run
// beside the FMAs instead of in a pass of their own. The values are those the conversion loop
// writes, bit for bit (the same operations in the same order).
template <typename scalar_t, int R>
__attribute__((target("avx512f"), always_inline)) inline void diag_tile_converting_f32_avx512(
    float* buf, int64_t nvec, int64_t i0, float* vacc, int64_t vld, TilePrefetch pf,
    const BlockSource<scalar_t>& src) {
  __m512 acc[R][R];
#pragma GCC unroll 5
  for (int di = 0; di < R; ++di)
#pragma GCC unroll 5
    for (int dj = di; dj < R; ++dj) acc[di][dj] = _mm512_loadu_ps(vacc + ((i0 + di) * vld + i0 + dj) * 16);
  // Locals, so that the stores to buf cannot be taken to change them.
  const scalar_t* row[R + 1];  // member 0, then members i0 + 1 ..
  float scale[R + 1];
  row[0] = src.first, scale[0] = src.inv[0];
#pragma GCC unroll 5
  for (int di = 0; di < R; ++di)
    row[di + 1] = src.first + (i0 + di + 1) * src.row_stride, scale[di + 1] = src.inv[i0 + di + 1];
  const __m512i abs_mask = _mm512_set1_epi32(src.take_abs ? 0x7fffffff : -1);
  const bool scaled = src.scaled;
  for (int64_t v = 0; v < nvec; ++v) {
    prefetch_step(pf, v);
    const int64_t k = v * 16;
    const __m512 base = converted16(row[0] + k, abs_mask, scaled, scale[0]);
    __m512 x[R];
#pragma GCC unroll 5
    for (int di = 0; di < R; ++di) {
      x[di] = _mm512_sub_ps(converted16(row[di + 1] + k, abs_mask, scaled, scale[di + 1]), base);
      _mm512_storeu_ps(buf + (i0 + di) * kBlock + k, x[di]);
    }
#pragma GCC unroll 5
    for (int dj = 0; dj < R; ++dj)
#pragma GCC unroll 5
      for (int di = 0; di <= dj; ++di) acc[di][dj] = _mm512_fmadd_ps(x[di], x[dj], acc[di][dj]);
  }
#pragma GCC unroll 5
  for (int di = 0; di < R; ++di)
#pragma GCC unroll 5
    for (int dj = di; dj < R; ++dj) _mm512_storeu_ps(vacc + ((i0 + di) * vld + i0 + dj) * 16, acc[di][dj]);
}

template <int R>
__attribute__((target("avx512f"), always_inline)) inline void row_tiles_f32_avx512(
    const float* buf, int64_t nvec, int64_t i0, int64_t j0, int64_t cols, float* vacc, int64_t vld,
    TilePrefetch pf) {
  switch (cols) {
    case 5: tile_f32_avx512<R, 5>(buf, nvec, i0, j0, vacc, vld, pf); break;
    case 4: tile_f32_avx512<R, 4>(buf, nvec, i0, j0, vacc, vld, pf); break;
    case 3: tile_f32_avx512<R, 3>(buf, nvec, i0, j0, vacc, vld, pf); break;
    case 2: tile_f32_avx512<R, 2>(buf, nvec, i0, j0, vacc, vld, pf); break;
    default: tile_f32_avx512<R, 1>(buf, nvec, i0, j0, vacc, vld, pf); break;
  }
}

// rectangles_f32_avx2 for AVX-512: every rectangle has kGroupAvx512 rows.
__attribute__((target("avx512f"))) void rectangles_f32_avx512(const float* buf, int64_t m, int64_t nvec,
                                                               float* vacc, const BlockPrefetch& prefetch,
                                                               int64_t t) {
  for (int64_t i0 = 0; i0 + kGroupAvx512 < m; i0 += kGroupAvx512)
    for (int64_t j0 = i0 + kGroupAvx512; j0 < m; j0 += kGroupAvx512)
      row_tiles_f32_avx512<kGroupAvx512>(buf, nvec, i0, j0, std::min(kGroupAvx512, m - j0), vacc, m,
                                         prefetch.tile(t++));
}

// All diagonal tiles first, then the rectangles: with `src` (a full block), the diagonal tiles
// convert their rows from the maps (diag_tile_converting_f32_avx512), which the rectangles then read;
// without, buf holds them already.
template <typename scalar_t>
__attribute__((target("avx512f"))) void gram_block_f32_avx512(
    float* buf, int64_t m, int64_t nvec, float* vacc, const BlockPrefetch& prefetch,
    const BlockSource<scalar_t>* src) {
  int64_t t = 0;
  for (int64_t i0 = 0; i0 < m; i0 += kGroupAvx512) {
    const int64_t rows = std::min(kGroupAvx512, m - i0);
    const TilePrefetch pf = prefetch.tile(t++);
    if (src != nullptr) {
      switch (rows) {
        case 5: diag_tile_converting_f32_avx512<scalar_t, 5>(buf, nvec, i0, vacc, m, pf, *src); break;
        case 4: diag_tile_converting_f32_avx512<scalar_t, 4>(buf, nvec, i0, vacc, m, pf, *src); break;
        case 3: diag_tile_converting_f32_avx512<scalar_t, 3>(buf, nvec, i0, vacc, m, pf, *src); break;
        case 2: diag_tile_converting_f32_avx512<scalar_t, 2>(buf, nvec, i0, vacc, m, pf, *src); break;
        default: diag_tile_converting_f32_avx512<scalar_t, 1>(buf, nvec, i0, vacc, m, pf, *src); break;
      }
      continue;
    }
    switch (rows) {
      case 5: tile_f32_avx512<5, 5, true>(buf, nvec, i0, i0, vacc, m, pf); break;
      case 4: tile_f32_avx512<4, 4, true>(buf, nvec, i0, i0, vacc, m, pf); break;
      case 3: tile_f32_avx512<3, 3, true>(buf, nvec, i0, i0, vacc, m, pf); break;
      case 2: tile_f32_avx512<2, 2, true>(buf, nvec, i0, i0, vacc, m, pf); break;
      default: tile_f32_avx512<1, 1, true>(buf, nvec, i0, i0, vacc, m, pf); break;
    }
  }
  rectangles_f32_avx512(buf, m, nvec, vacc, prefetch, t);
}

// flush_f32_avx2 for 16 lanes.
__attribute__((target("avx512f"))) void flush_f32_avx512(float* vacc, int64_t m, double* raw, int64_t ld) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = i; j < m; ++j) {
      float* v = vacc + (i * m + j) * 16;
      const __m512d sum =
          _mm512_add_pd(_mm512_cvtps_pd(_mm256_loadu_ps(v)), _mm512_cvtps_pd(_mm256_loadu_ps(v + 8)));
      raw[i * ld + j] += _mm512_reduce_add_pd(sum);
      _mm512_storeu_ps(v, _mm512_setzero_ps());
    }
}
#endif

// One work item: pixels [lo, hi) of sample s into its own products r (M x M, upper triangle) of the
// maps shifted at each pixel by member 0's value: row and column 0 stay 0, and rows 1..M-1 hold
// (x_i - x_0)(x_j - x_0). centre_products turns the sample's sums into the products centred on the
// members' mean (a per-pixel shift common to all members changes no variance). Against centring on
// the mean this skips a pass over the block and a thirteenth of the products at M = 14 (half at
// M = 3). The shifted values are differences, so the total variance stays accurate (float32
// rounding grows by at most a factor M + 1: sum_i (x_i - x_0)^2 <= (M + 1) sum_i (x_i - mean)^2);
// the variance of a subset of near-equal members read from the Gram loses accuracy when member 0
// lies far from them (as it did, less so, when the mean did), and gains it when member 0 is among
// them. Products are of differences up to twice the centred values: float32 maps beyond about 1e19
// overflow them (an error, see finish_attribution_stats).
// inv: 1 / norm of each member's map for this sample. No finiteness check per value (a loop-carried
// sum that capped the pass at one vector per add latency): a NaN or an infinity in the maps makes
// some shifted value non-finite and so its own product, which attribution_stats_cpu looks for.
// kIsa: 0 portable, 1 AVX2 + FMA, 2 AVX-512 (the products' tiles; the conversion loop is vectorised
// by the compiler for the same target; the SIMD diagonal tiles convert full blocks themselves).
template <typename scalar_t, typename acc_t, int kIsa>
DIVFAST_INLINE void item_impl(const scalar_t* x, int64_t m, int64_t b, int64_t d, int64_t s, int64_t lo,
                              int64_t hi, bool take_abs, const acc_t* inv, acc_t* buf, double* r) {
  acc_t* base = buf + m * kBlock;  // member 0's scaled values
  [[maybe_unused]] int64_t flushed = 0;  // blocks in the tiles' float lanes (vacc)
  constexpr bool kTiles = kIsa > 0 && std::is_same_v<acc_t, float>;  // the SIMD tiles run
  const int64_t tiles = m < 2 ? 0 : tiles_per_block(m - 1, kIsa == 2 ? kGroupAvx512 : kGroupAvx2);
  const int64_t spread = kTiles ? std::min(m, tiles * kPrefetchRowsPerTile) : 0;  // rows the tiles ask for
  [[maybe_unused]] const bool scaled = std::any_of(inv, inv + m, [](acc_t v) { return v != acc_t(1); });
  for (int64_t p0 = lo; p0 < hi; p0 += kBlock) {
    const int64_t n = std::min(kBlock, hi - p0);
    constexpr int64_t kLanes = kIsa == 2 ? 16 : 8;
    const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;  // whole vectors for the tiles
    // Prefetch window: the block kPrefetchBlocks ahead (at an item's first block, all up to it).
    const int64_t far = kPrefetchBlocks * kBlock;
    const int64_t from = p0 == lo ? n : far, to = std::min(far + kBlock, hi - p0);
    // A full block under the SIMD tiles: the diagonal tiles convert the rows themselves.
    const bool converting = kTiles && m >= 2 && n == kBlock;
    for (int64_t i = 0; i < m && !converting; ++i) {
      const scalar_t* src = x + (i * b + s) * d + p0;
      acc_t* dst = i == 0 ? base : buf + (i - 1) * kBlock;
      const acc_t scale = inv[i];
      if (i == 0) {
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) {
          const acc_t v = static_cast<acc_t>(src[k]);
          dst[k] = (take_abs ? std::abs(v) : v) * scale;
        }
      } else {
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) {
          const acc_t v = static_cast<acc_t>(src[k]);
          dst[k] = (take_abs ? std::abs(v) : v) * scale - base[k];
        }
        for (int64_t k = n; k < padded; ++k) dst[k] = 0;
      }
    }
    // M rows far apart in memory outrun the hardware prefetcher: ask for a later block, far enough
    // ahead that it arrives while the products run. The SIMD tiles ask for the first `spread` rows'
    // windows themselves; here: the rest, and at an item's first block everything up to it.
    for (int64_t i = p0 == lo ? 0 : spread; i < m; ++i)
      for (int64_t k = from; k < to; k += 64 / static_cast<int64_t>(sizeof(scalar_t)))
        __builtin_prefetch(x + (i * b + s) * d + p0 + k, 0, 2);
    if (m < 2) continue;
#if defined(__x86_64__)
    if constexpr (kTiles) {
      float* vacc = buf + (m + 1) * kBlock;
      const bool flush = ++flushed == kFlushBlocks || p0 + kBlock >= hi;
      BlockPrefetch prefetch;  // the block kPrefetchBlocks ahead: this item's, or the next chunk's
      if (p0 + far < d) {
        const int64_t row_bytes = b * d * static_cast<int64_t>(sizeof(scalar_t));
        const int64_t step = static_cast<int64_t>(sizeof(scalar_t)) * kLanes;
        prefetch = {reinterpret_cast<const char*>(x + s * d + p0 + far), spread, row_bytes, step};
      }
      const BlockSource<scalar_t> source{x + s * d + p0, b * d, inv, take_abs, scaled};
      if constexpr (kIsa == 2) {
        gram_block_f32_avx512<scalar_t>(buf, m - 1, padded / 16, vacc, prefetch,
                                        converting ? &source : nullptr);
        if (flush) flush_f32_avx512(vacc, m - 1, r + m + 1, m);
      } else {
        gram_block_f32_avx2<scalar_t>(buf, m - 1, padded / 8, vacc, prefetch,
                                      converting ? &source : nullptr);
        if (flush) flush_f32_avx2(vacc, m - 1, r + m + 1, m);
      }
      if (flush) flushed = 0;
      continue;
    }
#endif
    add_block_products(buf, m - 1, n, r + m + 1, m);
  }
}

#define DIVFAST_ITEM_ARGS(scalar_t, acc_t)                                                        \
  const scalar_t *x, int64_t m, int64_t b, int64_t d, int64_t s, int64_t lo, int64_t hi,        \
      bool take_abs, const acc_t *inv, acc_t *buf, double *r
#define DIVFAST_ITEM_CALL x, m, b, d, s, lo, hi, take_abs, inv, buf, r

#if defined(__x86_64__)
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma,f16c"))) void item_avx2(DIVFAST_ITEM_ARGS(scalar_t, acc_t)) {
  item_impl<scalar_t, acc_t, 1>(DIVFAST_ITEM_CALL);
}

template <typename scalar_t, typename acc_t>
__attribute__((target("avx512f,avx2,fma"))) void item_avx512(DIVFAST_ITEM_ARGS(scalar_t, acc_t)) {
  item_impl<scalar_t, acc_t, 2>(DIVFAST_ITEM_CALL);
}
#endif

template <typename scalar_t, typename acc_t>
void item(DIVFAST_ITEM_ARGS(scalar_t, acc_t)) {
#if defined(__x86_64__)
  // AVX-512 from M = 5 (4 shifted rows); below, one AVX2 tile does the same work (M = 3 and 4 ran
  // the same either way: 53-54 and 64-66 us per sample in L3).
  if (m >= 5 && cpu_has_avx512f()) return item_avx512<scalar_t, acc_t>(DIVFAST_ITEM_CALL);
  if (cpu_has_avx2_fma()) return item_avx2<scalar_t, acc_t>(DIVFAST_ITEM_CALL);
#endif
  item_impl<scalar_t, acc_t, 0>(DIVFAST_ITEM_CALL);
}

// H (M x M, symmetric): sums over pixels of products of the maps shifted by a per-pixel value common
// to all members (here member 0's). In place, the products centred on the members' mean instead:
// with P = I - 11'/M, P H P, i.e. H_ij - mean_i - mean_j + mean, in float64.
void centre_products(double* h, int64_t m) {
  std::vector<double> row(m, 0.0);
  double all = 0.0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < m; ++j) row[i] += h[i * m + j];
    row[i] /= static_cast<double>(m);
    all += row[i];
  }
  all /= static_cast<double>(m);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) h[i * m + j] = h[i * m + j] - row[i] - row[j] + all;
  for (int64_t i = 0; i < m; ++i)  // sums of squares: rounding must not leave them below zero
    h[i * m + i] = std::max(h[i * m + i], 0.0);
}

template <typename scalar_t, typename acc_t>
void attribution_stats_kernel(const scalar_t* x, int64_t m, int64_t b, int64_t d, bool take_abs,
                              const double* inv_norms, double* centred) {
  // Short maps are cut into up to kSplit chunks of at least kMinChunk pixels, so that one sample
  // (features.py passes a layer's features as one sample of n "members") still gives the threads
  // work. The split depends on d alone, never on B or the thread count, so a sample's sums are the
  // same whichever batch it comes in and however many threads run.
  const int64_t split = ((d + kSplit - 1) / kSplit + kBlock - 1) / kBlock * kBlock;  // whole blocks
  const int64_t chunk = std::clamp(split, kMinChunk, kChunk);
  const int64_t chunks = std::max<int64_t>(1, (d + chunk - 1) / chunk);
  const int64_t items = b * chunks;
  std::vector<acc_t> inv(b * m);
  for (int64_t k = 0; k < b * m; ++k) inv[k] = static_cast<acc_t>(inv_norms[k]);
  // Per item: M*M products, reduced per sample afterwards in chunk order.
  std::vector<double> part(items * m * m, 0.0);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    // M - 1 shifted rows and member 0's values, then the float tiles' lanes (zero between items)
    std::vector<acc_t> buf((m + 1) * kBlock + (std::is_same_v<acc_t, float> ? m * m * 16 : 0));
    for (int64_t it = begin; it < end; ++it) {
      const int64_t s = it / chunks, c = it % chunks;
      const int64_t lo = c * chunk, hi = std::min(d, lo + chunk);
      item<scalar_t, acc_t>(x, m, b, d, s, lo, hi, take_abs, inv.data() + s * m, buf.data(),
                            part.data() + it * m * m);
    }
  });
  for (int64_t s = 0; s < b; ++s) {
    double* out = centred + s * m * m;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t it = s * chunks + c;
      for (int64_t k = 0; k < m * m; ++k) out[k] += part[it * m * m + k];
    }
    for (int64_t i = 0; i < m; ++i)  // mirror the upper triangle
      for (int64_t j = 0; j < i; ++j) out[i * m + j] = out[j * m + i];
    centre_products(out, m);
  }
}

std::tuple<at::Tensor, at::Tensor> attribution_stats_cpu(const at::Tensor& attributions, bool abs,
                                                         c10::string_view normalize, int64_t ddof) {
  const int code = check_attribution_stats_args(attributions, normalize, ddof);
  const int64_t m = attributions.size(0), b = attributions.size(1);
  const int64_t d = b == 0 ? 0 : attributions.numel() / (m * b);
  const at::Tensor x = attributions.contiguous();
  at::Tensor centred = at::zeros({b, m, m}, x.options().dtype(at::kDouble));
  bool finite = true;
  if (b > 0 && d > 0) {
    const at::Tensor inv = inverse_map_norms(x.view({m, b, d}), code);  // (B, M) float64
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attribution_stats_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      // A map whose norm is below float's smallest normal has a 1 / norm that float cannot hold
      // (its normalised values can): such calls accumulate in double instead.
      const bool wide = !std::is_same_v<acc_t, double> &&
                        inv.max().item<double>() > static_cast<double>(std::numeric_limits<float>::max());
      if (wide)
        attribution_stats_kernel<scalar_t, double>(x.const_data_ptr<scalar_t>(), m, b, d, abs,
                                                   inv.const_data_ptr<double>(), centred.data_ptr<double>());
      else
        attribution_stats_kernel<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), m, b, d, abs,
                                                  inv.const_data_ptr<double>(), centred.data_ptr<double>());
    });
    // A NaN or an infinity in the maps leaves a non-finite product (a lone member has none: look).
    // Only then is the input read again, to tell bad maps from products that overflow float32.
    finite = all_finite_cpu(centred);
    if (m == 1 || !finite)
      TORCH_CHECK_VALUE(x.isfinite().all().item<bool>(),
                        "attribution_stats: `attributions` contain NaN or infinity");
  }
  return finish_attribution_stats(centred, ddof, finite);
}

}  // namespace

TORCH_LIBRARY_IMPL(divfast, CPU, m) { m.impl("attribution_stats", &attribution_stats_cpu); }

}  // namespace divfast
