#include "common.h"

#include <ATen/ATen.h>

namespace prsgd {
namespace {

// offsets[i] = start of tensor i in a flat buffer of `flat_dtype`; offsets[n] = its total numel.
// `align`: the ops' argument (bytes; checked here, `op` names the op in the error).
std::vector<int64_t> segment_offsets(const char* op, at::TensorList tensors,
                                     c10::ScalarType flat_dtype, int64_t align) {
  TORCH_CHECK_VALUE(valid_align(align), op, ": 'align' must be a power of two between 1 and ",
                    kMaxAlignBytes, " (bytes), got ", align);
  return prsgd::segment_offsets(
      tensors.size(), [&](size_t i) { return tensors[i].numel(); },
      align_elements(align, static_cast<int64_t>(c10::elementSize(flat_dtype))));
}

bool is_float_type(c10::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// (flat dtype, param dtype) pairs the unflatten kernels are compiled for: same dtype (fp32,
// fp16, bf16, fp64), or an fp32 flat buffer with fp16/bf16 params.
bool is_supported_pair(c10::ScalarType flat, c10::ScalarType param) {
  if (!is_float_type(flat) || !is_float_type(param)) return false;
  if (flat == param) return true;
  return flat == at::kFloat && (param == at::kHalf || param == at::kBFloat16);
}

// flatten: is (src -> dst) a cast the packing kernels handle? Other casts fall back to copy_.
bool is_kernel_cast(c10::ScalarType src, c10::ScalarType dst) {
  if (!is_float_type(src) || !is_float_type(dst)) return false;
  if (src == dst) return true;
  // Casts among fp32/fp16/bf16 go through fp32 exactly as torch's copy_ does; casts to or
  // from fp64 are rare here and left to copy_, which rounds them the way the reference does.
  return src != at::kDouble && dst != at::kDouble;
}

// Validates `out` (or allocates it) for flatten and returns it. `total`: the layout's numel.
at::Tensor flatten_out(at::TensorList tensors, const c10::optional<at::Tensor>& out,
                       int64_t total) {
  const at::Tensor result = out.has_value() ? *out : at::empty({total}, tensors[0].options());
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

// Checks shared by both unflatten ops; returns the segment offsets.
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

// Checks `divergence` (when given) and returns a pointer to its element, or nullptr.
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

// The extra checks of unflatten_average_sgd_ (grads, buffers, first_step).
void check_sgd(const at::Tensor& flat, at::TensorList params,
               const c10::List<c10::optional<at::Tensor>>& grads,
               const c10::List<c10::optional<at::Tensor>>& momentum_buffers,
               const c10::List<bool>& first_step, double momentum,
               const char* op = "unflatten_average_sgd_") {
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

// The outer part of unflatten_average_outer_sgd_: theta0 and the outer buffers.
void check_outer(const at::Tensor& flat, at::TensorList params, at::TensorList anchors,
                 const c10::List<c10::optional<at::Tensor>>& outer_buffers,
                 const c10::List<bool>& outer_first_step, double outer_momentum) {
  const char* op = "unflatten_average_outer_sgd_";
  const size_t n = params.size();
  TORCH_CHECK_VALUE(anchors.size() == n && outer_buffers.size() == n &&
                        outer_first_step.size() == n,
                    op, ": 'anchors', 'outer_buffers' and 'outer_first_step' must have one entry "
                    "per param (", n, "), got ", anchors.size(), ", ", outer_buffers.size(), ", ",
                    outer_first_step.size());
  // Each role against flat: its dtype (theta0 and its buffer are the outer optimizer's
  // tensors, fp32 for fp16/bf16 params), the param's shape, dense (written in place).
  auto check = [&](const at::Tensor& t, const char* name, size_t i) {
    TORCH_CHECK_VALUE(t.device() == flat.device(), op, ": ", name, "[", i, "] is on ",
                      t.device(), " but 'flat' is on ", flat.device());
    TORCH_CHECK_TYPE(t.scalar_type() == flat.scalar_type(), op, ": ", name, "[", i,
                     "] has dtype ", t.scalar_type(), " but 'flat' has ", flat.scalar_type(),
                     " (theta0 and the outer momentum are held in the flat buffer's dtype)");
    TORCH_CHECK_VALUE(t.sizes() == params[i].sizes(), op, ": ", name, "[", i, "] has shape ",
                      t.sizes(), " but params[", i, "] has ", params[i].sizes());
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, "[", i,
                      "] must be contiguous (it is written in place)");
  };
  for (size_t i = 0; i < n; ++i) {
    check(anchors[i], "anchors", i);
    if (outer_momentum == 0.0) continue;
    const c10::optional<at::Tensor> b = outer_buffers.get(i);
    TORCH_CHECK_VALUE(b.has_value() && b->defined(), op,
                      ": 'outer_buffers' needs a tensor for every param when outer_momentum != 0 "
                      "(pass outer_first_step=True to initialise it); outer_buffers[", i,
                      "] is None");
    check(*b, "outer_buffers", i);
  }
}

}  // namespace

FlattenCall prepare_flatten(at::TensorList tensors, const c10::optional<at::Tensor>& out,
                            int64_t align) {
  TORCH_CHECK_VALUE(out.has_value() || !tensors.empty(),
                    "flatten: 'tensors' is empty and no 'out' was given to take a dtype from");
  const c10::ScalarType dtype = out.has_value() ? out->scalar_type() : tensors[0].scalar_type();
  const auto offsets = segment_offsets("flatten", tensors, dtype, align);
  FlattenCall call{flatten_out(tensors, out, offsets.back()), {}};
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const int64_t pad = offsets[i + 1] - offsets[i] - t.numel();
    if (t.numel() == 0) continue;  // and pad == 0 (NOTE: [Segment layout])
    if (t.is_contiguous() && is_kernel_cast(t.scalar_type(), dtype)) {
      call.segments.push_back({t.const_data_ptr(), t.scalar_type(), offsets[i], t.numel(), pad});
    } else {  // strided sources and casts to/from fp64: torch's copy kernel, still one pass
      call.out.narrow(0, offsets[i], t.numel()).view(t.sizes()).copy_(t);
      if (pad > 0) call.out.narrow(0, offsets[i] + t.numel(), pad).zero_();
    }
  }
  return call;
}

UnflattenCall prepare_unflatten_average(const at::Tensor& flat, at::TensorList params,
                                        double scale, const c10::optional<at::Tensor>& divergence,
                                        int64_t align, bool accumulate) {
  const char* op = "unflatten_average_";
  const auto offsets = check_unflatten(op, flat, params, align);
  UnflattenCall call{{}, SgdOptions::average_only(scale), false,
                     check_divergence(op, flat, divergence), accumulate};
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    call.segments.push_back(
        {p.data_ptr(), nullptr, nullptr, offsets[i], p.numel(), p.scalar_type(), false});
  }
  return call;
}

UnflattenCall prepare_unflatten_average_sgd(
    const at::Tensor& flat, at::TensorList params,
    const c10::List<c10::optional<at::Tensor>>& grads,
    const c10::List<c10::optional<at::Tensor>>& momentum_buffers,
    const c10::List<bool>& first_step, const SgdOptions& options,
    const c10::optional<at::Tensor>& divergence, int64_t align, bool accumulate) {
  const char* op = "unflatten_average_sgd_";
  const auto offsets = check_unflatten(op, flat, params, align);
  check_sgd(flat, params, grads, momentum_buffers, first_step, options.momentum);
  UnflattenCall call{{}, options, true, check_divergence(op, flat, divergence), accumulate};
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    const c10::optional<at::Tensor> g = grads.get(i);
    const bool has_grad = g.has_value() && g->defined();
    void* buf = nullptr;
    if (has_grad && options.momentum != 0.0) buf = momentum_buffers.get(i)->data_ptr();
    call.segments.push_back({p.data_ptr(), has_grad ? g->const_data_ptr() : nullptr, buf,
                             offsets[i], p.numel(), p.scalar_type(), first_step.get(i)});
  }
  return call;
}

