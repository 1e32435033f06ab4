// Multi-tensor CUDA kernels of prsgd_hvd (torch-free: raw pointers and a cudaStream_t).
//
// Structure after PyTorch's MultiTensorApply.cuh / FusedSgdKernel.cu and apex's
// multi_tensor_sgd_kernel.cu: a small *_math device helper holds the arithmetic, one functor per
// op maps it over a chunk of one tensor, and one generic kernel hands chunks to blocks. Unlike
// MultiTensorApply the tensor list is not packed into kernel arguments: the kernel reads the
// segment table from device memory (NOTE: [Segment table] in segment_table.h), so one launch
// covers any number of tensors; each block takes one task (a part of a chunk), or, in the
// persistent configuration, loops over tasks (NOTE: [Launch configuration] in multi_segment.h,
// NOTE: [Grid size]).
//
// Tensor lists and their roles (one Segment per tensor):
//   flatten:                  tensor (read, any strides made contiguous by the glue) -> flat (written)
//   unflatten_average_:       flat (read, the allreduced sum)   -> tensor = param (written)
//   unflatten_average_sgd_:   flat (read), grad (read, may be absent), momentum_buf (read
//                             unless first_step, written when momentum != 0) -> param (written)
//   unflatten_average_outer_sgd_: flat (read), anchor = theta0 (read, written), outer_buf (read
//                             unless outer_first_step, written when the outer momentum != 0),
//                             grad / momentum_buf as unflatten_average_sgd_ -> param (written)
//   the unflatten ops, with divergence: param is also read just before it is written, and
//                             (old - average)^2 summed into per-block float64 sums
//                             (NOTE: [Divergence] in csrc/common.h)
//   unflatten_average_(_sgd_) with accumulate: param is read just before it is written, and
//                             the average added to it (NOTE: [Accumulate] in csrc/common.h)
//
// Arithmetic is done in opmath (fp32; fp64 for double) and rounded once when stored.
// Products and sums use __fmul_rn/__fadd_rn so nvcc cannot contract them into FMAs, and results
// match the reference (and the CPU kernel) exactly (NOTE: [No FMA] in csrc/cpu_kernels_impl.h).
#include "multi_segment.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstring>
#include <type_traits>

// NOTE: [Emulated launch] Launches go through PRSGD_LAUNCH so that the host emulation of these
// kernels (tests/cuda_emu/, which compiles this file with g++) can turn them into calls;
// nvcc gets the usual triple-chevron launch.
#ifndef PRSGD_LAUNCH
#define PRSGD_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#endif

namespace prsgd {
namespace cuda {
namespace {

constexpr int kBlockSize = 256;
// At most 2048 resident threads per SM (sm_80/sm_90): an upper bound of any kernel's blocks
// per SM; the grid of each kernel is its measured occupancy (NOTE: [Grid size]).
constexpr int kMaxBlocksPerSm = 2048 / kBlockSize;
// Elements per thread per step: enough for a 16-byte access of the narrowest type a functor
// touches (4 fp32, 8 fp16/bf16; a pair of fp32 flat and fp16 params takes 8, i.e. two 16-byte
// fp32 accesses and one fp16 one), and at least 4 (fp64: two 16-byte accesses).
constexpr int kMinILP = 4;
template <typename T>
constexpr int kVecWidth = 16 / sizeof(T) > kMinILP ? int(16 / sizeof(T)) : kMinILP;
template <typename A, typename B>
constexpr int kILPOf = kVecWidth<A> > kVecWidth<B> ? kVecWidth<A> : kVecWidth<B>;

// NOTE: [Unroll] Memory-bound kernels on an H200 need many bytes in flight per SM (about 4.3 TB/s
// times the loaded DRAM latency, spread over 132 SMs). A thread that loads one 16-byte word per
// stream and then waits has only a few words in flight, and the volatile asm of the vector
// accesses keeps the compiler from overlapping iterations. So a thread issues the loads of
// kUnroll block-wide vector steps before it uses any of them. The count is set per kernel so
// that the words a thread holds (loaded + stored per step, times kUnroll) stay near
// kWordBudget, which keeps registers at or under 64 (4+ resident blocks of 256 threads).
constexpr int kWordBudget = 12;
constexpr int unroll_for(int words_per_step) {
  return words_per_step * 4 <= kWordBudget ? 4 : words_per_step * 2 <= kWordBudget ? 2 : 1;
}

// ---- element conversion and unfused arithmetic -------------------------------------------

template <typename T>
using opmath_t = std::conditional_t<std::is_same<T, double>::value, double, float>;

__device__ __forceinline__ float to_op(float x) { return x; }
__device__ __forceinline__ double to_op(double x) { return x; }
__device__ __forceinline__ float to_op(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_op(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_op(float x);
template <> __device__ __forceinline__ float from_op<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_op<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_op<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <typename T> __device__ __forceinline__ T from_op(double x);
template <> __device__ __forceinline__ double from_op<double>(double x) { return x; }

__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }

// ---- 16-byte global memory words -----------------------------------------------------------

// NOTE: [Vector access] Every vector access is a 16-byte word moved with an explicit
// ld.global.v4.b32 / st.global.v4.b32 on the pointer converted to the global window. Written as
// C++ (a struct of N elements through a cast pointer) the loads became LDG.E.128 but most stores
// did not: the front end splits the struct store into per-element stores and the back end
// re-merges them only for simple addresses, so flatten, the plain average and the SGD param
// store were 4 or 8 narrow stores per word. And the integer cast in is_aligned() hid the global
// address space, leaving generic LD.E/ST.E. The PTX leaves ptxas no choice: 128-bit global
// accesses in every instantiation (scripts/check_cuda_compile.sh asserts it on the SASS).
// On the host (the emulation in tests/cuda_emu/) the words are plain copies, and a misaligned
// word traps as it faults on the GPU (cudaErrorMisalignedAddress).
constexpr int kWordBytes = 16;

// Tells the compiler that p, read from the segment table (so a generic pointer to it), points
// to global memory, so that scalar accesses through it are LDG/STG rather than generic LD/ST.
template <typename T>
__device__ __forceinline__ T* assume_global(T* p) {
#if defined(__CUDA_ARCH__)
  __builtin_assume(__isGlobal(p));
#endif
  return p;
}

__device__ __forceinline__ bool is_word_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kWordBytes == 0;
}

__device__ __forceinline__ uint4 load_word(const void* p) {
  uint4 w;
#if defined(__CUDA_ARCH__)
  asm volatile("ld.global.v4.b32 {%0, %1, %2, %3}, [%4];"
               : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w)
               : "l"(__cvta_generic_to_global(p)));
#else
  if (!is_word_aligned(p)) __trap();
  std::memcpy(&w, p, sizeof(w));
#endif
  return w;
}

__device__ __forceinline__ void store_word(void* p, const uint4& w) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(p)),
               "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w)
               : "memory");
