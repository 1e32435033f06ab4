// The device-independent half of every op: argument checks and the segment lists the kernels
// walk, built once here for the CPU (cpu_ops.cpp) and CUDA (cuda/cuda_ops.cpp) glue alike, and
// the op entry points themselves (DeviceOps below), which each device instantiates with its
// kernels.
//
// The layout itself (NOTE: [Segment layout], packed by default, each segment 16-byte aligned
// with align=16) is defined once, torch-free, in segment_table.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <vector>

#include "segment_table.h"
#include "sgd_options.h"

namespace prsgd {

// ---- flatten, flatten_into --------------------------------------------------------------

// One tensor the packing kernels copy: contiguous, non-empty, a cast they handle.
struct FlattenSegment {
  const void* src;
  c10::ScalarType src_type;
  int64_t flat_offset;  // first element of its segment in `out`
  int64_t numel;
  int64_t pad;          // zeros after it (NOTE: [Segment layout]); the kernels write them
};

struct FlattenCall {
  at::Tensor out;                        // checked, or allocated in tensors[0]'s dtype
  std::vector<FlattenSegment> segments;  // for the device's kernels, in flat order
};

// Checks the arguments and allocates `out` when not given. Tensors the kernels do not take
// (strided ones, casts to or from fp64) are copied here with torch's copy_ (still one pass)
// and their padding zeroed; the rest come back as segments.
FlattenCall prepare_flatten(at::TensorList tensors, const c10::optional<at::Tensor>& out,
                            int64_t align);

// ---- unflatten_average_, unflatten_average_sgd_ -----------------------------------------

// One non-empty param, as the kernels of either device see it.
struct ParamSegment {
  void* param;
  const void* grad;    // nullptr: no local update, the average only
  void* momentum_buf;  // nullptr unless momentum != 0 and there is a grad
  int64_t flat_offset;
  int64_t numel;
  c10::ScalarType param_type;
  bool first_step;
};

struct UnflattenCall {
  std::vector<ParamSegment> segments;  // in flat order
  SgdOptions options;
  bool sgd;            // false: unflatten_average_ (only options.scale counts)
  double* divergence;  // NOTE: [Divergence] below; nullptr when not asked for
  bool accumulate;     // NOTE: [Accumulate] below
};

UnflattenCall prepare_unflatten_average(const at::Tensor& flat, at::TensorList params,
                                        double scale, const c10::optional<at::Tensor>& divergence,
                                        int64_t align, bool accumulate);

UnflattenCall prepare_unflatten_average_sgd(
    const at::Tensor& flat, at::TensorList params,
    const c10::List<c10::optional<at::Tensor>>& grads,
    const c10::List<c10::optional<at::Tensor>>& momentum_buffers,
    const c10::List<bool>& first_step, const SgdOptions& options,
    const c10::optional<at::Tensor>& divergence, int64_t align, bool accumulate);

// ---- unflatten_average_outer_sgd_ ---------------------------------------------------------

// One non-empty param of an outer round: the inner part as for unflatten_average_sgd_ (grad
// nullptr: no inner update), plus theta0 and the outer momentum buffer, both in flat's dtype.
struct OuterParamSegment {
  ParamSegment inner;
  void* anchor;
  void* outer_buf;  // nullptr when the outer momentum is 0
  bool outer_first;
};

struct OuterUnflattenCall {
  std::vector<OuterParamSegment> segments;  // in flat order
  SgdOptions outer;                         // outer.scale: the round's scale
  SgdOptions inner;
  double* divergence;
};

OuterUnflattenCall prepare_unflatten_average_outer_sgd(
    const at::Tensor& flat, at::TensorList params, at::TensorList anchors,
    const c10::List<c10::optional<at::Tensor>>& outer_buffers,
    const c10::List<bool>& outer_first_step,
    const c10::List<c10::optional<at::Tensor>>& grads,
    const c10::List<c10::optional<at::Tensor>>& momentum_buffers,
    const c10::List<bool>& first_step, const SgdOptions& outer, const SgdOptions& inner,
    const c10::optional<at::Tensor>& divergence, int64_t align);

// NOTE: [Divergence] Both unflatten ops take an optional `divergence`, a 1-element float64
// tensor on flat's device, and add to it sum over all elements of all params of
// (old param - flat * scale)^2: the squared distance of this rank's model from the average
// (E||x_bar - x_i||^2 of the PR-SGD analysis; for unflatten_average_sgd_ the old value is
// x_i^{t-1}, before the step, and the distance is to the average, not to the stepped value).
// The kernels read each param element just before they overwrite it, square the difference
// in opmath (fp32; fp64 for double) and accumulate in float64: on CPU per fixed block of
// elements, blocks added in order (independent of the thread count); on CUDA per thread,
// then per block, then one single-block kernel adds the block sums in order (independent of
// timing on a given GPU). Without `divergence` the kernels are instantiated without that read
// (a compile-time flag), so they cost what they cost before the option existed.
//
// NOTE: [Accumulate] unflatten_average_ and unflatten_average_sgd_ take `accumulate` (default
// false). With it each element becomes old param + flat * scale instead of flat * scale, in
// opmath (fp32 for fp16/bf16 params, whose flat buffer is fp32), rounded once into the param;
// unflatten_average_sgd_ then steps from that point. It is a delayed merge in one pass
// (NOTE: [streaming] in prsgd_hvd/streaming.py): flat holds the correction c - x_sent, scale
// is 1, and the result is bit for bit what flatten(x), add(correction) and a write of that sum
// at scale 1 gave in three. The param is read once, just before it is written; `divergence`
// takes (old param - (old param + flat * scale))^2 from that same read: the distance to the
// point before any step, as without `accumulate`.

// ---- the ops' entry points ---------------------------------------------------------------

// The ops as registered (schemas in ops.cpp) for a device whose `Kernels` has
//   static void flatten(FlattenCall& call);
//   static void unflatten(const at::Tensor& flat, UnflattenCall& call);
//   static void unflatten_outer(const at::Tensor& flat, OuterUnflattenCall& call);
// (both may consume the call's segments).
template <typename Kernels>
struct DeviceOps {
  static at::Tensor flatten(at::TensorList tensors, int64_t align) {
    FlattenCall call = prepare_flatten(tensors, c10::nullopt, align);
    Kernels::flatten(call);
    return call.out;
  }

