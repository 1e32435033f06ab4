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
// average followed by torch.optim.SGD's update (sgd_math in kernels.cu). `accumulate`: the
// old param[j] plus that product instead, rounded once (NOTE: [Accumulate] in csrc/common.h).
// flat/param: the same dtype, or fp32 flat with fp16/bf16 params.
// divergence (device, one double) != nullptr: also *divergence += sum over the table of
// (old param - average)^2 (NOTE: [Divergence] in csrc/common.h); `block_sums` is device
// scratch of at least divergence_scratch_size(num_chunks) doubles, and a second, single-block
// kernel adds the per-block sums in order. Both null: the plain kernel, no extra read.
cudaError_t launch_unflatten_average(DType flat_dtype, DType param_dtype, const Segment* table,
                                     int32_t num_segments, int64_t num_chunks, const void* flat,
                                     const SgdOptions& options, bool sgd, bool accumulate,
                                     double* divergence, double* block_sums,
                                     cudaStream_t stream);

// unflatten_average_outer_sgd_ (ops_reference.unflatten_average_outer_sgd_): per element,
// ybar = flat * outer.scale; theta0 (seg.anchor, flat's dtype) <- SGD(theta0, theta0 - ybar)
// with `outer` and seg.outer_buf; param = the new theta0, or its SGD step with `inner` where
// seg.grad is set (seg.momentum_buf). Dtype pairs, divergence and block_sums as
// launch_unflatten_average.
cudaError_t launch_unflatten_average_outer(DType flat_dtype, DType param_dtype,
                                           const Segment* table, int32_t num_segments,
                                           int64_t num_chunks, const void* flat,
                                           const SgdOptions& outer, const SgdOptions& inner,
                                           double* divergence, double* block_sums,
                                           cudaStream_t stream);

// Doubles of scratch launch_unflatten_average needs for `divergence`: an upper bound of the
// grid any of its kernels uses under any launch configuration (NOTE: [Grid size] in kernels.cu).
int64_t divergence_scratch_size(int64_t num_chunks);

// NOTE: [Launch configuration] How the multi-segment kernels map work to blocks. The default is
// the fastest measured (docs/gpu_notes.md); the others stay selectable so that one benchmark run
// on a GPU can time them against each other (benchmarks/bench_gpu_round.py) and the host
// emulation can check every one bit for bit. Production code never changes it.
//  - persistent = 1: the grid is as many blocks as fit on the device at once, each looping over
//    tasks (the layout before issue 21); 0: one block per task, the hardware hands tasks to SMs
//    as they free up, so a kernel ends within one task's time of its last byte.
//  - split_log2: a table chunk (kChunkSize elements) is cut into 2^split_log2 tasks, so the tail
//    of a launch is a fraction of a chunk. 0..kMaxSplitLog2.
//  - unroll: 0 = each kernel's own count of 16-byte words per stream that a thread has in flight
//    at once (kUnroll in kernels.cu); 1, 2 or 4 force it, for the fp32 kernels only (fp32
//    flatten and fp32 average/step); every other kernel keeps its own. 1 is the layout before
//    issue 21.
struct LaunchConfig {
  int32_t persistent;
  int32_t split_log2;
  int32_t unroll;
};
constexpr int32_t kMaxSplitLog2 = 3;
LaunchConfig default_launch_config();
// The process-wide configuration, read once per launch.
LaunchConfig launch_config();
// Sets it; false (and nothing changed) when a field is out of range. For benchmarks and tests.
bool set_launch_config(const LaunchConfig& config);

}  // namespace cuda
}  // namespace prsgd