#else
  if (!is_word_aligned(p)) __trap();
  std::memcpy(p, &w, sizeof(w));
#endif
}

// N elements of T: a whole number of 16-byte words (kILPOf guarantees it).
template <typename T, int N>
constexpr int kWordsOf = int(sizeof(T)) * N / kWordBytes;

// out[k] = base[i + k], k < N, as raw elements; base + i must be word-aligned.
template <int N, typename T>
__device__ __forceinline__ void load_raw(T (&out)[N], const T* base, int64_t i) {
  static_assert(sizeof(T) * N % kWordBytes == 0, "a pack is whole 16-byte words");
  uint4 w[kWordsOf<T, N>];
#pragma unroll
  for (int k = 0; k < kWordsOf<T, N>; ++k) w[k] = load_word(base + i + k * (kWordBytes / sizeof(T)));
  std::memcpy(out, w, sizeof(w));
}

// base[i + k] = in[k], k < N, as raw elements; base + i must be word-aligned.
template <int N, typename T>
__device__ __forceinline__ void store_raw(T* base, int64_t i, const T (&in)[N]) {
  static_assert(sizeof(T) * N % kWordBytes == 0, "a pack is whole 16-byte words");
  uint4 w[kWordsOf<T, N>];
  std::memcpy(w, in, sizeof(w));
#pragma unroll
  for (int k = 0; k < kWordsOf<T, N>; ++k) store_word(base + i + k * (kWordBytes / sizeof(T)), w[k]);
}

// out[k] = opmath(base[i + k]), k < N.
template <typename op_t, int N, typename T>
__device__ __forceinline__ void load_pack(op_t (&out)[N], const T* base, int64_t i) {
  T raw[N];
  load_raw(raw, base, i);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_op(raw[k]);
}

// base[i + k] = T(in[k]) (rounded once), k < N.
template <typename T, typename op_t, int N>
__device__ __forceinline__ void store_pack(T* base, int64_t i, const op_t (&in)[N]) {
  T raw[N];
#pragma unroll
  for (int k = 0; k < N; ++k) raw[k] = from_op<T>(in[k]);
  store_raw(base, i, raw);
}

// ---- math --------------------------------------------------------------------------------

template <typename op_t>
struct SgdConsts {
  op_t scale, lr, momentum, one_minus_dampening, weight_decay;
  bool has_weight_decay, has_momentum, nesterov, maximize;
};

template <typename op_t>
SgdConsts<op_t> make_consts(const SgdOptions& h) {
  // Rounded to opmath as torch rounds a Python scalar multiplying an opmath tensor;
  // (1 - dampening) is formed in double first, as in the reference.
  return {op_t(h.scale), op_t(h.lr), op_t(h.momentum), op_t(1.0 - h.dampening),
          op_t(h.weight_decay), h.weight_decay != 0.0, h.momentum != 0.0, h.nesterov,
          h.maximize};
}

// torch.optim.SGD's update applied to the average x (= sum * scale), in the reference's order:
//   d = (maximize ? -g : g) + weight_decay * x
//   buf = first ? d : momentum * buf + (1 - dampening) * d;  d = nesterov ? d + momentum * buf : buf
//   return x - lr * d
template <typename op_t>
__device__ __forceinline__ op_t sgd_math(op_t x, op_t g, op_t& buf, bool first,
                                         const SgdConsts<op_t>& c) {
  op_t d = c.maximize ? -g : g;
  if (c.has_weight_decay) d = add(d, mul(c.weight_decay, x));
  if (c.has_momentum) {
    buf = first ? d : add(mul(buf, c.momentum), mul(c.one_minus_dampening, d));
    d = c.nesterov ? add(d, mul(c.momentum, buf)) : buf;
  }
  return sub(x, mul(c.lr, d));
}

