// Argument checking and segment layout shared by the CPU and CUDA implementations.
//
// NOTE: [Segment layout] flatten() packs tensors back to back in list order; segment i of
// `flat` starts at the sum of the numels before it. Every op derives its offsets from the
// tensor list with segment_offsets(), so the layout has exactly one definition.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Optional.h>

#include <vector>

#include "sgd_options.h"

namespace prsgd {


// offsets[i] = start of tensor i in flat; offsets[n] = total numel.
std::vector<int64_t> segment_offsets(at::TensorList tensors);

// (flat dtype, param dtype) pairs the unflatten kernels are compiled for: same dtype (fp32,
// fp16, bf16, fp64), or an fp32 flat buffer with fp16/bf16 params.
bool is_supported_pair(c10::ScalarType flat, c10::ScalarType param);

// flatten(): is (src -> dst) a cast the packing kernels handle? Other casts fall back to copy_.
bool is_kernel_cast(c10::ScalarType src, c10::ScalarType dst);

// Validates `out` (or allocates it) for flatten and returns it. All devices.
at::Tensor flatten_prepare_out(at::TensorList tensors, const c10::optional<at::Tensor>& out,
                               int64_t total);

// Checks shared by both unflatten ops; returns the segment offsets.
std::vector<int64_t> check_unflatten(const char* op, const at::Tensor& flat, at::TensorList params);

// The extra checks of unflatten_average_sgd_ (grads, buffers, first_step).
void check_sgd(const at::Tensor& flat, at::TensorList params,
               const c10::List<c10::optional<at::Tensor>>& grads,
               const c10::List<c10::optional<at::Tensor>>& momentum_buffers,
               const c10::List<bool>& first_step, double momentum);

}  // namespace prsgd
