// CUDA kernel of divfast::ensemble_sweep: one block per sample. The block first copies the sample's
// K x C logits into shared memory (float32, or float64 for float64 logits: exact either way) when
// they fit the device's opt-in limit (K = 14, C = 1000: 56 KB), so every subset then reads them from
// there; otherwise the subsets read them from global memory. The block's threads find every member's
// argmax (first maximum) and check its row is finite, keeping the argmaxes in shared memory; then
// each thread serves a stride of the subsets: it counts the subset's correct members and ranks the
// target among all C classes under the rule's key (kernels/ensemble_sweep.h), stopping once five
// classes rank above it. Counts are added with 64-bit integer atomics, so results repeat exactly.
// Every class is scanned per subset; the CPU kernel's pruning (float32 block bounds for the summed
// rules, top lists for vote and median) is not ported.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <type_traits>

#include "checks.h"
#include "kernels/ensemble_sweep.h"

namespace divfast {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxK = 32;      // subset size held in registers
constexpr int kMaxPool = 256;  // argmaxes kept in shared memory

// row_t: the type the subsets read (row_t = scalar_t from global memory when kShared is false).
template <typename scalar_t, typename row_t, bool kShared>
__global__ void __launch_bounds__(kThreads) sweep_kernel(const scalar_t* __restrict__ z,
                                                         const int64_t* __restrict__ target,
                                                         const int64_t* __restrict__ subsets,
                                                         int64_t pool, int64_t n_count, int64_t c_count,
                                                         int64_t s_count, int k, int rule,
                                                         unsigned long long* __restrict__ top1,
                                                         unsigned long long* __restrict__ top5,
                                                         unsigned long long* __restrict__ hist,
                                                         int* __restrict__ flags) {
  __shared__ int64_t argmax[kMaxPool];
  extern __shared__ __align__(16) unsigned char tile_bytes[];  // (K, C | 1) row_t when kShared
  row_t* tile = reinterpret_cast<row_t*>(tile_bytes);
  const int64_t n = blockIdx.x;
  const int64_t t = target[n];
  // Rows an odd number of elements apart: threads reading one class of different members' rows
  // hit different banks.
  const int64_t ld = c_count | 1;
  if constexpr (kShared) {  // coalesced along each row
    for (int64_t e = threadIdx.x; e < pool * c_count; e += blockDim.x) {
      const int64_t i = e / c_count, c = e - i * c_count;
      tile[i * ld + c] = static_cast<row_t>(z[(i * n_count + n) * c_count + c]);
    }
    __syncthreads();
  }
  auto row_of = [&](int64_t i) -> const row_t* {
    if constexpr (kShared) {
      return tile + i * ld;
    } else {
      return z + (i * n_count + n) * c_count;
    }
  };
  for (int64_t i = threadIdx.x; i < pool; i += blockDim.x) {
    const row_t* row = row_of(i);
    double best = static_cast<double>(row[0]);
    int64_t arg = 0;
    bool finite = isfinite(best);
    for (int64_t c = 1; c < c_count; ++c) {
      const double v = static_cast<double>(row[c]);
      finite = finite && isfinite(v);
      if (v > best) best = v, arg = c;
    }
    if (!finite) atomicOr(flags, 1);
    argmax[i] = arg;
  }
  __syncthreads();
  if (t < 0 || t >= c_count) {
    if (threadIdx.x == 0) atomicOr(flags, 2);
    return;
  }
  double values[kMaxK], scratch[kMaxK];
  const row_t* rows[kMaxK];
  for (int64_t s = threadIdx.x; s < s_count; s += blockDim.x) {
    const int64_t* m = subsets + s * k;
    int n_correct = 0;
    for (int j = 0; j < k; ++j) {
      rows[j] = row_of(m[j]);
      n_correct += argmax[m[j]] == t;
    }
    atomicAdd(hist + s * (k + 1) + n_correct, 1ULL);
    int votes = 0;
    for (int j = 0; j < k; ++j) {
      values[j] = static_cast<double>(rows[j][t]);
      votes += argmax[m[j]] == t;
    }
    const kernels::SweepKey kt = kernels::key_of(rule, values, k, votes, scratch);
    int above = 0;
    for (int64_t c = 0; c < c_count && above < kernels::kSweepRankCap; ++c) {
      if (c == t) continue;
      votes = 0;
      for (int j = 0; j < k; ++j) {
        values[j] = static_cast<double>(rows[j][c]);
        votes += argmax[m[j]] == c;
      }
      if (kernels::ranks_above(kernels::key_of(rule, values, k, votes, scratch), c, kt, t)) ++above;
    }
    if (above == 0) atomicAdd(top1 + s, 1ULL);
    if (above < kernels::kSweepRankCap) atomicAdd(top5 + s, 1ULL);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ensemble_sweep_cuda(const at::Tensor& logits,
                                                                   const at::Tensor& target,
                                                                   const at::Tensor& subsets,
                                                                   c10::string_view rule) {
  const int code = check_ensemble_sweep_args(logits, target, subsets, rule);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t pool = logits.size(0), n_count = logits.size(1), c_count = logits.size(2);
  const int64_t s_count = subsets.size(0), k = subsets.size(1);
  TORCH_CHECK_VALUE(k <= kMaxK, "ensemble_sweep: at most ", kMaxK, " members per subset on CUDA, got k = ", k);
  TORCH_CHECK_VALUE(pool <= kMaxPool, "ensemble_sweep: at most ", kMaxPool, " pool members on CUDA, got K = ",
                    pool);
  const at::Tensor host_subsets = subsets.contiguous().cpu();  // small: checked on the host
  check_sweep_subsets(host_subsets.const_data_ptr<int64_t>(), s_count, k, pool);
  const at::Tensor z = logits.contiguous(), y = target.contiguous(), sub = subsets.contiguous();
  const auto i64 = logits.options().dtype(at::kLong);
  at::Tensor top1 = at::zeros({s_count}, i64), top5 = at::zeros({s_count}, i64);
  at::Tensor hist = at::zeros({s_count, k + 1}, i64);
  at::Tensor flags = at::zeros({1}, logits.options().dtype(at::kInt));
  if (n_count > 0) {
    int optin = 0;  // the most shared memory a block may ask for on this device
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                          logits.get_device()));
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ensemble_sweep_cuda", [&] {
      using row_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const size_t tile = static_cast<size_t>(pool) * static_cast<size_t>(c_count | 1) * sizeof(row_t);
      const size_t fixed = kMaxPool * sizeof(int64_t);
      const auto args = [&](auto kernel, size_t bytes) {
        kernel<<<static_cast<unsigned>(n_count), kThreads, bytes, stream>>>(
            z.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), sub.const_data_ptr<int64_t>(), pool,
            n_count, c_count, s_count, static_cast<int>(k), code,
            reinterpret_cast<unsigned long long*>(top1.data_ptr<int64_t>()),
            reinterpret_cast<unsigned long long*>(top5.data_ptr<int64_t>()),
            reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()), flags.data_ptr<int>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (tile + fixed <= static_cast<size_t>(optin)) {
        auto kernel = sweep_kernel<scalar_t, row_t, true>;
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(tile)));
        args(kernel, tile);
      } else {
        args(sweep_kernel<scalar_t, scalar_t, false>, 0);
      }
    });
  }
  const int status = flags.item<int>();  // the op's one host synchronisation
  TORCH_CHECK_VALUE(!(status & 1), "ensemble_sweep: `logits` contain NaN or infinity");
  TORCH_CHECK_VALUE(!(status & 2), "ensemble_sweep: `target` has a label outside [0, ", c_count, ")");
  return {top1, top5, hist};
}

}  // namespace

TORCH_LIBRARY_IMPL(divfast, CUDA, m) { m.impl("ensemble_sweep", &ensemble_sweep_cuda); }

}  // namespace divfast