// (old - avg)^2, squared in opmath, added to a float64 sum (NOTE: [Divergence]).
__device__ __forceinline__ void add_square(double& acc, float old_value, float avg) {
  const float d = sub(old_value, avg);
  acc = add(acc, static_cast<double>(mul(d, d)));
}
__device__ __forceinline__ void add_square(double& acc, double old_value, double avg) {
  const double d = sub(old_value, avg);
  acc = add(acc, mul(d, d));
}

// Sum of v over the block, valid in thread 0. Every thread of the block must call it.
__device__ __forceinline__ double block_sum(double v) {
  constexpr int kWarps = kBlockSize / 32;
  __shared__ double warp_sums[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = 0.0;
  if (warp == 0) {
    v = lane < kWarps ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

// ---- functors: one chunk [start, start + len) of one segment ------------------------------
// Each functor gets the thread's float64 sum `acc`; those with kReduces add to it, and the
// kernel then reduces it per block into op.block_sums[blockIdx.x].

template <typename src_t, typename dst_t>
struct FlattenFunctor {
  static constexpr bool kReduces = false;
  // Same dtype: a bit copy. Converting fp16/bf16 to itself through fp32 costs two conversions
  // per element and canonicalises NaN payloads; copy_ (and so the reference) keeps the bits.
  static constexpr bool kCopy = std::is_same<src_t, dst_t>::value;
  static constexpr int kILP = kILPOf<src_t, dst_t>;
  static constexpr int kUnroll = unroll_for(kWordsOf<src_t, kILP> + kWordsOf<dst_t, kILP>);
  // Benchmark-only unroll counts are compiled for this one (NOTE: [Launch configuration]).
  static constexpr bool kTunable = std::is_same<src_t, float>::value && kCopy;
  dst_t* flat;

  // U block-wide vector steps from element i: all loads first, then the stores.
  template <int U>
  __device__ __forceinline__ void vector_steps(const src_t* src, dst_t* dst, int64_t i,
                                               int64_t stride) const {
    src_t raw[U][kILP];
#pragma unroll
    for (int u = 0; u < U; ++u) load_raw(raw[u], src, i + u * stride);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if constexpr (kCopy) {
        store_raw(dst, i + u * stride, raw[u]);
      } else {
        opmath_t<src_t> v[kILP];
#pragma unroll
        for (int k = 0; k < kILP; ++k) v[k] = to_op(raw[u][k]);
        store_pack(dst, i + u * stride, v);
      }
    }
  }

  template <int U>
  __device__ __forceinline__ void run(const Segment& s, int64_t start, int64_t len,
                                      double& /*acc*/) const {
    using op_t = opmath_t<src_t>;
    const src_t* src = assume_global(static_cast<const src_t*>(s.tensor) + start);
    dst_t* dst = assume_global(flat + s.flat_offset + start);
    const int64_t n_vec = (is_word_aligned(src) && is_word_aligned(dst)) ? len / kILP * kILP : 0;
    const int64_t stride = int64_t(blockDim.x) * kILP;
    int64_t i = int64_t(threadIdx.x) * kILP;
    if constexpr (U > 1) {
      for (; i + (U - 1) * stride < n_vec; i += U * stride) vector_steps<U>(src, dst, i, stride);
    }
    for (; i < n_vec; i += stride) vector_steps<1>(src, dst, i, stride);
    // Masked tail: the last len % kILP elements, or the whole task when unaligned.
    for (int64_t i = n_vec + threadIdx.x; i < len; i += blockDim.x) {
      if constexpr (kCopy) {
        dst[i] = src[i];
      } else {
        dst[i] = from_op<dst_t>(static_cast<op_t>(to_op(src[i])));
      }
    }
    // The segment's padding (NOTE: [Segment layout]), by the block that has its last task.
    if (start + len == s.numel) {
      for (int64_t i = threadIdx.x; i < s.flat_pad; i += blockDim.x) dst[len + i] = dst_t{};
    }
  }
};

// kDivergence: NOTE: [Divergence]; kAccumulate: NOTE: [Accumulate] (csrc/common.h), the
// average added to the old param (x = old + flat * scale) before any step. With both false
// this compiles to the plain average / step, with no read of the param; with either, the old
// param is read once.
template <typename flat_t, typename param_t, bool kSgd, bool kDivergence, bool kAccumulate>
struct AverageFunctor {
  static constexpr bool kReduces = kDivergence;
  static constexpr bool kReadParam = kDivergence || kAccumulate;
  using op_t = opmath_t<param_t>;
  static constexpr int kILP = kILPOf<flat_t, param_t>;
  // Words a thread moves per vector step: flat, (old param), (grad, buf) in; param, (buf) out.
  static constexpr int kUnroll =
      unroll_for(kWordsOf<flat_t, kILP> +
                 kWordsOf<param_t, kILP> * (1 + (kReadParam ? 1 : 0) + (kSgd ? 3 : 0)));
  // Benchmark-only unroll counts: for the fp32 average/step, not its accumulate form.
  static constexpr bool kTunable = std::is_same<flat_t, float>::value &&
                                   std::is_same<param_t, float>::value && !kAccumulate;
  const flat_t* flat;
  SgdConsts<op_t> c;
  double* block_sums;  // kDivergence only

  // U block-wide vector steps from element i: every load of the U steps is issued before the
  // first use (NOTE: [Unroll]), then the arithmetic, then the stores.
  template <int U>
  __device__ __forceinline__ void vector_steps(const flat_t* f, param_t* p, const param_t* g,
                                               param_t* b, bool read_buf, bool first, int64_t i,
                                               int64_t stride, double& acc) const {
    flat_t fr[U][kILP];
#pragma unroll
    for (int u = 0; u < U; ++u) load_raw(fr[u], f, i + u * stride);
    param_t old[kReadParam ? U : 1][kILP];
    if constexpr (kReadParam) {
#pragma unroll
      for (int u = 0; u < U; ++u) load_raw(old[u], p, i + u * stride);
    }
    param_t gr[kSgd ? U : 1][kILP], br[kSgd ? U : 1][kILP];
    if constexpr (kSgd) {
      if (g != nullptr) {
#pragma unroll
        for (int u = 0; u < U; ++u) load_raw(gr[u], g, i + u * stride);
        if (read_buf) {
#pragma unroll
          for (int u = 0; u < U; ++u) load_raw(br[u], b, i + u * stride);
        } else {
#pragma unroll
          for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int k = 0; k < kILP; ++k) br[u][k] = param_t{};
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      op_t x[kILP];
#pragma unroll
      for (int k = 0; k < kILP; ++k) x[k] = mul(to_op(fr[u][k]), c.scale);
      if constexpr (kAccumulate) {
#pragma unroll
        for (int k = 0; k < kILP; ++k) x[k] = add(to_op(old[u][k]), x[k]);
      }
      if constexpr (kDivergence) {  // the distance is to x (with kAccumulate, old + average),
                                    // before any step
#pragma unroll
        for (int k = 0; k < kILP; ++k) add_square(acc, to_op(old[u][k]), x[k]);
      }
      if constexpr (kSgd) {
        if (g != nullptr) {
          op_t bv[kILP];
#pragma unroll
          for (int k = 0; k < kILP; ++k) {
            bv[k] = to_op(br[u][k]);  // 0 unless read (sgd_math ignores it on a first step)
            x[k] = sgd_math(x[k], to_op(gr[u][k]), bv[k], first, c);
          }
          if (b) store_pack(b, i + u * stride, bv);
        }
      }
      store_pack(p, i + u * stride, x);
    }
  }

  template <int U>
  __device__ __forceinline__ void run(const Segment& s, int64_t start, int64_t len,
                                      double& acc) const {
    const flat_t* f = assume_global(flat + s.flat_offset + start);
    param_t* p = assume_global(static_cast<param_t*>(s.tensor) + start);
    const param_t* g = (kSgd && s.grad) ? static_cast<const param_t*>(s.grad) + start : nullptr;
    // Offsets are applied only to pointers that are set (null + start is undefined behaviour).
    param_t* b = (g && c.has_momentum && s.momentum_buf)
                     ? static_cast<param_t*>(s.momentum_buf) + start
                     : nullptr;
    const bool first = s.first_step != 0;
    const bool read_buf = b != nullptr && !first;
    const bool aligned = is_word_aligned(f) && is_word_aligned(p) &&
                         (g == nullptr || is_word_aligned(g)) &&
                         (b == nullptr || is_word_aligned(b));
    const int64_t n_vec = aligned ? len / kILP * kILP : 0;
    const int64_t stride = int64_t(blockDim.x) * kILP;
    int64_t i = int64_t(threadIdx.x) * kILP;
    if constexpr (U > 1) {
      for (; i + (U - 1) * stride < n_vec; i += U * stride) {
        vector_steps<U>(f, p, g, b, read_buf, first, i, stride, acc);
      }
    }
    for (; i < n_vec; i += stride) vector_steps<1>(f, p, g, b, read_buf, first, i, stride, acc);
    for (int64_t i = n_vec + threadIdx.x; i < len; i += blockDim.x) {
      op_t x = mul(to_op(f[i]), c.scale);
      if constexpr (kReadParam) {
        const op_t old = to_op(p[i]);
        if constexpr (kAccumulate) x = add(old, x);
        if constexpr (kDivergence) add_square(acc, old, x);
      }
      if (g == nullptr) {
        p[i] = from_op<param_t>(x);
      } else {  // g and b were null-checked, so assumed global only here (the phi forgets it)
        op_t bv = read_buf ? to_op(assume_global(b)[i]) : op_t(0);
        p[i] = from_op<param_t>(sgd_math(x, to_op(assume_global(g)[i]), bv, first, c));
        if (b) assume_global(b)[i] = from_op<param_t>(bv);
      }
    }
  }
};

// The outer round (ops_reference.unflatten_average_outer_sgd_): theta0 (`a`, flat_t) takes the
// outer SGD step on theta0 - average, then the param is the new theta0 or its inner SGD step.
// Whether a segment has an inner grad, and which buffers are read, are per segment at run time
// (a round mixes them), so the only compile-time flag is kDivergence.
template <typename flat_t, typename param_t, bool kDivergence>
struct OuterFunctor {
  static constexpr bool kReduces = kDivergence;
  using op_t = opmath_t<param_t>;
  // One 16-byte word of the narrower type per step, without the other functors' floor of 4
  // elements (kMinILP): fp64 at 4 holds six 2-word streams live at once and spills.
  static constexpr int kILP = int(16 / (sizeof(flat_t) < sizeof(param_t) ? sizeof(flat_t)
                                                                         : sizeof(param_t)));
  // Words a thread moves per vector step: flat, anchor, outer buffer in, anchor and outer
  // buffer out; (old param), grad, inner buffer in, param and inner buffer out.
  static constexpr int kUnroll = unroll_for(kWordsOf<flat_t, kILP> * 5 +
                                            kWordsOf<param_t, kILP> * (4 + (kDivergence ? 1 : 0)));
  static constexpr bool kTunable = false;
  const flat_t* flat;
  SgdConsts<op_t> outer, inner;
  double* block_sums;  // kDivergence only

  // Pointers of one task, offset to its start; null where the segment has no such tensor.
  struct Task {
    const flat_t* f;
    flat_t* a;
    flat_t* ob;
    param_t* p;
    const param_t* g;
    param_t* b;
    bool ofirst, first, read_obuf, read_buf;
  };

  // U block-wide vector steps from element i: every load first (NOTE: [Unroll]), then the
  // arithmetic, then the stores.
  template <int U>
  __device__ __forceinline__ void vector_steps(const Task& t, int64_t i, int64_t stride,
                                               double& acc) const {
    flat_t fr[U][kILP], ar[U][kILP], obr[U][kILP];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      load_raw(fr[u], t.f, i + u * stride);
      load_raw(ar[u], t.a, i + u * stride);
      if (t.read_obuf) {
        load_raw(obr[u], t.ob, i + u * stride);
      } else {
#pragma unroll
        for (int k = 0; k < kILP; ++k) obr[u][k] = flat_t{};
      }
    }
    param_t old[kDivergence ? U : 1][kILP];
    if constexpr (kDivergence) {
#pragma unroll
      for (int u = 0; u < U; ++u) load_raw(old[u], t.p, i + u * stride);
    }
    param_t gr[U][kILP], br[U][kILP];
    if (t.g != nullptr) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        load_raw(gr[u], t.g, i + u * stride);
        if (t.read_buf) {
          load_raw(br[u], t.b, i + u * stride);
        } else {
#pragma unroll
          for (int k = 0; k < kILP; ++k) br[u][k] = param_t{};
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      op_t x[kILP], obv[kILP];
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const op_t y = mul(to_op(fr[u][k]), outer.scale);
        if constexpr (kDivergence) add_square(acc, to_op(old[u][k]), y);
        const op_t theta = to_op(ar[u][k]);
        obv[k] = to_op(obr[u][k]);  // 0 unless read (sgd_math ignores it on a first step)
        x[k] = sgd_math(theta, sub(theta, y), obv[k], t.ofirst, outer);
      }
      store_pack(t.a, i + u * stride, x);
      if (t.ob) store_pack(t.ob, i + u * stride, obv);
      if (t.g != nullptr) {
        op_t bv[kILP];
#pragma unroll
        for (int k = 0; k < kILP; ++k) {
          bv[k] = to_op(br[u][k]);
          x[k] = sgd_math(x[k], to_op(gr[u][k]), bv[k], t.first, inner);
        }
        if (t.b) store_pack(t.b, i + u * stride, bv);
      }
      store_pack(t.p, i + u * stride, x);
    }
  }

  template <int U>
  __device__ __forceinline__ void run(const Segment& s, int64_t start, int64_t len,
                                      double& acc) const {
    Task t;
    t.f = assume_global(flat + s.flat_offset + start);
    t.a = assume_global(static_cast<flat_t*>(s.anchor) + start);
    // Offsets are applied only to pointers that are set (null + start is undefined behaviour).
    t.ob = (outer.has_momentum && s.outer_buf) ? static_cast<flat_t*>(s.outer_buf) + start
                                                : nullptr;
    t.p = assume_global(static_cast<param_t*>(s.tensor) + start);
    t.g = s.grad ? static_cast<const param_t*>(s.grad) + start : nullptr;
    t.b = (t.g && inner.has_momentum && s.momentum_buf)
              ? static_cast<param_t*>(s.momentum_buf) + start
              : nullptr;
    t.ofirst = s.outer_first_step != 0;
    t.first = s.first_step != 0;
    t.read_obuf = t.ob != nullptr && !t.ofirst;
    t.read_buf = t.b != nullptr && !t.first;
    const bool aligned = is_word_aligned(t.f) && is_word_aligned(t.a) && is_word_aligned(t.p) &&
                         (t.ob == nullptr || is_word_aligned(t.ob)) &&
                         (t.g == nullptr || is_word_aligned(t.g)) &&
                         (t.b == nullptr || is_word_aligned(t.b));
    const int64_t n_vec = aligned ? len / kILP * kILP : 0;
    const int64_t stride = int64_t(blockDim.x) * kILP;
    int64_t i = int64_t(threadIdx.x) * kILP;
    if constexpr (U > 1) {
      for (; i + (U - 1) * stride < n_vec; i += U * stride) vector_steps<U>(t, i, stride, acc);
    }
    for (; i < n_vec; i += stride) vector_steps<1>(t, i, stride, acc);
    for (int64_t i = n_vec + threadIdx.x; i < len; i += blockDim.x) {
      const op_t y = mul(to_op(t.f[i]), outer.scale);
      if constexpr (kDivergence) add_square(acc, to_op(t.p[i]), y);
      op_t theta = to_op(t.a[i]);
      // ob, g and b were null-checked, so assumed global only here (the phi forgets it)
      op_t obv = t.read_obuf ? to_op(assume_global(t.ob)[i]) : op_t(0);
      theta = sgd_math(theta, sub(theta, y), obv, t.ofirst, outer);
      t.a[i] = from_op<flat_t>(theta);
      if (t.ob) assume_global(t.ob)[i] = from_op<flat_t>(obv);
      if (t.g != nullptr) {
        op_t bv = t.read_buf ? to_op(assume_global(t.b)[i]) : op_t(0);
        theta = sgd_math(theta, to_op(assume_global(t.g)[i]), bv, t.first, inner);
        if (t.b) assume_global(t.b)[i] = from_op<param_t>(bv);
      }
      t.p[i] = from_op<param_t>(theta);
    }
  }
};

// ---- the kernel --------------------------------------------------------------------------

// Index of the last segment whose chunk_begin <= chunk. Segments are in chunk order and each has
// at least one chunk, so chunk_begin increases strictly. Every lane of a full warp calls it with
// the same arguments: per round the 32 lanes test 32 probes spread over the remaining range, and
// a ballot keeps the part between the last probe at or before the chunk and the next one. A
// table of n segments costs ceil(log32 n) dependent loads (2 for ResNet-50's 161) instead of
// the log2 n (8) of a binary search; each one waits on L2 while the block moves no data.
__device__ __forceinline__ int32_t find_segment(const Segment* __restrict__ table, int32_t n,
                                                int64_t chunk) {
  const int lane = threadIdx.x % 32;
  int32_t lo = 0, hi = n - 1;  // the answer is in [lo, hi]
  while (lo < hi) {
    const int64_t span = hi - lo;
    // probe(k) = lo + ceil((k + 1) * span / 32): nondecreasing in k, in (lo, hi], probe(31) = hi.
    auto probe = [&](int k) { return lo + int32_t((int64_t(k + 1) * span + 31) / 32); };
    const bool before = table[probe(lane)].chunk_begin <= chunk;
    const unsigned ballot = __ballot_sync(0xffffffffu, before);  // lanes 0..k: a prefix
    if (ballot == 0) {
      hi = probe(0) - 1;
    } else {
      const int k = 31 - __clz(ballot);
      const int32_t next_hi = k == 31 ? hi : probe(k + 1) - 1;
      lo = probe(k);
      hi = next_hi;
    }
  }
  return lo;
}

// Task t covers the elements [(t mod 2^split) * (kChunkSize >> split), + kChunkSize >> split)
// of table chunk t >> split (NOTE: [Launch configuration]). Block b takes tasks b,
// b + gridDim.x, ...: one task per block unless the grid is persistent.
template <typename Functor, int kUnroll>
__global__ void __launch_bounds__(kBlockSize)
    multi_segment_kernel(const Segment* __restrict__ table, int32_t num_segments,
                         int64_t num_tasks, int32_t split_log2, Functor op) {
  double acc = 0.0;  // only functors with kReduces touch it; otherwise optimised away
  const int64_t task_size = kChunkSize >> split_log2;
  const int64_t part_mask = (int64_t(1) << split_log2) - 1;
  for (int64_t task = blockIdx.x; task < num_tasks; task += gridDim.x) {
    const int64_t chunk = task >> split_log2;
    const Segment s = table[find_segment(table, num_segments, chunk)];
    const int64_t start = (chunk - s.chunk_begin) * kChunkSize + (task & part_mask) * task_size;
    if (start >= s.numel) continue;  // a task past the end of a short segment (block-uniform)
    const int64_t len = s.numel - start < task_size ? s.numel - start : task_size;
    op.template run<kUnroll>(s, start, len, acc);
  }
  if constexpr (Functor::kReduces) {
    // A fixed grid, a fixed task-to-block map and fixed per-thread orders: the block sums,
    // and so the total, do not depend on scheduling.
    acc = block_sum(acc);
    if (threadIdx.x == 0) op.block_sums[blockIdx.x] = acc;
  }
}

// *out += block_sums[0] + ... + block_sums[n - 1], in a fixed order. One block; each thread
// loads 8 sums before adding them, so that a long list is not one L2 round trip per sum.
__global__ void __launch_bounds__(kBlockSize)
    add_block_sums_kernel(const double* __restrict__ block_sums, int64_t n, double* out) {
  constexpr int kLoads = 8;
  double acc = 0.0;
  for (int64_t base = threadIdx.x; base < n; base += int64_t(blockDim.x) * kLoads) {
    double v[kLoads];
#pragma unroll
    for (int k = 0; k < kLoads; ++k) {
      const int64_t i = base + int64_t(k) * blockDim.x;
      v[k] = i < n ? block_sums[i] : 0.0;
    }
#pragma unroll
    for (int k = 0; k < kLoads; ++k) acc = add(acc, v[k]);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = add(*out, acc);
}

constexpr int kMaxDevices = 64;

// A per-device value computed once by `get` (>= 1; 1 when the query fails).
template <typename Get>
int per_device_cached(std::atomic<int> (&cache)[kMaxDevices], const Get& get) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (dev >= 0 && dev < kMaxDevices) {
    const int cached = cache[dev].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int value = get(dev);
  if (value <= 0) value = 1;
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(value, std::memory_order_relaxed);
  return value;
}

// SM count of the current device (cudaDeviceGetAttribute is not free).
int sm_count() {
  static std::atomic<int> cache[kMaxDevices];
  return per_device_cached(cache, [](int dev) {
    int sms = 0;
    return cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess ? sms
                                                                                            : 1;
  });
}

// NOTE: [Grid size] One block per task (the default, NOTE: [Launch configuration]): the grid
// is the task count, and the hardware starts a block wherever one ends, so no kernel waits on a
// second, partial wave of long-lived blocks. In the persistent configuration the grid is
// exactly as large as can be resident at once (more blocks would run as a second, partial
// wave): each kernel asks the occupancy calculator once per device (a static per template
// instantiation), since register counts differ, and the grid is SMs * that, capped by the task
// count.
template <typename Kernel>
int resident_blocks_per_sm(Kernel kernel) {
  static std::atomic<int> cache[kMaxDevices];
  return per_device_cached(cache, [&](int) {
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &blocks, reinterpret_cast<const void*>(kernel), kBlockSize, 0) != cudaSuccess) {
      (void)cudaGetLastError();  // a failed query must not be reported by the next launch
      return 1;
    }
    return blocks < kMaxBlocksPerSm ? blocks : kMaxBlocksPerSm;
  });
}

