// Argument checking and segment layout shared by the CPU and CUDA implementations.
//
// The layout itself (NOTE: [Segment layout], packed by default, each segment 16-byte aligned
// with align=16) is defined once, torch-free, in segment_table.h; every op derives its offsets
// from the tensor list with segment_offsets() below.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Optional.h>

#include <vector>

#include "segment_table.h"
#include "sgd_options.h"

namespace prsgd {


// offsets[i] = start of tensor i in a flat buffer of `flat_dtype`; offsets[n] = its total numel.
// `align`: the ops' argument (bytes; checked here, `op` names the op in the error).
std::vector<int64_t> segment_offsets(const char* op, at::TensorList tensors,
                                     c10::ScalarType flat_dtype, int64_t align);

// The dtype of flatten()'s result: out's, or tensors[0]'s (an error when neither exists).
c10::ScalarType flatten_dtype(at::TensorList tensors, const c10::optional<at::Tensor>& out);

// (flat dtype, param dtype) pairs the unflatten kernels are compiled for: same dtype (fp32,
// fp16, bf16, fp64), or an fp32 flat buffer with fp16/bf16 params.
bool is_supported_pair(c10::ScalarType flat, c10::ScalarType param);

// flatten(): is (src -> dst) a cast the packing kernels handle? Other casts fall back to copy_.
bool is_kernel_cast(c10::ScalarType src, c10::ScalarType dst);

// Validates `out` (or allocates it) for flatten and returns it. All devices.
at::Tensor flatten_prepare_out(at::TensorList tensors, const c10::optional<at::Tensor>& out,
                               int64_t total);

// Checks shared by both unflatten ops; returns the segment offsets.
std::vector<int64_t> check_unflatten(const char* op, const at::Tensor& flat, at::TensorList params,
                                     int64_t align);

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
// Checks `divergence` (when given) and returns a pointer to its element, or nullptr.
double* check_divergence(const char* op, const at::Tensor& flat,
                         const c10::optional<at::Tensor>& divergence);

// The extra checks of unflatten_average_sgd_ (grads, buffers, first_step).
void check_sgd(const at::Tensor& flat, at::TensorList params,
               const c10::List<c10::optional<at::Tensor>>& grads,
               const c10::List<c10::optional<at::Tensor>>& momentum_buffers,
               const c10::List<bool>& first_step, double momentum);

}  // namespace prsgd