  static void flatten_into(at::TensorList tensors, const at::Tensor& out, int64_t align) {
    FlattenCall call = prepare_flatten(tensors, out, align);
    Kernels::flatten(call);
  }

  static void unflatten_average(const at::Tensor& flat, at::TensorList params, double scale,
                                const c10::optional<at::Tensor>& divergence, int64_t align,
                                bool accumulate) {
    UnflattenCall call =
        prepare_unflatten_average(flat, params, scale, divergence, align, accumulate);
    Kernels::unflatten(flat, call);
  }

  static void unflatten_average_sgd(const at::Tensor& flat, at::TensorList params,
                                    const c10::List<c10::optional<at::Tensor>>& grads,
                                    const c10::List<c10::optional<at::Tensor>>& momentum_buffers,
                                    const c10::List<bool>& first_step, double scale, double lr,
                                    double momentum, double dampening, double weight_decay,
                                    bool nesterov, bool maximize,
                                    const c10::optional<at::Tensor>& divergence, int64_t align,
                                    bool accumulate) {
    UnflattenCall call = prepare_unflatten_average_sgd(
        flat, params, grads, momentum_buffers, first_step,
        SgdOptions{scale, lr, momentum, dampening, weight_decay, nesterov, maximize}, divergence,
        align, accumulate);
    Kernels::unflatten(flat, call);
  }

  static void unflatten_average_outer_sgd(
      const at::Tensor& flat, at::TensorList params, at::TensorList anchors,
      const c10::List<c10::optional<at::Tensor>>& outer_buffers,
      const c10::List<bool>& outer_first_step, const c10::List<c10::optional<at::Tensor>>& grads,
      const c10::List<c10::optional<at::Tensor>>& momentum_buffers,
      const c10::List<bool>& first_step, double scale, double outer_lr, double outer_momentum,
      double outer_dampening, double outer_weight_decay, bool outer_nesterov,
      bool outer_maximize, double lr, double momentum, double dampening, double weight_decay,
      bool nesterov, bool maximize, const c10::optional<at::Tensor>& divergence,
      int64_t align) {
    OuterUnflattenCall call = prepare_unflatten_average_outer_sgd(
        flat, params, anchors, outer_buffers, outer_first_step, grads, momentum_buffers,
        first_step,
        SgdOptions{scale, outer_lr, outer_momentum, outer_dampening, outer_weight_decay,
                   outer_nesterov, outer_maximize},
        SgdOptions{scale, lr, momentum, dampening, weight_decay, nesterov, maximize}, divergence,
        align);
    Kernels::unflatten_outer(flat, call);
  }

  // For TORCH_LIBRARY_IMPL(prsgd_hvd, <dispatch key>, m).
  static void register_impls(torch::Library& m) {
    m.impl("flatten", &flatten);
    m.impl("flatten_into", &flatten_into);
    m.impl("unflatten_average_", &unflatten_average);
    m.impl("unflatten_average_sgd_", &unflatten_average_sgd);
    m.impl("unflatten_average_outer_sgd_", &unflatten_average_outer_sgd);
  }
};

}  // namespace prsgd