int64_t persistent_grid(int64_t num_tasks, int blocks_per_sm) {
  const int64_t max_blocks = int64_t(sm_count()) * blocks_per_sm;
  return num_tasks < max_blocks ? num_tasks : max_blocks;
}

// ---- launch configuration (NOTE: [Launch configuration] in multi_segment.h) -------------------

constexpr LaunchConfig kDefaultLaunch{/*persistent=*/0, /*split_log2=*/2, /*unroll=*/0};

uint32_t encode(const LaunchConfig& c) {
  return uint32_t(c.persistent) | uint32_t(c.split_log2) << 1 | uint32_t(c.unroll) << 4;
}
LaunchConfig decode(uint32_t v) {
  return {int32_t(v & 1u), int32_t((v >> 1) & 7u), int32_t((v >> 4) & 15u)};
}
std::atomic<uint32_t> g_launch_config{encode(kDefaultLaunch)};

// Launches multi_segment_kernel<Functor, U> over `tasks` tasks; *grid_out = the grid used.
template <typename Functor, int U>
cudaError_t launch_unrolled(const Segment* table, int32_t num_segments, int64_t tasks,
                            const LaunchConfig& cfg, const Functor& op, cudaStream_t stream,
                            int64_t* grid_out) {
  constexpr int64_t kMaxGrid = 0x7fffffff;  // gridDim.x's limit; blocks loop over the rest
  const int64_t grid =
      cfg.persistent
          ? persistent_grid(tasks, resident_blocks_per_sm(multi_segment_kernel<Functor, U>))
          : (tasks < kMaxGrid ? tasks : kMaxGrid);
  if (grid_out != nullptr) *grid_out = grid;
  PRSGD_LAUNCH((multi_segment_kernel<Functor, U>), static_cast<unsigned>(grid), kBlockSize,
               stream)(table, num_segments, tasks, cfg.split_log2, op);
  return cudaGetLastError();
}

