// CUDA kernel of divfast::attribution_stats: one read of the maps.
//
// A block owns (sample, chunk of pixels). Each thread walks the chunk with a stride of the block size,
// keeps the products of every member pair, the per-map sums of |a| and maxima in registers (the member
// count is bounded at compile time: 4, 8, 16 or 32), then warps reduce with shuffles and one thread per
// statistic adds the block's share to the sample's float64 sums with an atomic. Maps of more than 32
// members fall back to a batched GEMM (cuBLAS) plus two reductions: correct, but three reads.
// Lean includes (no torch/extension.h) keep nvcc's compile time down.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/add.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

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

template <typename T>
__device__ inline T warp_max(T v) {
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_down_sync(kFullMask, v, off));
  return v;
}

// Non-negative doubles order like their bit patterns as unsigned integers.
__device__ inline void atomic_max_nonneg(double* addr, double v) {
  atomicMax(reinterpret_cast<unsigned long long*>(addr), static_cast<unsigned long long>(__double_as_longlong(v)));
}

template <typename scalar_t, int kMaxM>
__global__ void attribution_stats_kernel(const scalar_t* __restrict__ x, int m, int64_t b, int64_t d,
                                         bool take_abs, double* __restrict__ raw,
                                         double* __restrict__ l1, double* __restrict__ amax,
                                         int* __restrict__ flags) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kPairs = kMaxM * (kMaxM + 1) / 2;
  __shared__ acc_t shared[kWarps];
  const int64_t s = blockIdx.y;
  const int64_t lo = blockIdx.x * kChunk;
  const int64_t hi = min(d, lo + kChunk);
  acc_t prod[kPairs];
  acc_t sum_abs[kMaxM], mx[kMaxM];
#pragma unroll
  for (int p = 0; p < kPairs; ++p) prod[p] = 0;
#pragma unroll
  for (int i = 0; i < kMaxM; ++i) sum_abs[i] = 0, mx[i] = 0;
  bool bad = false;
  for (int64_t px = lo + threadIdx.x; px < hi; px += kThreads) {
    acc_t v[kMaxM];
#pragma unroll
    for (int i = 0; i < kMaxM; ++i) {
      if (i < m) {
        const acc_t a = static_cast<acc_t>(x[(i * b + s) * d + px]);  // coalesced along pixels
        bad |= !isfinite(a);
        const acc_t absolute = a < 0 ? -a : a;
        sum_abs[i] += absolute;
        mx[i] = max(mx[i], absolute);
        v[i] = take_abs ? absolute : a;
      } else {
        v[i] = 0;
      }
    }
    int p = 0;
#pragma unroll
    for (int i = 0; i < kMaxM; ++i) {
#pragma unroll
      for (int j = i; j < kMaxM; ++j) prod[p++] += v[i] * v[j];
    }
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) atomicOr(flags, 1);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // One block-wide sum per statistic: warp shuffles, then the first warp over the warps' results.
  auto block_reduce = [&](acc_t value, bool is_max) -> acc_t {
    value = is_max ? warp_max(value) : warp_sum(value);
    if (lane == 0) shared[warp] = value;
    __syncthreads();
    acc_t total = 0;
    if (warp == 0) {
      total = lane < kWarps ? shared[lane] : acc_t(0);
      total = is_max ? warp_max(total) : warp_sum(total);
    }
    __syncthreads();
    return total;
  };
  int p = 0;
#pragma unroll 1
  for (int i = 0; i < kMaxM; ++i) {
#pragma unroll 1
    for (int j = i; j < kMaxM; ++j, ++p) {
      if (i < m && j < m) {
        const acc_t total = block_reduce(prod[p], false);
        if (threadIdx.x == 0) atomicAdd(raw + (s * m + i) * m + j, static_cast<double>(total));
      }
    }
  }
#pragma unroll 1
  for (int i = 0; i < kMaxM; ++i) {
    if (i < m) {
      const acc_t total = block_reduce(sum_abs[i], false);
      const acc_t biggest = block_reduce(mx[i], true);
      if (threadIdx.x == 0) {
        atomicAdd(l1 + s * m + i, static_cast<double>(total));
        atomic_max_nonneg(amax + s * m + i, static_cast<double>(biggest));
      }
    }
  }
}

template <typename scalar_t, int kMaxM>
void launch(const at::Tensor& x, int64_t m, int64_t b, int64_t d, bool take_abs, at::Tensor& raw,
            at::Tensor& l1, at::Tensor& amax, at::Tensor& flags) {
  const dim3 grid(static_cast<unsigned>((d + kChunk - 1) / kChunk), static_cast<unsigned>(b));
  attribution_stats_kernel<scalar_t, kMaxM><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), static_cast<int>(m), b, d, take_abs, raw.data_ptr<double>(),
      l1.data_ptr<double>(), amax.data_ptr<double>(), flags.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> attribution_stats_cuda(const at::Tensor& attributions, bool abs,
                                                          c10::string_view normalize, int64_t ddof) {
  const int code = check_attribution_stats_args(attributions, normalize, ddof);
  const c10::cuda::CUDAGuard guard(attributions.device());
  const int64_t m = attributions.size(0), b = attributions.size(1);
  const int64_t d = b == 0 ? 0 : attributions.numel() / (m * b);
  const at::Tensor x = attributions.contiguous();
  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor raw = at::zeros({b, m, m}, f64), l1 = at::zeros({b, m}, f64), amax = at::zeros({b, m}, f64);
  if (b > 0 && d > 0) {
    TORCH_CHECK_VALUE(b <= 65535, "attribution_stats: at most 65535 samples per call on CUDA, got B = ", b);
    if (m > 32) {  // too many members for register accumulators: GEMM and reductions
      at::Tensor maps = x.view({m, b, d}).transpose(0, 1).to(at::kDouble);  // (B, M, D)
      at::Tensor absolute = at::abs(maps);
      TORCH_CHECK_VALUE(absolute.isfinite().all().item<bool>(),
                        "attribution_stats: `attributions` contain NaN or infinity");
      at::Tensor used = abs ? absolute : maps;
      raw = at::bmm(used, used.transpose(1, 2));
      l1 = at::sum(absolute, {2});
      amax = at::amax(absolute, {2});
    } else {
      at::Tensor flags = at::zeros({1}, x.options().dtype(at::kInt));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attribution_stats_cuda", [&] {
        if (m <= 4) launch<scalar_t, 4>(x, m, b, d, abs, raw, l1, amax, flags);
        else if (m <= 8) launch<scalar_t, 8>(x, m, b, d, abs, raw, l1, amax, flags);
        else if (m <= 16) launch<scalar_t, 16>(x, m, b, d, abs, raw, l1, amax, flags);
        else launch<scalar_t, 32>(x, m, b, d, abs, raw, l1, amax, flags);
      });
      // The op's one host synchronisation: NaN maps must fail loudly, not return NaN statistics.
      TORCH_CHECK_VALUE(flags.item<int>() == 0, "attribution_stats: `attributions` contain NaN or infinity");
      // Products were summed over the upper triangle: mirror it.
      raw = at::add(raw.triu(), raw.triu(1).transpose(1, 2));
    }
  }
  return finish_attribution_stats(raw, l1, amax, code, ddof);
}

}  // namespace

TORCH_LIBRARY_IMPL(divfast, CUDA, m) { m.impl("attribution_stats", &attribution_stats_cuda); }

}  // namespace divfast
