// The CPU kernels for AVX2 + FMA + F16C (NOTE: [CPU capability] in cpu_kernels.h). The target
// pragma comes before every include but the standard library's, so that all code in this file,
// torch's headers included, is compiled for the same ISA; at::vec selects its AVX2 Vectorized
// through CPU_CAPABILITY_AVX2 and names its inline namespace after CPU_CAPABILITY, keeping these
// symbols apart from the baseline build. Only called when at::get_cpu_capability() reports AVX2
// or better.
//
// The standard library comes first, compiled for the baseline ISA: GCC 13's libstdc++ declared
// under a target pragma fails to build ("inlining failed in call to 'always_inline'
// ~allocator(): target specific option mismatch", seen with g++ 13 on the GPU machine), and
// its inline functions then stay baseline wherever the linker takes them from. The list is
// every standard header this file reaches through torch (g++ -H); one missed is included
// under the pragma as before.
#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cassert>
#include <cctype>
#include <cerrno>
#include <cfloat>
#include <climits>
#include <clocale>
#include <cmath>
#include <compare>
#include <complex>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cwchar>
#include <cwctype>
#include <exception>
#include <functional>
#include <initializer_list>
#include <ios>
#include <iosfwd>
#include <iostream>
#include <istream>
#include <iterator>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <streambuf>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

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