// Launches multi_segment_kernel<Functor, ...> under the current launch configuration;
// *grid_out = the grid used.
template <typename Functor>
cudaError_t launch(const Segment* table, int32_t num_segments, int64_t num_chunks,
                   const Functor& op, cudaStream_t stream, int64_t* grid_out = nullptr) {
  if (grid_out != nullptr) *grid_out = 0;
  if (num_segments <= 0 || num_chunks <= 0) return cudaSuccess;
  const LaunchConfig cfg = launch_config();
  const int64_t tasks = num_chunks << cfg.split_log2;
  if constexpr (Functor::kTunable) {  // benchmark-only unroll counts
    switch (cfg.unroll) {
      case 1: return launch_unrolled<Functor, 1>(table, num_segments, tasks, cfg, op, stream, grid_out);
      case 2: return launch_unrolled<Functor, 2>(table, num_segments, tasks, cfg, op, stream, grid_out);
      case 4: return launch_unrolled<Functor, 4>(table, num_segments, tasks, cfg, op, stream, grid_out);
      default: break;
    }
  }
  return launch_unrolled<Functor, Functor::kUnroll>(table, num_segments, tasks, cfg, op, stream,
                                                    grid_out);
}

// Calls f(T{}) for the device type of a dtype; false if unknown.
template <typename F>
bool dispatch(DType t, const F& f) {
  switch (t) {
    case DType::kFloat32: f(float{}); return true;
    case DType::kFloat16: f(__half{}); return true;
    case DType::kBFloat16: f(__nv_bfloat16{}); return true;
    case DType::kFloat64: f(double{}); return true;
  }
  return false;
}

