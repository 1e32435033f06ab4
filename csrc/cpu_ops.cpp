// CPU implementations of the prsgd_hvd ops: the checked segment lists of common.cpp handed to
// the kernels of cpu_kernels_impl.h for the best instruction set this CPU has
// (NOTE: [CPU capability] in cpu_kernels.h).
#include "common.h"
#include "cpu_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace prsgd {
namespace {

bool use_avx2() {
#if PRSGD_HAVE_AVX2_KERNELS
  static const bool avx2 = [] {
    const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
    return cap == "AVX2" || cap == "AVX512";
  }();
  return avx2;
#else
  return false;
#endif
}

void run_flatten(const std::vector<cpu::CastSegment>& segs, c10::ScalarType dst) {
#if PRSGD_HAVE_AVX2_KERNELS
  if (use_avx2()) return cpu::avx2::flatten(segs, dst);
#endif
  cpu::default_cpu::flatten(segs, dst);
}

void run_average_sgd(const std::vector<cpu::SgdSegment>& segs, c10::ScalarType flat_type,
                     const SgdOptions& o, bool accumulate, double* divergence) {
#if PRSGD_HAVE_AVX2_KERNELS
  if (use_avx2()) return cpu::avx2::average_sgd(segs, flat_type, o, accumulate, divergence);
#endif
  cpu::default_cpu::average_sgd(segs, flat_type, o, accumulate, divergence);
}

void run_average_outer_sgd(const std::vector<cpu::OuterSegment>& segs, c10::ScalarType flat_type,
                           const SgdOptions& outer, const SgdOptions& inner, double* divergence) {
#if PRSGD_HAVE_AVX2_KERNELS
  if (use_avx2()) return cpu::avx2::average_outer_sgd(segs, flat_type, outer, inner, divergence);
#endif
  cpu::default_cpu::average_outer_sgd(segs, flat_type, outer, inner, divergence);
}

// The CPU kernels of every op (DeviceOps in common.h): the call's segments as pointers.
struct CpuKernels {
  static void flatten(FlattenCall& call) {
    char* out_base = static_cast<char*>(call.out.data_ptr());
    const int64_t out_size = call.out.element_size();
    std::vector<cpu::CastSegment> segs;
    segs.reserve(call.segments.size());
    for (const FlattenSegment& s : call.segments) {
      // Padding after the segment (NOTE: [Segment layout]): zeros, a few bytes at most.
      std::memset(out_base + (s.flat_offset + s.numel) * out_size, 0, s.pad * out_size);
      segs.push_back({s.src, out_base + s.flat_offset * out_size, s.numel, s.src_type});
    }
    run_flatten(segs, call.out.scalar_type());
  }

  static void unflatten(const at::Tensor& flat, UnflattenCall& call) {
    const char* flat_base = static_cast<const char*>(flat.const_data_ptr());
    const int64_t flat_size = flat.element_size();
    std::vector<cpu::SgdSegment> segs;
    segs.reserve(call.segments.size());
    for (const ParamSegment& s : call.segments) {
      segs.push_back({flat_base + s.flat_offset * flat_size, s.param, s.grad, s.momentum_buf,
                      s.numel, s.param_type, s.first_step});
    }
    run_average_sgd(segs, flat.scalar_type(), call.options, call.accumulate, call.divergence);
  }

  static void unflatten_outer(const at::Tensor& flat, OuterUnflattenCall& call) {
    const char* flat_base = static_cast<const char*>(flat.const_data_ptr());
    const int64_t flat_size = flat.element_size();
    std::vector<cpu::OuterSegment> segs;
    segs.reserve(call.segments.size());
    for (const OuterParamSegment& o : call.segments) {
      const ParamSegment& s = o.inner;
      segs.push_back({flat_base + s.flat_offset * flat_size, s.param, o.anchor, o.outer_buf,
                      s.grad, s.momentum_buf, s.numel, s.param_type, o.outer_first,
                      s.first_step});
    }
    run_average_outer_sgd(segs, flat.scalar_type(), call.outer, call.inner, call.divergence);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(prsgd_hvd, CPU, m) { DeviceOps<CpuKernels>::register_impls(m); }

}  // namespace prsgd
