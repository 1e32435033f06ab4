// C interface of the emulated kernels (libprsgd_cuda_emu.so), called from Python with ctypes
// (tests/test_cuda_emu.py). Tensors are host memory; dtypes are prsgd::cuda::DType values.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Orders for blocks (which block runs next) and threads (which runnable thread runs next).
enum { PRSGD_EMU_FORWARD = 0, PRSGD_EMU_REVERSE = 1, PRSGD_EMU_SHUFFLED = 2 };

// The emulated device: its id (kernels.cu caches per device, so a new configuration should use
// a new id), SM count, occupancy of every kernel, orders and the seed of the shuffles. Clears
// the launch log.
void prsgd_emu_configure(int device, int sms, int blocks_per_sm, int block_order,
                         int thread_order, uint64_t seed);

// NOTE: [Launch configuration] of csrc/cuda/multi_segment.h for the following launches (it is
// process-wide, as in the extension). Returns 0, or -1 (nothing changed) when out of range.
int prsgd_emu_set_launch_config(int persistent, int split_log2, int unroll);

// Grids of the launches since the last call (or configure), up to `capacity` written;
// returns how many there were.
int64_t prsgd_emu_launches(int64_t* grids, int64_t capacity);

// offsets[0..n] of NOTE: [Segment layout] for a flat buffer of `flat_dtype`; returns 0, or -1
// when align_bytes is not accepted.
int prsgd_emu_layout(int n, const int64_t* numels, int32_t flat_dtype, int64_t align_bytes,
                     int64_t* offsets);

// flatten: groups the tensors by dtype and launches as cuda_ops.cpp does. Returns a
// cudaError_t (0 = success).
int prsgd_emu_flatten(int n, void* const* tensors, const int64_t* numels, const int32_t* dtypes,
                      void* flat, int32_t flat_dtype, int64_t align_bytes);

// unflatten_average_ (sgd = 0: grads, bufs, first_step and hyper[1..] ignored) or
// unflatten_average_sgd_ (sgd = 1). hyper = {scale, lr, momentum, dampening, weight_decay,
// nesterov, maximize}. grads[i] / bufs[i] may be null. divergence: null, or one double.
// accumulate = 1: the average is added to the params (NOTE: [Accumulate] in csrc/common.h).
int prsgd_emu_unflatten(int n, void* const* params, const void* const* grads,
                        void* const* bufs, const uint8_t* first_step, const int64_t* numels,
                        const int32_t* dtypes, const void* flat, int32_t flat_dtype,
                        int64_t align_bytes, int sgd, const double* hyper, double* divergence,
                        int accumulate);

// unflatten_average_outer_sgd_: outer_hyper and inner_hyper = {scale (outer only), lr,
// momentum, dampening, weight_decay, nesterov, maximize}. anchors/outer_bufs have flat's dtype;
// outer_bufs[i], grads[i], bufs[i] may be null. divergence: null, or one double.
int prsgd_emu_unflatten_outer(int n, void* const* params, void* const* anchors,
                              void* const* outer_bufs, const uint8_t* outer_first_step,
                              const void* const* grads, void* const* bufs,
                              const uint8_t* first_step, const int64_t* numels,
                              const int32_t* dtypes, const void* flat, int32_t flat_dtype,
                              int64_t align_bytes, const double* outer_hyper,
                              const double* inner_hyper, double* divergence);

#ifdef __cplusplus
}
#endif