template <typename T>
constexpr bool is_reduced = std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;

}  // namespace

cudaError_t launch_flatten(DType src, DType dst, const Segment* table, int32_t num_segments,
                           int64_t num_chunks, void* flat, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  dispatch(src, [&](auto src_tag) {
    dispatch(dst, [&](auto dst_tag) {
      using src_t = decltype(src_tag);
      using dst_t = decltype(dst_tag);
      constexpr bool same = std::is_same<src_t, dst_t>::value;
      constexpr bool via_fp32 = !std::is_same<src_t, double>::value &&
                                !std::is_same<dst_t, double>::value;
      if constexpr (same || via_fp32) {
        err = launch(table, num_segments, num_chunks,
                     FlattenFunctor<src_t, dst_t>{static_cast<dst_t*>(flat)}, stream);
      }
    });
  });
  return err;
}

int64_t divergence_scratch_size(int64_t num_chunks) {
  // Every configuration's grid is at most its task count, which is at most this.
  return num_chunks > 0 ? num_chunks << kMaxSplitLog2 : 0;
}

LaunchConfig default_launch_config() { return kDefaultLaunch; }

LaunchConfig launch_config() { return decode(g_launch_config.load(std::memory_order_relaxed)); }

bool set_launch_config(const LaunchConfig& config) {
  const bool ok = (config.persistent == 0 || config.persistent == 1) && config.split_log2 >= 0 &&
                  config.split_log2 <= kMaxSplitLog2 &&
                  (config.unroll == 0 || config.unroll == 1 || config.unroll == 2 ||
                   config.unroll == 4);
  if (ok) g_launch_config.store(encode(config), std::memory_order_relaxed);
  return ok;
}

