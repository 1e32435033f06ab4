// Tensor-free entry points of the CPU kernels, compiled twice (NOTE: [CPU capability]).
#pragma once

#include "sgd_options.h"

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

// NOTE: [CPU capability] The extension is built with the compiler's baseline flags, where
// at::vec::Vectorized falls back to plain arrays and runs the averaging step about 4x slower
// than with AVX2 (measured, docs/benchmarks.md). As ATen does for its own kernels, the kernel
// bodies (cpu_kernels_impl.h) are compiled once for the baseline (cpu_kernels_default.cpp)
// and once for AVX2+FMA+F16C (cpu_kernels_avx2.cpp, via `#pragma GCC target`, x86-64 only),
// each in its own namespace and with its own at::vec inline namespace, and cpu_ops.cpp picks
// one at run time from at::get_cpu_capability() (so ATEN_CPU_CAPABILITY=default forces the
// baseline, as for torch itself).
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define PRSGD_HAVE_AVX2_KERNELS 1
#else
#define PRSGD_HAVE_AVX2_KERNELS 0
#endif

namespace prsgd {
namespace cpu {

// flatten: dst = cast(src); both contiguous, numel elements.
struct CastSegment {
  const void* src;
  void* dst;
  int64_t numel;
  c10::ScalarType src_type;
};

// unflatten ops: param = average (and SGD step) of flat; all contiguous, numel elements.
struct SgdSegment {
  const void* flat;  // this segment's first element in flat
  void* param;
  const void* grad;  // nullptr: average only
  void* buf;         // nullptr unless momentum != 0 and there is a grad
  int64_t numel;
  c10::ScalarType param_type;
  bool first;
};

// unflatten_average_outer_sgd_: one param's segment of an outer round (common.h,
// OuterUnflattenCall); all contiguous, numel elements.
struct OuterSegment {
  const void* flat;  // this segment's first element in flat
  void* param;
  void* anchor;      // theta0, flat's dtype: read and written
  void* outer_buf;   // flat's dtype; nullptr when the outer momentum is 0
  const void* grad;  // nullptr: no inner update (param = the new theta0)
  void* buf;         // inner momentum buffer; nullptr unless inner momentum != 0 and a grad
  int64_t numel;
  c10::ScalarType param_type;
  bool outer_first;  // initialise outer_buf instead of reading it
  bool first;        // the same for buf
};

#define PRSGD_DECLARE_CPU_KERNELS(NS)                                                      \
  namespace NS {                                                                           \
  void flatten(const std::vector<CastSegment>& segs, c10::ScalarType dst_type);            \
  /* unflatten_average_ passes null grads (only o.scale is used). accumulate: param =   */ \
  /* old param + average (then the step). divergence != nullptr: *divergence += sum of  */ \
  /* (old param - that point)^2 (NOTE: [Divergence] in common.h).                        */ \
  void average_sgd(const std::vector<SgdSegment>& segs, c10::ScalarType flat_type,         \
                   const SgdOptions& o, bool accumulate, double* divergence);              \
  /* The outer round: `outer` (its scale is the round's) and the `inner` SGD options. */   \
  void average_outer_sgd(const std::vector<OuterSegment>& segs, c10::ScalarType flat_type, \
                         const SgdOptions& outer, const SgdOptions& inner,                 \
                         double* divergence);                                              \
  }

PRSGD_DECLARE_CPU_KERNELS(default_cpu)
#if PRSGD_HAVE_AVX2_KERNELS
PRSGD_DECLARE_CPU_KERNELS(avx2)
#endif
#undef PRSGD_DECLARE_CPU_KERNELS

}  // namespace cpu
}  // namespace prsgd
