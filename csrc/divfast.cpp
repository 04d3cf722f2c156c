// The one schema block of divfast's custom ops. Backends register implementations in cpu/ and cuda/.
// `divfast._C` is a plain extension module whose import runs these static registrations.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing divfast._C loads this library, which runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
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
}