cudaError_t launch_unflatten_average(DType flat_dtype, DType param_dtype, const Segment* table,
                                     int32_t num_segments, int64_t num_chunks, const void* flat,
                                     const SgdOptions& options, bool sgd, bool accumulate,
                                     double* divergence, double* block_sums,
                                     cudaStream_t stream) {
  if (divergence != nullptr && block_sums == nullptr) return cudaErrorInvalidValue;
  cudaError_t err = cudaErrorInvalidValue;
  dispatch(flat_dtype, [&](auto flat_tag) {
    dispatch(param_dtype, [&](auto param_tag) {
      using flat_t = decltype(flat_tag);
      using param_t = decltype(param_tag);
      using op_t = opmath_t<param_t>;
      if constexpr (std::is_same<flat_t, param_t>::value ||
                    (std::is_same<flat_t, float>::value && is_reduced<param_t>)) {
        const auto* f = static_cast<const flat_t*>(flat);
        const SgdConsts<op_t> c = make_consts<op_t>(options);
        int64_t grid = 0;
        auto run = [&](auto sgd_tag, auto divergence_tag) {
          auto with = [&](auto accumulate_tag) {
            using Op = AverageFunctor<flat_t, param_t, decltype(sgd_tag)::value,
                                      decltype(divergence_tag)::value,
                                      decltype(accumulate_tag)::value>;
            return launch(table, num_segments, num_chunks, Op{f, c, block_sums}, stream, &grid);
          };
          return accumulate ? with(std::true_type{}) : with(std::false_type{});
        };
        using yes = std::true_type;
        using no = std::false_type;
        if (divergence == nullptr) {
          err = sgd ? run(yes{}, no{}) : run(no{}, no{});
        } else {
          err = sgd ? run(yes{}, yes{}) : run(no{}, yes{});
          if (err == cudaSuccess && grid > 0) {  // the first `grid` block sums were written
            PRSGD_LAUNCH(add_block_sums_kernel, 1u, kBlockSize, stream)(block_sums, grid, divergence);
            err = cudaGetLastError();
          }
        }
      }
    });
  });
  return err;
}

