// Interface between the torch-free CUDA kernels (kernels.cu) and their torch glue
// (cuda_ops.cpp). Plain C++ and the CUDA runtime only: kernels.cu must compile with a bare
// `nvcc -c`, without ATen/c10 headers (the CPU torch wheel used by CI has no c10/cuda headers).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace prsgd {
namespace cuda {

// Elements one block processes at a time (MultiTensorApply's chunk_size). A multiple of the
// vector width, so every chunk of a 16-byte-aligned tensor starts 16-byte aligned.
constexpr int64_t kChunkSize = 32768;

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// NOTE: [Segment table] One entry per non-empty tensor of one dtype group, in flat order. The
// glue builds it on the host, uploads it once and reuses the device copy for as long as the
// tensors (data pointers, sizes, first_step) stay the same; every kernel walks it, so a launch
// is not limited to the ~110 tensors MultiTensorApply fits in kernel arguments.
// Every field is written explicitly (no padding), so two tables compare with memcmp.
struct Segment {
  // flatten: the source tensor (read). unflatten ops: the param (written).
  void* tensor;
  // unflatten_average_sgd_: the gradient (read); nullptr = no local update, average only.
  const void* grad;
  // unflatten_average_sgd_: the momentum buffer (read unless first_step, then written);
  // nullptr when momentum == 0 or the tensor has no grad.
  void* momentum_buf;
  int64_t flat_offset;  // first element of the tensor's segment in `flat`
  int64_t numel;
  int64_t chunk_begin;  // index of the segment's first chunk, counted over the whole table
  int32_t first_step;   // 1: initialise the buffer from the (decayed) grad instead of reading it
  int32_t reserved;     // always 0
};
static_assert(sizeof(Segment) == 56, "Segment must have no padding");

inline int64_t chunks_of(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

// Hyperparameters as the op receives them; the kernels round them to their opmath type.
struct SgdHyper {
  double scale;
  double lr;
  double momentum;
  double dampening;
  double weight_decay;
  int32_t nesterov;
  int32_t maximize;
};

// Launchers: enqueue one kernel on `stream` over the `num_segments` segments of a device table
// holding `num_chunks` chunks in all, and return cudaGetLastError(). They use the current
// device (the glue sets it). cudaErrorInvalidValue: dtype combination not compiled.

// flat[seg.flat_offset + j] = dst(seg.tensor[j]). src/dst: the same dtype, or both among
// fp32/fp16/bf16 (converted through fp32).
cudaError_t launch_flatten(DType src, DType dst, const Segment* table, int32_t num_segments,
                           int64_t num_chunks, void* flat, cudaStream_t stream);

// param[j] = flat[seg.flat_offset + j] * scale (opmath), when `sgd` is false; otherwise that
// average followed by torch.optim.SGD's update (see average_sgd_math in kernels.cu).
// flat/param: the same dtype, or fp32 flat with fp16/bf16 params.
// divergence (device, one double) != nullptr: also *divergence += sum over the table of
// (old param - average)^2 (NOTE: [Divergence] in csrc/common.h); `block_sums` is device
// scratch of at least divergence_scratch_size(num_chunks) doubles, and a second, single-block
// kernel adds the per-block sums in order. Both null: the plain kernel, no extra read.
cudaError_t launch_unflatten_average(DType flat_dtype, DType param_dtype, const Segment* table,
                                     int32_t num_segments, int64_t num_chunks, const void* flat,
                                     const SgdHyper& hyper, bool sgd, double* divergence,
                                     double* block_sums, cudaStream_t stream);

// Doubles of scratch launch_unflatten_average needs for `divergence` on the current device
// (the grid size it will use).
int64_t divergence_scratch_size(int64_t num_chunks);

}  // namespace cuda
}  // namespace prsgd
