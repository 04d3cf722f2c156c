// Runtime CPU feature checks shared by the CPU kernels (the extension is compiled for baseline x86-64;
// AVX2 paths are compiled with target attributes and chosen here once per process).
#pragma once

namespace divfast {

#if defined(__x86_64__)
inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
inline bool cpu_has_avx2_fma() { return false; }
#endif

}  // namespace divfast
