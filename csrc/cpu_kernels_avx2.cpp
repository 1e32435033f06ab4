// The CPU kernels for AVX2 + FMA + F16C (NOTE: [CPU capability] in cpu_kernels.h). The target
// pragma comes before every include so that all code in this file, headers included, is
// compiled for the same ISA; at::vec selects its AVX2 Vectorized through CPU_CAPABILITY_AVX2
// and names its inline namespace after CPU_CAPABILITY, keeping these symbols apart from the
// baseline build. Only called when at::get_cpu_capability() reports AVX2 or better.
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c")
#endif
// GCC's C++ front end does not define the ISA macros for a target pragma (clang's does), and
// headers (sleef.h, at::vec) select their AVX2 declarations by them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2 1
#define PRSGD_CPU_NS avx2
#include "cpu_kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