OuterUnflattenCall prepare_unflatten_average_outer_sgd(
    const at::Tensor& flat, at::TensorList params, at::TensorList anchors,
    const c10::List<c10::optional<at::Tensor>>& outer_buffers,
    const c10::List<bool>& outer_first_step,
    const c10::List<c10::optional<at::Tensor>>& grads,
    const c10::List<c10::optional<at::Tensor>>& momentum_buffers,
    const c10::List<bool>& first_step, const SgdOptions& outer, const SgdOptions& inner,
    const c10::optional<at::Tensor>& divergence, int64_t align) {
  const char* op = "unflatten_average_outer_sgd_";
  const auto offsets = check_unflatten(op, flat, params, align);
  check_outer(flat, params, anchors, outer_buffers, outer_first_step, outer.momentum);
  check_sgd(flat, params, grads, momentum_buffers, first_step, inner.momentum, op);
  OuterUnflattenCall call{{}, outer, inner, check_divergence(op, flat, divergence)};
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    const c10::optional<at::Tensor> g = grads.get(i);
    const bool has_grad = g.has_value() && g->defined();
    void* buf = nullptr;
    if (has_grad && inner.momentum != 0.0) buf = momentum_buffers.get(i)->data_ptr();
    void* outer_buf = outer.momentum != 0.0 ? outer_buffers.get(i)->data_ptr() : nullptr;
    call.segments.push_back(
        {{p.data_ptr(), has_grad ? g->const_data_ptr() : nullptr, buf, offsets[i], p.numel(),
          p.scalar_type(), has_grad && buf != nullptr && first_step.get(i)},
         anchors[i].data_ptr(), outer_buf, outer_buf != nullptr && outer_first_step.get(i)});
  }
  return call;
}

}  // namespace prsgd
