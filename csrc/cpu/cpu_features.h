// Runtime CPU feature checks shared by the CPU kernels (the extension is compiled for baseline x86-64;
// AVX2 paths are compiled with target attributes and chosen here once per process).
//
// DIVFAST_CPU_BASELINE=1 in the environment forces the portable paths on any CPU, so the tests can
// compare them with the reference on a machine that has AVX2 (tests/test_ops_portable.py).
#pragma once

#include <cstdlib>
#include <cstring>

namespace divfast {

inline bool cpu_baseline_forced() {
  static const bool forced = [] {
    const char* value = std::getenv("DIVFAST_CPU_BASELINE");
    return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
  }();
  return forced;
}

#if defined(__x86_64__)
inline bool cpu_has_avx2_fma() {
  static const bool has =
      !cpu_baseline_forced() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

inline bool cpu_has_avx512f() {
  static const bool has = !cpu_baseline_forced() && __builtin_cpu_supports("avx512f") && cpu_has_avx2_fma();
  return has;
}
#else
inline bool cpu_has_avx2_fma() { return false; }
inline bool cpu_has_avx512f() { return false; }
#endif

}  // namespace divfast
