// CUDA kernel of divfast::attribution_stats: one read of the maps (plus one for the norms of a
// normalisation, taken with torch's reductions).
//
// A block owns (sample, chunk of pixels). Each thread walks the chunk with a stride of the block size,
// scales each member's value by 1 / its map's norm, centres the pixel's M values on their mean, and
// keeps the products of every member pair in registers (the member count is bounded at compile time:
// 4, 8 or 16; 8 for float64); then the block reduces each product (warp shuffles, then the warps'
// results) and one thread adds it to the sample's float64 sums with an atomic (so the last bits can
// differ run to run). More members fall back to torch ops (centring, a batched GEMM): correct, but
// more reads.
// Lean includes (no torch/extension.h) keep nvcc's compile time down.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/add.h>
#include <ATen/ops/any.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <type_traits>

#include "checks.h"

namespace divfast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 16384;  // pixels per block
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ inline T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(kFullMask, v, off);
  return v;
}

template <typename scalar_t, int kMaxM>
__global__ void __launch_bounds__(kThreads) attribution_stats_kernel(const scalar_t* __restrict__ x, int m, int64_t b, int64_t d,
                                         bool take_abs, const double* __restrict__ inv_norms,
                                         double* __restrict__ centred, int* __restrict__ flags) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kPairs = kMaxM * (kMaxM + 1) / 2;
  __shared__ acc_t shared[kWarps];
  const int64_t s = blockIdx.y;
  const int64_t lo = blockIdx.x * kChunk;
  const int64_t hi = min(d, lo + kChunk);
  acc_t prod[kPairs];
  acc_t scale[kMaxM];
#pragma unroll
  for (int p = 0; p < kPairs; ++p) prod[p] = 0;
#pragma unroll
  for (int i = 0; i < kMaxM; ++i) scale[i] = i < m ? static_cast<acc_t>(inv_norms[s * m + i]) : acc_t(0);
  const acc_t inv_m = acc_t(1) / static_cast<acc_t>(m);
  bool bad = false;
  for (int64_t px = lo + threadIdx.x; px < hi; px += kThreads) {
    acc_t v[kMaxM];
    acc_t mean = 0;
#pragma unroll
    for (int i = 0; i < kMaxM; ++i) {
      v[i] = 0;
      if (i < m) {
        const acc_t a = static_cast<acc_t>(x[(i * b + s) * d + px]);  // coalesced along pixels
        bad |= !isfinite(a);
        v[i] = (take_abs ? (a < 0 ? -a : a) : a) * scale[i];
        mean += v[i];
      }
    }
    mean *= inv_m;
#pragma unroll
    for (int i = 0; i < kMaxM; ++i) v[i] = i < m ? v[i] - mean : acc_t(0);
    int p = 0;
#pragma unroll
    for (int i = 0; i < kMaxM; ++i) {
#pragma unroll
      for (int j = i; j < kMaxM; ++j) prod[p++] += v[i] * v[j];
    }
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) atomicOr(flags, 1);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int p = 0;
#pragma unroll 1
  for (int i = 0; i < kMaxM; ++i) {
#pragma unroll 1
    for (int j = i; j < kMaxM; ++j, ++p) {
      if (i < m && j < m) {  // uniform across the block: every thread reaches the barriers
        acc_t value = warp_sum(prod[p]);
        if (lane == 0) shared[warp] = value;
        __syncthreads();
        if (warp == 0) {
          value = warp_sum(lane < kWarps ? shared[lane] : acc_t(0));
          if (lane == 0) atomicAdd(centred + (s * m + i) * m + j, static_cast<double>(value));
        }
        __syncthreads();
      }
    }
  }
}

template <typename scalar_t, int kMaxM>
void launch(const at::Tensor& x, int64_t m, int64_t b, int64_t d, bool take_abs, const at::Tensor& inv,
            at::Tensor& centred, at::Tensor& flags) {
  const dim3 grid(static_cast<unsigned>((d + kChunk - 1) / kChunk), static_cast<unsigned>(b));
  attribution_stats_kernel<scalar_t, kMaxM><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), static_cast<int>(m), b, d, take_abs, inv.const_data_ptr<double>(),
      centred.data_ptr<double>(), flags.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> attribution_stats_cuda(const at::Tensor& attributions, bool abs,
                                                          c10::string_view normalize, int64_t ddof) {
  const int code = check_attribution_stats_args(attributions, normalize, ddof);
  const c10::cuda::CUDAGuard guard(attributions.device());
  const int64_t m = attributions.size(0), b = attributions.size(1);
  const int64_t d = b == 0 ? 0 : attributions.numel() / (m * b);
  const at::Tensor x = attributions.contiguous();
  at::Tensor centred = at::zeros({b, m, m}, x.options().dtype(at::kDouble));
  if (b > 0 && d > 0) {
    const at::Tensor inv = inverse_map_norms(x.view({m, b, d}), code);  // (B, M) float64
    at::Tensor flags = at::zeros({1}, x.options().dtype(at::kInt));
    // Register accumulators hold M (M + 1) / 2 products per thread: without spills up to M = 16 in
    // float and M = 8 in double (ptxas); more members go through torch ops (correct, more reads).
    const int64_t register_limit = x.scalar_type() == at::kDouble ? 8 : 16;
    if (m > register_limit) {
      at::Tensor maps = x.view({m, b, d}).to(at::kDouble);
      at::Tensor bad = at::logical_not(at::isfinite(maps)).any().to(at::kInt);
      flags.copy_(bad.view({1}));
      at::Tensor used = at::mul(abs ? at::abs(maps) : maps, inv.t().unsqueeze(2));  // (M, B, D)
      used = at::sub(used, at::mean(used, {0}, true));
      at::Tensor per_sample = used.transpose(0, 1);  // (B, M, D)
      centred = at::bmm(per_sample, per_sample.transpose(1, 2));
    } else {
      TORCH_CHECK_VALUE(b <= 65535, "attribution_stats: at most 65535 samples per call on CUDA, got B = ", b);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attribution_stats_cuda", [&] {
        if (m <= 4) launch<scalar_t, 4>(x, m, b, d, abs, inv, centred, flags);
        else if (m <= 8) launch<scalar_t, 8>(x, m, b, d, abs, inv, centred, flags);
        else if constexpr (!std::is_same_v<scalar_t, double>) launch<scalar_t, 16>(x, m, b, d, abs, inv, centred, flags);
      });
      // Products were summed over the upper triangle: mirror it.
      centred = at::add(centred.triu(), centred.triu(1).transpose(1, 2));
    }
    // The op's one host synchronisation: NaN maps must fail loudly, not return NaN statistics.
    TORCH_CHECK_VALUE(flags.item<int>() == 0, "attribution_stats: `attributions` contain NaN or infinity");
  }
  return finish_attribution_stats(centred, ddof);
}

}  // namespace

TORCH_LIBRARY_IMPL(divfast, CUDA, m) { m.impl("attribution_stats", &attribution_stats_cuda); }

}  // namespace divfast
