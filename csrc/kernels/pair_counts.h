// Torch-free math of divfast::pair_counts, shared by the CPU and CUDA kernels.
//
// Layout of the outputs (M members, B samples):
//   counts (M, M, 2, 2): counts[i][k][a][b] with a = 1 - correct_i, b = 1 - correct_k, i.e. the flat
//                        last four are N11, N10, N01, N00 (Kuncheva & Whitaker's notation, 1 = correct).
//   agreement (M, M):    number of samples on which members i and k predict the same label.
//   histogram (M + 1):   histogram[j] = number of samples that exactly j members classify correctly.
//   correct (M, B):      per-sample correctness bits.
// Only N11 of the unordered pairs (i <= k, with N11[i][i] = member i's correct count) is accumulated;
// the other three cells follow from the margins, which keeps the inner loop to one popcount per pair.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DIVFAST_HD __host__ __device__ __forceinline__
#else
#define DIVFAST_HD inline
#endif

namespace divfast {
namespace kernels {

// Error bits a kernel raises; the host turns them into one clear message.
constexpr int kErrNaN = 1;
constexpr int kErrTarget = 2;
constexpr int kErrLabel = 4;

// Samples per tile: one 64-bit word of correctness bits per member.
constexpr int kTile = 64;

// Expands the accumulated upper-triangular N11 (with member correct counts on the diagonal) into the
// four contingency cells of the ordered pair (i, k).
DIVFAST_HD void expand_pair(int64_t n11, int64_t correct_i, int64_t correct_k, int64_t n,
                            int64_t* out4) {
  out4[0] = n11;                                 // both correct
  out4[1] = correct_i - n11;                     // i correct, k wrong
  out4[2] = correct_k - n11;                     // i wrong, k correct
  out4[3] = n - correct_i - correct_k + n11;     // both wrong
}

// Finalises the (M, M, 2, 2) counts and the symmetric (M, M) agreement from the upper triangles.
// Works for one ordered pair so that a CUDA thread or a CPU loop iteration can call it.
DIVFAST_HD void finalize_pair(const int64_t* n11_upper, const int64_t* agree_upper, int64_t m,
                              int64_t i, int64_t k, int64_t n, int64_t* counts, int64_t* agreement) {
  const int64_t lo = i < k ? i : k;
  const int64_t hi = i < k ? k : i;
  expand_pair(n11_upper[lo * m + hi], n11_upper[i * m + i], n11_upper[k * m + k], n,
              counts + (i * m + k) * 4);
  agreement[i * m + k] = agree_upper[lo * m + hi];
}

}  // namespace kernels
}  // namespace divfast
