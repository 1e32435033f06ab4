// CPU implementations of the prsgd_hvd ops: argument checks (common.cpp), segment lists, and
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
                     const SgdOptions& o, double* divergence) {
#if PRSGD_HAVE_AVX2_KERNELS
  if (use_avx2()) return cpu::avx2::average_sgd(segs, flat_type, o, divergence);
#endif
  cpu::default_cpu::average_sgd(segs, flat_type, o, divergence);
}

at::Tensor flatten_cpu(at::TensorList tensors, const c10::optional<at::Tensor>& out,
                       int64_t align) {
  const auto offsets = segment_offsets("flatten", tensors, flatten_dtype(tensors, out), align);
  at::Tensor result = flatten_prepare_out(tensors, out, offsets.back());
  char* dst_base = static_cast<char*>(result.data_ptr());
  const int64_t dst_size = result.element_size();
  std::vector<cpu::CastSegment> segs;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    // Padding after the segment (NOTE: [Segment layout]): zeros, a few bytes at most.
    const int64_t end = offsets[i] + t.numel();
    std::memset(dst_base + end * dst_size, 0, (offsets[i + 1] - end) * dst_size);
    if (t.numel() == 0) continue;
    if (t.is_contiguous() && is_kernel_cast(t.scalar_type(), result.scalar_type())) {
      segs.push_back({t.const_data_ptr(), dst_base + offsets[i] * dst_size, t.numel(),
                      t.scalar_type()});
    } else {  // strided sources and casts to/from fp64: torch's copy kernel, still one pass
      result.narrow(0, offsets[i], t.numel()).view(t.sizes()).copy_(t);
    }
  }
  run_flatten(segs, result.scalar_type());
  return result;
}

void unflatten_average_cpu(const at::Tensor& flat, at::TensorList params, double scale,
                           const c10::optional<at::Tensor>& divergence, int64_t align) {
  const auto offsets = check_unflatten("unflatten_average_", flat, params, align);
  double* div = check_divergence("unflatten_average_", flat, divergence);
  const char* flat_base = static_cast<const char*>(flat.const_data_ptr());
  const int64_t flat_size = flat.element_size();
  std::vector<cpu::SgdSegment> segs;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    if (p.numel() == 0) continue;
    segs.push_back({flat_base + offsets[i] * flat_size, p.data_ptr(), nullptr, nullptr,
                    p.numel(), p.scalar_type(), false});
  }
  run_average_sgd(segs, flat.scalar_type(),
                  SgdOptions::average_only(scale), div);
}

void unflatten_average_sgd_cpu(const at::Tensor& flat, at::TensorList params,
                               const c10::List<c10::optional<at::Tensor>>& grads,
                               const c10::List<c10::optional<at::Tensor>>& momentum_buffers,
                               const c10::List<bool>& first_step, double scale, double lr,
                               double momentum, double dampening, double weight_decay,
                               bool nesterov, bool maximize,
                               const c10::optional<at::Tensor>& divergence, int64_t align) {
  const auto offsets = check_unflatten("unflatten_average_sgd_", flat, params, align);
  check_sgd(flat, params, grads, momentum_buffers, first_step, momentum);
  double* div = check_divergence("unflatten_average_sgd_", flat, divergence);
  const char* flat_base = static_cast<const char*>(flat.const_data_ptr());
  const int64_t flat_size = flat.element_size();
  std::vector<cpu::SgdSegment> segs;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    if (p.numel() == 0) continue;
    const c10::optional<at::Tensor> g = grads.get(i);
    const bool has_grad = g.has_value() && g->defined();
    void* buf = nullptr;
    if (has_grad && momentum != 0.0) buf = momentum_buffers.get(i)->data_ptr();
    segs.push_back({flat_base + offsets[i] * flat_size, p.data_ptr(),
                    has_grad ? g->const_data_ptr() : nullptr, buf, p.numel(), p.scalar_type(),
                    first_step.get(i)});
  }
  run_average_sgd(segs, flat.scalar_type(),
                  SgdOptions{scale, lr, momentum, dampening, weight_decay, nesterov, maximize},
                  div);
}

}  // namespace

TORCH_LIBRARY_IMPL(prsgd_hvd, CPU, m) {
  m.impl("flatten", &flatten_cpu);
  m.impl("unflatten_average_", &unflatten_average_cpu);
  m.impl("unflatten_average_sgd_", &unflatten_average_sgd_cpu);
}

}  // namespace prsgd
