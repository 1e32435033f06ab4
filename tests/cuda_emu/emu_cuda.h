// Host emulation of the CUDA built-ins that csrc/cuda/kernels.cu uses, so that g++ can compile
// and run the unmodified kernels on a machine without a GPU (force-included with
// `-include tests/cuda_emu/emu_cuda.h`; build and runner in tests/test_cuda_emu.py).
//
// NOTE: [CUDA emulation] What it models, and why each choice makes bugs visible:
//  - every CUDA thread is a fiber (ucontext) with its own threadIdx; a block runs its threads
//    to completion, one block at a time, in a configurable block order (forward, reverse,
//    shuffled) and a configurable choice of which runnable thread goes next (lowest index,
//    highest, random), so results cannot depend on an order the GPU does not promise;
//  - __syncthreads, the warp shuffles and ballots are barriers: a thread that reaches one waits until
//    every thread it synchronises with has arrived (a barrier that can never complete, e.g.
//    in divergent code, aborts with "deadlock");
//  - __shared__ variables are fresh for every block: the emulator fills them with 0xff bytes
//    (NaN for floating point) before each block, so reading a slot that no thread of this
//    block wrote yet (a missing __syncthreads) gives NaN, not a stale value from the last block;
//  - __fmul_rn and friends are single IEEE operations (build with -ffp-contract=off);
//    __half/__nv_bfloat16 and their conversions are the CUDA headers' own host code;
//  - the launch configuration is checked as the driver checks it (grid and block > 0, block
//    <= 1024), and cudaGetDevice / cudaDeviceGetAttribute(SM count) /
//    cudaOccupancyMaxActiveBlocksPerMultiprocessor answer from a configuration the test sets.
// Not modelled: memory spaces, timing, atomics, warp-synchronous code without shuffles.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <utility>

namespace prsgd_emu {

[[noreturn]] void fail(const char* what);

// The running thread's index and its block's coordinates.
const uint3& thread_idx();
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;

void sync_block();  // __syncthreads
// Full-warp exchange: every lane publishes `bits`; returns lane (own lane + delta)'s, or its own
// when that lane is past the warp's end (as __shfl_down_sync does).
uint64_t shuffle_down(uint64_t bits, unsigned delta);
// Full-warp vote: bit l of the result is lane l's `pred` (as __ballot_sync(0xffffffff, pred)).
uint32_t ballot(bool pred);

// Runs body() as every thread of every block of a grid (NOTE: [CUDA emulation]); records
// cudaErrorInvalidConfiguration for cudaGetLastError() instead when the configuration is bad.
void run_grid(dim3 grid, dim3 block, const std::function<void()>& body);

// PRSGD_LAUNCH(kernel, grid, block, stream)(args...) of kernels.cu.
struct Launcher {
  dim3 grid, block;
  template <typename... P>
  auto of(void (*kernel)(P...)) const {
    const dim3 g = grid, b = block;
    return [g, b, kernel](auto&&... args) {
      // The arguments are copied once, like the driver copies kernel parameters.
      std::tuple<std::decay_t<P>...> params(args...);
      run_grid(g, b, [&] { std::apply(kernel, params); });
    };
  }
};

}  // namespace prsgd_emu

#define PRSGD_LAUNCH(kernel, grid, block, stream) \
  ((void)(stream), ::prsgd_emu::Launcher{dim3(grid), dim3(block)}.of(kernel))

#define threadIdx (::prsgd_emu::thread_idx())
#define blockIdx (::prsgd_emu::g_block_idx)
#define blockDim (::prsgd_emu::g_block_dim)
#define gridDim (::prsgd_emu::g_grid_dim)

#undef __shared__
#define __shared__ __attribute__((section("prsgd_emu_shared"))) static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

inline void __syncthreads() { ::prsgd_emu::sync_block(); }

template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  if (mask != 0xffffffffu) ::prsgd_emu::fail("only full-warp shuffles are emulated");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = ::prsgd_emu::shuffle_down(bits, delta);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  if (mask != 0xffffffffu) ::prsgd_emu::fail("only full-warp ballots are emulated");
  return ::prsgd_emu::ballot(pred != 0);
}

inline int __clz(unsigned x) { return x == 0 ? 32 : __builtin_clz(x); }

[[noreturn]] inline void __trap() {
  ::prsgd_emu::fail("__trap() (a misaligned 16-byte access faults like this on the GPU)");
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
