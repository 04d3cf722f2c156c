// CUDA kernel of divfast::pair_counts: one pass over the logits, 64-sample tiles per block.
//
// Per tile, warps compute row argmaxes (coalesced loads, warp-shuffle reduction with torch.argmax's
// first-max rule) into shared memory, ballots turn label == target into correctness words, and one
// thread per member pair adds popcount(word_i & word_k) and the label agreement with a global atomic.
// Lean includes (no torch/extension.h) keep nvcc's compile time down.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "checks.h"
#include "kernels/pair_counts.h"

namespace divfast {
namespace {

using kernels::kTile;
constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

struct SharedLayout {
  // Offsets in bytes into the dynamic shared memory of one block.
  size_t labels, target, words, n_correct, hist, total;
  __host__ __device__ explicit SharedLayout(int64_t m) {
    labels = 0;                                   // int64 (M, kTile)
    target = labels + sizeof(int64_t) * m * kTile;  // int64 (kTile)
    words = target + sizeof(int64_t) * kTile;     // uint32 (M, 2): correctness ballots
    n_correct = words + sizeof(unsigned) * m * 2;  // int32 (kTile)
    hist = n_correct + sizeof(int) * kTile;        // uint64 (M + 1), 8-byte aligned below
    hist = (hist + 7) & ~size_t(7);
    total = hist + sizeof(unsigned long long) * (m + 1);
  }
};

template <typename scalar_t>
__device__ int64_t warp_argmax(const scalar_t* __restrict__ x, int64_t c, int lane, bool* nan) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t best = -INFINITY;
  int64_t idx = INT64_MAX;  // "no finite candidate yet": an all -inf row resolves to index 0
  for (int64_t j = lane; j < c; j += 32) {
    const acc_t v = static_cast<acc_t>(x[j]);
    if (v != v) *nan = true;
    if (v > best) {
      best = v;
      idx = j;
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const acc_t ov = __shfl_down_sync(kFullMask, best, offset);
    const int64_t oi = __shfl_down_sync(kFullMask, idx, offset);
    if (ov > best || (ov == best && oi < idx)) {
      best = ov;
      idx = oi;
    }
  }
  idx = __shfl_sync(kFullMask, idx, 0);
  return idx == INT64_MAX ? 0 : idx;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) pair_counts_kernel(
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ labels,
    const int64_t* __restrict__ target, int64_t m, int64_t b, int64_t c, int64_t num_classes,
    bool* __restrict__ correct, unsigned long long* __restrict__ n11,
    unsigned long long* __restrict__ agree, unsigned long long* __restrict__ hist,
    int* __restrict__ flags) {
  extern __shared__ __align__(16) unsigned char smem[];
  const SharedLayout layout(m);
  int64_t* lab = reinterpret_cast<int64_t*>(smem + layout.labels);
  int64_t* tgt = reinterpret_cast<int64_t*>(smem + layout.target);
  unsigned* words = reinterpret_cast<unsigned*>(smem + layout.words);
  int* n_correct = reinterpret_cast<int*>(smem + layout.n_correct);
  unsigned long long* hist_s = reinterpret_cast<unsigned long long*>(smem + layout.hist);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n_warps = blockDim.x >> 5;
  int local_flags = 0;
  for (int64_t i = tid; i <= m; i += blockDim.x) hist_s[i] = 0;

  const int64_t n_tiles = (b + kTile - 1) / kTile;
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const int64_t b0 = tile * kTile;
    const int t = b - b0 < kTile ? static_cast<int>(b - b0) : kTile;
    for (int j = tid; j < kTile; j += blockDim.x) {
      int64_t y = -1;
      if (j < t) {
        y = target[b0 + j];
        if (y < 0 || (num_classes > 0 && y >= num_classes)) local_flags |= kernels::kErrTarget;
      }
      tgt[j] = y;
      n_correct[j] = 0;
    }
    if (logits != nullptr) {
      bool nan = false;
      for (int64_t row = warp; row < m * t; row += n_warps) {
        const int64_t i = row / t, j = row % t;
        const int64_t label = warp_argmax(logits + (i * b + b0 + j) * c, c, lane, &nan);
        if (lane == 0) lab[i * kTile + j] = label;
      }
      if (nan) local_flags |= kernels::kErrNaN;
    } else {
      for (int64_t e = tid; e < m * kTile; e += blockDim.x) {
        const int64_t i = e / kTile, j = e % kTile;
        int64_t v = -2;  // padding never equals a target (-1) nor another member's padding check
        if (j < t) {
          v = labels[i * b + b0 + j];
          if (v < 0 || (num_classes > 0 && v >= num_classes)) local_flags |= kernels::kErrLabel;
        }
        lab[e] = v;
      }
    }
    __syncthreads();
    for (int64_t w = warp; w < m * 2; w += n_warps) {
      const int64_t i = w >> 1;
      const int j = static_cast<int>(w & 1) * 32 + lane;
      const bool ok = j < t && lab[i * kTile + j] == tgt[j];
      const unsigned ballot = __ballot_sync(kFullMask, ok);
      if (lane == 0) words[w] = ballot;
      if (j < t) correct[i * b + b0 + j] = ok;
      if (ok) atomicAdd(&n_correct[j], 1);
    }
    __syncthreads();
    for (int j = tid; j < t; j += blockDim.x) atomicAdd(&hist_s[n_correct[j]], 1ull);
    for (int64_t p = tid; p < m * m; p += blockDim.x) {
      const int64_t i = p / m, k = p % m;
      if (i > k) continue;
      const unsigned both = __popc(words[2 * i] & words[2 * k]) +
                            __popc(words[2 * i + 1] & words[2 * k + 1]);
      unsigned same = 0;
      if (i == k) {
        same = t;
      } else {
        for (int j = 0; j < t; ++j) same += lab[i * kTile + j] == lab[k * kTile + j];
      }
      if (both) atomicAdd(&n11[i * m + k], static_cast<unsigned long long>(both));
      if (same) atomicAdd(&agree[i * m + k], static_cast<unsigned long long>(same));
    }
    __syncthreads();
  }
  for (int64_t i = tid; i <= m; i += blockDim.x) {
    if (hist_s[i]) atomicAdd(&hist[i], hist_s[i]);
  }
  if (local_flags) atomicOr(flags, local_flags);
}

__global__ void finalize_kernel(const int64_t* __restrict__ n11, const int64_t* __restrict__ agree,
                                int64_t m, int64_t n, int64_t* __restrict__ counts,
                                int64_t* __restrict__ agreement) {
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (p >= m * m) return;
  kernels::finalize_pair(n11, agree, m, p / m, p % m, n, counts, agreement);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_counts_cuda(
    const at::Tensor& predictions, const at::Tensor& target, int64_t num_classes) {
  const bool is_logits = check_pair_counts_args(predictions, target, num_classes);
  TORCH_INTERNAL_ASSERT(predictions.device().is_cuda());
  const c10::cuda::CUDAGuard guard(predictions.device());
  const int64_t m = predictions.size(0);
  const int64_t b = predictions.size(1);
  const int64_t c = is_logits ? predictions.size(2) : 0;
  const int64_t checked_classes = is_logits ? c : num_classes;
  const at::Tensor preds = predictions.contiguous();
  const at::Tensor tgt = target.contiguous();
  const auto long_opts = tgt.options().dtype(at::kLong);

  at::Tensor n11 = at::zeros({m, m}, long_opts);
  at::Tensor agree = at::zeros({m, m}, long_opts);
  at::Tensor histogram = at::zeros({m + 1}, long_opts);
  at::Tensor flags = at::zeros({1}, tgt.options().dtype(at::kInt));
  at::Tensor correct = at::empty({m, b}, tgt.options().dtype(at::kBool));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  if (b > 0) {
    const SharedLayout layout(m);
    const auto* props = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK(layout.total <= static_cast<size_t>(props->sharedMemPerBlockOptin),
                "pair_counts: M = ", m, " members need ", layout.total,
                " bytes of shared memory per block on CUDA; this GPU allows ",
                props->sharedMemPerBlockOptin, " (use fewer members per call)");
    const int64_t n_tiles = (b + kTile - 1) / kTile;
    const int grid = static_cast<int>(std::min<int64_t>(n_tiles, props->multiProcessorCount * 8));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16,
                                    is_logits ? preds.scalar_type() : at::kFloat,
                                    "pair_counts_cuda", [&] {
      auto kernel = pair_counts_kernel<scalar_t>;
      if (layout.total > 48 * 1024) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(layout.total)));
      }
      kernel<<<grid, kThreads, layout.total, stream>>>(
          is_logits ? preds.data_ptr<scalar_t>() : nullptr,
          is_logits ? nullptr : preds.data_ptr<int64_t>(), tgt.data_ptr<int64_t>(), m, b, c,
          checked_classes, correct.data_ptr<bool>(),
          reinterpret_cast<unsigned long long*>(n11.data_ptr<int64_t>()),
          reinterpret_cast<unsigned long long*>(agree.data_ptr<int64_t>()),
          reinterpret_cast<unsigned long long*>(histogram.data_ptr<int64_t>()),
          flags.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor counts = at::empty({m, m, 2, 2}, long_opts);
  at::Tensor agreement = at::empty({m, m}, long_opts);
  const int threads = 256;
  const int blocks = static_cast<int>((m * m + threads - 1) / threads);
  finalize_kernel<<<blocks, threads, 0, stream>>>(n11.data_ptr<int64_t>(), agree.data_ptr<int64_t>(),
                                                  m, b, counts.data_ptr<int64_t>(),
                                                  agreement.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Input errors (NaN logits, labels out of range) are found on the device; reading the flag is the
  // one host sync of this op.
  raise_pair_counts_errors(flags.item<int>(), checked_classes);
  return {counts, agreement, histogram, correct};
}

}  // namespace

TORCH_LIBRARY_IMPL(divfast, CUDA, m) { m.impl("pair_counts", &pair_counts_cuda); }

}  // namespace divfast
