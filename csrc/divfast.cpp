// The one schema block of divfast's custom ops. Backends register implementations in cpu/ and cuda/.
// `divfast._C` is a plain extension module whose import runs these static registrations.
#include <Python.h>
#include <torch/library.h>

#include "cpu/cpu_features.h"

namespace {
// divfast._C.cpu_path(): "avx512" when the CPU kernels take their AVX2 + FMA paths and the AVX-512
// ones where they have them (attribution_stats), "avx2" for AVX2 + FMA only, else "portable" (no AVX2,
// or DIVFAST_CPU_BASELINE set: "avx2" caps the paths at AVX2, other values at portable).
PyObject* cpu_path(PyObject*, PyObject*) {
  return PyUnicode_FromString(divfast::cpu_has_avx512f()    ? "avx512"
                              : divfast::cpu_has_avx2_fma() ? "avx2"
                                                            : "portable");
}

PyMethodDef methods[] = {
    {"cpu_path", cpu_path, METH_NOARGS, "The CPU kernels' code path: 'avx512', 'avx2' or 'portable'."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
// Importing divfast._C loads this library, which runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(divfast, m) {
  // predictions: logits (M, B, C) or labels (M, B) int64; target (B,) int64.
  // num_classes: -1 (from the logits / unchecked for labels) or the class count to check labels against.
  // Returns counts (M, M, 2, 2) int64 [N11, N10, N01, N00], agreement (M, M) int64,
  // histogram (M + 1) int64 of the number of correct members per sample, correct (M, B) bool.
  m.def(
      "pair_counts(Tensor predictions, Tensor target, int num_classes=-1) -> "
      "(Tensor counts, Tensor agreement, Tensor histogram, Tensor correct)");
  // attributions (M, B, ...) float16/bfloat16/float32/float64: M members' maps of B samples.
  // abs: take |a| first; normalize: "none" | "l1" | "l2" | "max" (each map divided by its norm; a map
  // whose norm is 0 stays 0); ddof: 0 (population variance) or 1.
  // Returns variance (B,) float64, the sum over pixels of the variance across members (paper Eq. 7),
  // and gram (M, M) float64, sum over samples and pixels of products of the (normalised) maps.
  m.def(
      "attribution_stats(Tensor attributions, bool abs=True, str normalize=\"none\", int ddof=0) -> "
      "(Tensor variance, Tensor gram)");
  // grams (G, n, n) float16/bfloat16/float32/float64: Gram matrices of G representations (every
  // member x layer) of the same n >= 4 samples; only their symmetric parts are used.
  // Returns (G, G) float64: the unbiased HSIC (Song et al. 2012) of every pair, U-centring folded in.
  m.def("hsic(Tensor grams) -> Tensor");
  // logits (K, N, C) float16/bfloat16/float32/float64 of a pool of K members; target (N,) int64;
  // subsets (S, k) int64 rows of distinct member indices; rule: "average" | "vote" | "median" |
  // "geometric". Returns, per subset, top1 (S,) and top5 (S,) int64 correct counts of the subset's
  // consensus and histogram (S, k + 1) int64 of the number of correct members per sample.
  m.def(
      "ensemble_sweep(Tensor logits, Tensor target, Tensor subsets, str rule) -> "
      "(Tensor top1, Tensor top5, Tensor histogram)");
}
