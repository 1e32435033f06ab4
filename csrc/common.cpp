#include "common.h"

#include <ATen/ATen.h>

namespace prsgd {

std::vector<int64_t> segment_offsets(const char* op, at::TensorList tensors,
                                     c10::ScalarType flat_dtype, int64_t align) {
  TORCH_CHECK_VALUE(valid_align(align), op, ": 'align' must be a power of two between 1 and ",
                    kMaxAlignBytes, " (bytes), got ", align);
  return prsgd::segment_offsets(
      tensors.size(), [&](size_t i) { return tensors[i].numel(); },
      align_elements(align, static_cast<int64_t>(c10::elementSize(flat_dtype))));
}

c10::ScalarType flatten_dtype(at::TensorList tensors, const c10::optional<at::Tensor>& out) {
  if (out.has_value()) return out->scalar_type();
  TORCH_CHECK_VALUE(!tensors.empty(),
                    "flatten: 'tensors' is empty and no 'out' was given to take a dtype from");
  return tensors[0].scalar_type();
}

static bool is_float_type(c10::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

bool is_supported_pair(c10::ScalarType flat, c10::ScalarType param) {
  if (!is_float_type(flat) || !is_float_type(param)) return false;
  if (flat == param) return true;
  return flat == at::kFloat && (param == at::kHalf || param == at::kBFloat16);
}

bool is_kernel_cast(c10::ScalarType src, c10::ScalarType dst) {
  if (!is_float_type(src) || !is_float_type(dst)) return false;
  if (src == dst) return true;
  // Casts among fp32/fp16/bf16 go through fp32 exactly as torch's copy_ does; casts to or
  // from fp64 are rare here and left to copy_, which rounds them the way the reference does.
  return src != at::kDouble && dst != at::kDouble;
}

at::Tensor flatten_prepare_out(at::TensorList tensors, const c10::optional<at::Tensor>& out,
                               int64_t total) {
  at::Tensor result;
  if (out.has_value()) {
    result = *out;
  } else {
    TORCH_CHECK_VALUE(!tensors.empty(),
                      "flatten: 'tensors' is empty and no 'out' was given to take a dtype from");
    result = at::empty({total}, tensors[0].options());
  }
  TORCH_CHECK_VALUE(result.dim() == 1 && result.numel() == total,
                    "flatten: 'out' must be 1-D with ", total,
                    " elements (the tensors' total in this layout), got shape ", result.sizes());
  TORCH_CHECK_VALUE(result.is_contiguous(), "flatten: 'out' must be contiguous");
  TORCH_CHECK_TYPE(is_float_type(result.scalar_type()),
                   "flatten: 'out' must be float32, float16, bfloat16 or float64, got ",
                   result.scalar_type());
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_VALUE(tensors[i].device() == result.device(), "flatten: tensors[", i,
                      "] is on ", tensors[i].device(), " but 'out' is on ", result.device());
    TORCH_CHECK_TYPE(is_float_type(tensors[i].scalar_type()), "flatten: tensors[", i,
                     "] has unsupported dtype ", tensors[i].scalar_type(),
                     " (float32, float16, bfloat16, float64 are supported)");
  }
  return result;
}

std::vector<int64_t> check_unflatten(const char* op, const at::Tensor& flat,
                                     at::TensorList params, int64_t align) {
  auto offsets = segment_offsets(op, params, flat.scalar_type(), align);
  const int64_t total = offsets.back();
  TORCH_CHECK_VALUE(flat.dim() == 1 && flat.numel() == total, op,
                    ": 'flat' must be 1-D with ", total,
                    " elements (the params' total), got shape ", flat.sizes());
  TORCH_CHECK_VALUE(flat.is_contiguous(), op, ": 'flat' must be contiguous");
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    TORCH_CHECK_VALUE(p.device() == flat.device(), op, ": params[", i, "] is on ", p.device(),
                      " but 'flat' is on ", flat.device());
    TORCH_CHECK_TYPE(is_supported_pair(flat.scalar_type(), p.scalar_type()), op,
                     ": unsupported dtypes: 'flat' is ", flat.scalar_type(), " and params[", i,
                     "] is ", p.scalar_type(), " (supported: the same dtype among float32, "
                     "float16, bfloat16, float64, or a float32 'flat' with float16/bfloat16 "
                     "params)");
    TORCH_CHECK_VALUE(p.is_contiguous(), op, ": params[", i,
                      "] must be contiguous (it is written in place)");
  }
  return offsets;
}

