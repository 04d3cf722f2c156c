// CUDA kernel of divfast::hsic: the unbiased HSIC of every pair of G Gram matrices of one batch, the
// U-centring folded into the inner products (see cpu/hsic.cpp for the expansion).
//
// One launch, two kinds of blocks. A "pair" block owns a 16 x 16 tile of Gram pairs (a, b) with a's tile
// <= b's: it streams the off-diagonal entries q = (i, j), i != j, of its 32 Grams in chunks of 32,
// staging s = K_ij + K_ji (float64) in shared memory, and each thread accumulates one pair's products
// in a fixed order; no atomics, so results repeat bit for bit. A "row" block owns one Gram: its
// off-diagonal row sums (of K + K') and a finiteness flag over every entry. The small finishing algebra
// (the row-sum products are a (G, n) x (n, G) GEMM) runs as torch ops. Nothing centred is written.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/add.h>
#include <ATen/ops/any.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "checks.h"

namespace divfast {
namespace {

constexpr int kTile = 16;   // Grams per tile side: 16 x 16 threads, one pair each
constexpr int kSpan = 32;   // off-diagonal entries staged per step

template <typename scalar_t>
__device__ inline double sym_entry(const scalar_t* __restrict__ k, int64_t n, int64_t q) {
  const int64_t i = q / n, j = q % n;
  return i == j ? 0.0 : static_cast<double>(k[q]) + static_cast<double>(k[j * n + i]);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kTile * kTile) hsic_kernel(const scalar_t* __restrict__ grams, int64_t g,
                                                             int64_t n, int64_t blocks, int64_t pair_blocks,
                                                             double* __restrict__ trace,
                                                             double* __restrict__ rows,
                                                             int* __restrict__ flags) {
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTile + tx;
  const int64_t nn = n * n;
  if (static_cast<int64_t>(blockIdx.x) >= pair_blocks) {  // a row block: one Gram's row sums
    const int64_t a = blockIdx.x - pair_blocks;
    const scalar_t* k = grams + a * nn;
    int bad = 0;
    for (int64_t i = tid; i < n; i += kTile * kTile) {
      double sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        const double kij = static_cast<double>(k[i * n + j]), kji = static_cast<double>(k[j * n + i]);
        bad |= !isfinite(kij);
        if (j != i) sum += kij + kji;
      }
      rows[a * n + i] = sum;
    }
    if (bad) atomicOr(flags, 1);
    return;
  }
  // Pair block t -> (tile row bi, tile column bj >= bi) over the upper triangle of tiles.
  int64_t t = blockIdx.x, bi = 0;
  while (t >= blocks - bi) t -= blocks - bi, ++bi;
  const int64_t bj = bi + t;
  __shared__ double xa[kTile][kSpan + 1];
  __shared__ double xb[kTile][kSpan + 1];
  const int64_t a = bi * kTile + ty, b = bj * kTile + tx;
  double acc = 0;
  for (int64_t q0 = 0; q0 < nn; q0 += kSpan) {
    for (int e = tid; e < 2 * kTile * kSpan; e += kTile * kTile) {  // stage both tiles' chunks
      const int side = e / (kTile * kSpan), r = (e / kSpan) % kTile, c = e % kSpan;
      const int64_t gram = (side ? bj : bi) * kTile + r, q = q0 + c;
      const double v = gram < g && q < nn ? sym_entry(grams + gram * nn, n, q) : 0.0;
      (side ? xb : xa)[r][c] = v;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kSpan; ++c) acc = fma(xa[ty][c], xb[tx][c], acc);
    __syncthreads();
  }
  if (a < g && b < g) {
    trace[a * g + b] = acc;
    if (bi != bj) trace[b * g + a] = acc;
  }
}

at::Tensor hsic_cuda(const at::Tensor& grams) {
  check_hsic_args(grams);
  const c10::cuda::CUDAGuard guard(grams.device());
  const int64_t g = grams.size(0), n = grams.size(1);
  const auto f64 = grams.options().dtype(at::kDouble);
  const at::Tensor x = grams.contiguous();
  at::Tensor trace = at::zeros({g, g}, f64), rows = at::zeros({g, n}, f64);
  at::Tensor flags = at::zeros({1}, grams.options().dtype(at::kInt));
  if (g > 0) {
    const int64_t blocks = (g + kTile - 1) / kTile, pair_blocks = blocks * (blocks + 1) / 2;
    TORCH_CHECK_VALUE(pair_blocks + g <= 2147483647LL, "hsic: too many Gram matrices for one launch, G = ", g);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hsic_cuda", [&] {
      hsic_kernel<scalar_t><<<static_cast<unsigned>(pair_blocks + g), dim3(kTile, kTile), 0,
                              at::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), g, n, blocks, pair_blocks, trace.data_ptr<double>(),
          rows.data_ptr<double>(), flags.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // trace = sum_{i != j} (2 S_a)(2 S_b) = 4 tr(S~a S~b); rows = 2 S~1.
  at::Tensor hsic = finish_hsic(at::mul(trace, 0.25), at::mul(at::mm(rows, rows.t()), 0.25),
                                at::mul(at::sum(rows, {1}), 0.5), n);
  // The op's one host synchronisation: NaN Grams or overflow must fail loudly, not return NaN.
  const int status = at::add(flags, at::mul(at::logical_not(at::isfinite(hsic)).any(), 2)).item<int>();
  TORCH_CHECK_VALUE(!(status & 1), "hsic: `grams` contain NaN or infinity");
  TORCH_CHECK_VALUE(status == 0, "hsic: the products of `grams` overflow float64 (entries near 1e154); "
                    "scale the features down");
  return hsic;
}

}  // namespace

TORCH_LIBRARY_IMPL(divfast, CUDA, m) { m.impl("hsic", &hsic_cuda); }

}  // namespace divfast
