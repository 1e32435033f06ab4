// Interface between the torch-free CUDA kernels (kernels.cu) and their torch glue
// (cuda_ops.cpp). Plain C++ and the CUDA runtime only: kernels.cu must compile with a bare
// `nvcc -c`, without ATen/c10 headers (the CPU torch wheel used by CI has no c10/cuda headers).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "segment_table.h"  // Segment, DType, kChunkSize: shared with the glue and the emulation
#include "sgd_options.h"    // SgdOptions: shared with the glue and the CPU kernels

namespace prsgd {
namespace cuda {

// Launchers: enqueue one kernel on `stream` over the `num_segments` segments of a device table
// holding `num_chunks` chunks in all, and return cudaGetLastError(). They use the current
// device (the glue sets it). cudaErrorInvalidValue: dtype combination not compiled.
// Every pointer in the table, `flat` and the scratch must be global memory (cudaMalloc'd or
// from torch's caching allocator): the kernels access 16-byte words with ld/st.global.

// flat[seg.flat_offset + j] = dst(seg.tensor[j]), and zeros in the seg.flat_pad elements after
// it (NOTE: [Segment layout]). src/dst: the same dtype (a bit copy), or both among
// fp32/fp16/bf16 (converted through fp32).
cudaError_t launch_flatten(DType src, DType dst, const Segment* table, int32_t num_segments,
                           int64_t num_chunks, void* flat, cudaStream_t stream);

// param[j] = flat[seg.flat_offset + j] * scale (opmath), when `sgd` is false; otherwise that
// average followed by torch.optim.SGD's update (sgd_math in kernels.cu).
// flat/param: the same dtype, or fp32 flat with fp16/bf16 params.
// divergence (device, one double) != nullptr: also *divergence += sum over the table of
// (old param - average)^2 (NOTE: [Divergence] in csrc/common.h); `block_sums` is device
// scratch of at least divergence_scratch_size(num_chunks) doubles, and a second, single-block
// kernel adds the per-block sums in order. Both null: the plain kernel, no extra read.
cudaError_t launch_unflatten_average(DType flat_dtype, DType param_dtype, const Segment* table,
                                     int32_t num_segments, int64_t num_chunks, const void* flat,
                                     const SgdOptions& options, bool sgd, double* divergence,
                                     double* block_sums, cudaStream_t stream);

// Doubles of scratch launch_unflatten_average needs for `divergence` on the current device: an
// upper bound of the grid any of its kernels uses (NOTE: [Grid size] in kernels.cu).
int64_t divergence_scratch_size(int64_t num_chunks);

}  // namespace cuda
}  // namespace prsgd
