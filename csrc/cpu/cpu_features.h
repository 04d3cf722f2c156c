// Runtime CPU feature checks shared by the CPU kernels (the extension is compiled for baseline x86-64;
// AVX2 paths are compiled with target attributes and chosen here once per process).
//
// DIVFAST_CPU_BASELINE=1 in the environment forces the portable paths on any CPU, and
// DIVFAST_CPU_BASELINE=avx2 the AVX2 paths where AVX-512 would be taken, so the tests can compare
// each path with the reference on a machine that has AVX-512 (tests/test_ops_portable.py).
#pragma once

#include <cstdlib>
#include <cstring>
#include <strings.h>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace divfast {

// 0: no limit; 1: AVX2 at most (DIVFAST_CPU_BASELINE=avx2, any case); 2: portable (any other
// non-empty value but "0").
inline int cpu_baseline_level() {
  static const int level = [] {
    const char* value = std::getenv("DIVFAST_CPU_BASELINE");
    if (value == nullptr || value[0] == '\0' || std::strcmp(value, "0") == 0) return 0;
    return strcasecmp(value, "avx2") == 0 ? 1 : 2;
  }();
  return level;
}

inline bool cpu_baseline_forced() { return cpu_baseline_level() == 2; }

#if defined(__x86_64__)
// F16C (float16 conversions; every CPU with AVX2 has it), from CPUID leaf 1 (older clang's
// __builtin_cpu_supports does not know "f16c").
inline bool cpu_has_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
}

// AVX2, FMA and F16C: the "avx2" paths.
inline bool cpu_has_avx2_fma() {
  static const bool has = !cpu_baseline_forced() && __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("fma") && cpu_has_f16c();
  return has;
}

inline bool cpu_has_avx512f() {
  static const bool has =
      cpu_baseline_level() == 0 && __builtin_cpu_supports("avx512f") && cpu_has_avx2_fma();
  return has;
}
#else
inline bool cpu_has_avx2_fma() { return false; }
inline bool cpu_has_avx512f() { return false; }
#endif

}  // namespace divfast