cudaError_t launch_unflatten_average_outer(DType flat_dtype, DType param_dtype,
                                           const Segment* table, int32_t num_segments,
                                           int64_t num_chunks, const void* flat,
                                           const SgdOptions& outer, const SgdOptions& inner,
                                           double* divergence, double* block_sums,
                                           cudaStream_t stream) {
  if (divergence != nullptr && block_sums == nullptr) return cudaErrorInvalidValue;
  cudaError_t err = cudaErrorInvalidValue;
  dispatch(flat_dtype, [&](auto flat_tag) {
    dispatch(param_dtype, [&](auto param_tag) {
      using flat_t = decltype(flat_tag);
      using param_t = decltype(param_tag);
      using op_t = opmath_t<param_t>;
      if constexpr (std::is_same<flat_t, param_t>::value ||
                    (std::is_same<flat_t, float>::value && is_reduced<param_t>)) {
        const auto* f = static_cast<const flat_t*>(flat);
        const SgdConsts<op_t> oc = make_consts<op_t>(outer), ic = make_consts<op_t>(inner);
        int64_t grid = 0;
        if (divergence == nullptr) {
          err = launch(table, num_segments, num_chunks,
                       OuterFunctor<flat_t, param_t, false>{f, oc, ic, nullptr}, stream, &grid);
        } else {
          err = launch(table, num_segments, num_chunks,
                       OuterFunctor<flat_t, param_t, true>{f, oc, ic, block_sums}, stream, &grid);
          if (err == cudaSuccess && grid > 0) {  // the first `grid` block sums were written
            PRSGD_LAUNCH(add_block_sums_kernel, 1u, kBlockSize, stream)(block_sums, grid, divergence);
            err = cudaGetLastError();
          }
        }
      }
    });
  });
  return err;
}

}  // namespace cuda
}  // namespace prsgd