double* check_divergence(const char* op, const at::Tensor& flat,
                         const c10::optional<at::Tensor>& divergence) {
  if (!divergence.has_value() || !divergence->defined()) return nullptr;
  const at::Tensor& d = *divergence;
  TORCH_CHECK_TYPE(d.scalar_type() == at::kDouble, op,
                   ": 'divergence' must be a float64 tensor (it accumulates in float64), got ",
                   d.scalar_type());
  TORCH_CHECK_VALUE(d.numel() == 1, op, ": 'divergence' must have exactly one element, got shape ",
                    d.sizes());
  TORCH_CHECK_VALUE(d.device() == flat.device(), op, ": 'divergence' is on ", d.device(),
                    " but 'flat' is on ", flat.device());
  return d.data_ptr<double>();
}

void check_sgd(const at::Tensor& flat, at::TensorList params,
               const c10::List<c10::optional<at::Tensor>>& grads,
               const c10::List<c10::optional<at::Tensor>>& momentum_buffers,
               const c10::List<bool>& first_step, double momentum) {
  const char* op = "unflatten_average_sgd_";
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && momentum_buffers.size() == n, op,
                    ": 'params', 'grads' and 'momentum_buffers' must have the same length, got ",
                    n, ", ", grads.size(), ", ", momentum_buffers.size());
  TORCH_CHECK_VALUE(first_step.size() == n, op,
                    ": 'first_step' must be a bool or have one entry per param (", n, "), got ",
                    first_step.size());
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    const c10::optional<at::Tensor> g = grads.get(i);
    if (!g.has_value() || !g->defined()) continue;  // no local update: only the average
    TORCH_CHECK_VALUE(g->device() == flat.device(), op, ": grads[", i, "] is on ", g->device(),
                      " but 'flat' is on ", flat.device());
    TORCH_CHECK_TYPE(g->scalar_type() == p.scalar_type(), op, ": grads[", i, "] has dtype ",
                     g->scalar_type(), " but params[", i, "] has ", p.scalar_type());
    TORCH_CHECK_VALUE(g->sizes() == p.sizes(), op, ": grads[", i, "] has shape ", g->sizes(),
                      " but params[", i, "] has ", p.sizes());
    TORCH_CHECK_VALUE(g->is_contiguous(), op, ": grads[", i, "] must be contiguous");
    if (momentum == 0.0) continue;
    const c10::optional<at::Tensor> b = momentum_buffers.get(i);
    TORCH_CHECK_VALUE(b.has_value() && b->defined(), op,
                      ": 'momentum_buffers' needs a tensor for every param with a grad when "
                      "momentum != 0 (pass first_step=True to initialise it); momentum_buffers[",
                      i, "] is None");
    TORCH_CHECK_VALUE(b->device() == flat.device(), op, ": momentum_buffers[", i, "] is on ",
                      b->device(), " but 'flat' is on ", flat.device());
    TORCH_CHECK_TYPE(b->scalar_type() == p.scalar_type(), op, ": momentum_buffers[", i,
                     "] has dtype ", b->scalar_type(), " but params[", i, "] has ",
                     p.scalar_type());
    TORCH_CHECK_VALUE(b->sizes() == p.sizes(), op, ": momentum_buffers[", i, "] has shape ",
                      b->sizes(), " but params[", i, "] has ", p.sizes());
    TORCH_CHECK_VALUE(b->is_contiguous(), op, ": momentum_buffers[", i,
                      "] must be contiguous (it is written in place)");
  }
}

}  // namespace prsgd
