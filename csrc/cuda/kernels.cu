// Multi-tensor CUDA kernels of prsgd_hvd (torch-free: raw pointers and a cudaStream_t).
//
// Structure after PyTorch's MultiTensorApply.cuh / FusedSgdKernel.cu and apex's
// multi_tensor_sgd_kernel.cu: a small *_math device helper holds the arithmetic, one functor per
// op maps it over a chunk of one tensor, and one generic kernel hands chunks to blocks. Unlike
// MultiTensorApply the tensor list is not packed into kernel arguments: the kernel reads the
// segment table from device memory (NOTE: [Segment table] in multi_segment.h), so one launch
// covers any number of tensors, and a persistent grid sized to the SM count loops over chunks.
//
// Tensor lists and their roles (one Segment per tensor):
//   flatten:                  tensor (read, any strides made contiguous by the glue) -> flat (written)
//   unflatten_average_:       flat (read, the allreduced sum)   -> tensor = param (written)
//   unflatten_average_sgd_:   flat (read), grad (read, may be absent), momentum_buf (read
//                             unless first_step, written when momentum != 0) -> param (written)
//   both unflatten ops, with divergence: param is also read just before it is written, and
//                             (old - average)^2 summed into per-block float64 sums
//                             (NOTE: [Divergence] in csrc/common.h)
//
// Arithmetic is done in opmath (fp32; fp64 for double) and rounded once when stored.
// NOTE: [No FMA] (see csrc/cpu_ops.cpp): products and sums use __fmul_rn/__fadd_rn so nvcc
// cannot contract them into FMAs, and results match the reference (and the CPU kernel) exactly.
#include "multi_segment.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <type_traits>

namespace prsgd {
namespace cuda {
namespace {

constexpr int kBlockSize = 256;
constexpr int kBlocksPerSm = 8;  // 2048 resident threads per SM on sm_80/sm_90
// Elements per thread per step: enough for a 16-byte access of the narrowest type a functor
// touches (4 fp32, 8 fp16/bf16; a pair of fp32 flat and fp16 params takes 8, i.e. two 16-byte
// fp32 accesses and one fp16 one), and at least 4 (fp64: two 16-byte accesses).
constexpr int kMinILP = 4;
template <typename T>
constexpr int kVecWidth = 16 / sizeof(T) > kMinILP ? int(16 / sizeof(T)) : kMinILP;
template <typename A, typename B>
constexpr int kILPOf = kVecWidth<A> > kVecWidth<B> ? kVecWidth<A> : kVecWidth<B>;

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

// ---- vector loads ------------------------------------------------------------------------

// N elements of T, aligned for 16-byte accesses (or to its size, when smaller).
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(Pack<T, N>) == 0;
}

// out[k] = base[i + k], k < N, in 16-byte vector loads; base + i must be aligned.
template <typename op_t, int N, typename T>
__device__ __forceinline__ void load_pack(op_t (&out)[N], const T* base, int64_t i) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(base + i);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_op(pk.v[k]);
}

// base[i + k] = in[k], k < N; base + i must be aligned.
// NOTE: the PTX of several instantiations (e.g. unflatten_average_ fp32, already before the
// per-type ILP) shows this struct store split into per-element stores while the loads stay
// vectorized; building uint4 words in registers did not change that. Not yet understood.
template <typename T, typename op_t, int N>
__device__ __forceinline__ void store_pack(T* base, int64_t i, const op_t (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int k = 0; k < N; ++k) pk.v[k] = from_op<T>(in[k]);
  *reinterpret_cast<Pack<T, N>*>(base + i) = pk;
}

// ---- math --------------------------------------------------------------------------------

template <typename op_t>
struct SgdConsts {
  op_t scale, lr, momentum, one_minus_dampening, weight_decay;
  bool has_weight_decay, has_momentum, nesterov, maximize;
};

template <typename op_t>
SgdConsts<op_t> make_consts(const SgdHyper& h) {
  // Rounded to opmath as torch rounds a Python scalar multiplying an opmath tensor;
  // (1 - dampening) is formed in double first, as in the reference.
  return {op_t(h.scale), op_t(h.lr), op_t(h.momentum), op_t(1.0 - h.dampening),
          op_t(h.weight_decay), h.weight_decay != 0.0, h.momentum != 0.0, h.nesterov != 0,
          h.maximize != 0};
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
  dst_t* flat;

  __device__ __forceinline__ void operator()(const Segment& s, int64_t start, int64_t len,
                                             double& /*acc*/) const {
    using op_t = std::conditional_t<std::is_same<src_t, double>::value, double, float>;
    const src_t* src = static_cast<const src_t*>(s.tensor) + start;
    dst_t* dst = flat + s.flat_offset + start;
    constexpr int kILP = kILPOf<src_t, dst_t>;
    const int64_t n_vec =
        (is_aligned<kILP>(src) && is_aligned<kILP>(dst)) ? len / kILP * kILP : 0;
    for (int64_t i = int64_t(threadIdx.x) * kILP; i < n_vec; i += int64_t(blockDim.x) * kILP) {
      op_t v[kILP];
      load_pack(v, src, i);
      store_pack(dst, i, v);
    }
    // Masked tail: the last len % kILP elements, or the whole chunk when unaligned.
    for (int64_t i = n_vec + threadIdx.x; i < len; i += blockDim.x) {
      dst[i] = from_op<dst_t>(static_cast<op_t>(to_op(src[i])));
    }
  }
};

// kDivergence: NOTE: [Divergence]; false compiles to the plain average / step, with no read
// of the param.
template <typename flat_t, typename param_t, bool kSgd, bool kDivergence>
struct AverageFunctor {
  static constexpr bool kReduces = kDivergence;
  using op_t = opmath_t<param_t>;
  const flat_t* flat;
  SgdConsts<op_t> c;
  double* block_sums;  // kDivergence only

  __device__ __forceinline__ void operator()(const Segment& s, int64_t start, int64_t len,
                                             double& acc) const {
    const flat_t* f = flat + s.flat_offset + start;
    param_t* p = static_cast<param_t*>(s.tensor) + start;
    const param_t* g = (kSgd && s.grad) ? static_cast<const param_t*>(s.grad) + start : nullptr;
    param_t* b = (g && c.has_momentum) ? static_cast<param_t*>(s.momentum_buf) + start : nullptr;
    const bool first = s.first_step != 0;
    const bool read_buf = b != nullptr && !first;
    constexpr int kILP = kILPOf<flat_t, param_t>;
    const bool aligned = is_aligned<kILP>(f) && is_aligned<kILP>(p) &&
                         (g == nullptr || is_aligned<kILP>(g)) &&
                         (b == nullptr || is_aligned<kILP>(b));
    const int64_t n_vec = aligned ? len / kILP * kILP : 0;

    for (int64_t i = int64_t(threadIdx.x) * kILP; i < n_vec; i += int64_t(blockDim.x) * kILP) {
      op_t x[kILP];
      load_pack(x, f, i);
#pragma unroll
      for (int k = 0; k < kILP; ++k) x[k] = mul(x[k], c.scale);
      if constexpr (kDivergence) {  // the distance is to the average, before any step
        op_t old[kILP];
        load_pack(old, p, i);
#pragma unroll
        for (int k = 0; k < kILP; ++k) add_square(acc, old[k], x[k]);
      }
      if (g != nullptr) {
        op_t gv[kILP], bv[kILP] = {};
        load_pack(gv, g, i);
        if (read_buf) load_pack(bv, b, i);
#pragma unroll
        for (int k = 0; k < kILP; ++k) x[k] = sgd_math(x[k], gv[k], bv[k], first, c);
        if (b) store_pack(b, i, bv);
      }
      store_pack(p, i, x);
    }
    for (int64_t i = n_vec + threadIdx.x; i < len; i += blockDim.x) {
      const op_t x = mul(to_op(f[i]), c.scale);
      if constexpr (kDivergence) add_square(acc, to_op(p[i]), x);
      if (g == nullptr) {
        p[i] = from_op<param_t>(x);
      } else {
        op_t bv = read_buf ? to_op(b[i]) : op_t(0);
        p[i] = from_op<param_t>(sgd_math(x, to_op(g[i]), bv, first, c));
        if (b) b[i] = from_op<param_t>(bv);
      }
    }
  }
};

// ---- the kernel --------------------------------------------------------------------------

// Block b handles chunks b, b + gridDim.x, ...; a chunk's segment is the last one whose
// chunk_begin is <= the chunk index (binary search over the table; every thread of the block
// reads the same entries, which the cache broadcasts).
template <typename Functor>
__global__ void __launch_bounds__(kBlockSize)
    multi_segment_kernel(const Segment* __restrict__ table, int32_t num_segments,
                         int64_t num_chunks, Functor op) {
  double acc = 0.0;  // only functors with kReduces touch it; otherwise optimised away
  for (int64_t chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
    int32_t lo = 0, hi = num_segments - 1;
    while (lo < hi) {
      const int32_t mid = lo + (hi - lo + 1) / 2;
      if (table[mid].chunk_begin <= chunk) lo = mid; else hi = mid - 1;
    }
    const Segment s = table[lo];
    const int64_t start = (chunk - s.chunk_begin) * kChunkSize;
    const int64_t len = s.numel - start < kChunkSize ? s.numel - start : kChunkSize;
    op(s, start, len, acc);
  }
  if constexpr (Functor::kReduces) {
    // A fixed grid, a fixed chunk-to-block map and fixed per-thread orders: the block sums,
    // and so the total, do not depend on scheduling.
    acc = block_sum(acc);
    if (threadIdx.x == 0) op.block_sums[blockIdx.x] = acc;
  }
}

// *out += block_sums[0] + ... + block_sums[n - 1], in a fixed order. One block.
__global__ void __launch_bounds__(kBlockSize)
    add_block_sums_kernel(const double* __restrict__ block_sums, int64_t n, double* out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc = add(acc, block_sums[i]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = add(*out, acc);
}

// SM count of the current device, cached per device (cudaDeviceGetAttribute is not free).
int sm_count() {
  static std::atomic<int> cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (dev < 64) {
    const int cached = cache[dev].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      sms <= 0) {
    sms = 1;
  }
  if (dev < 64) cache[dev].store(sms, std::memory_order_relaxed);
  return sms;
}

// Persistent grid: at most kBlocksPerSm blocks per SM, never more blocks than chunks.
int64_t grid_size(int64_t num_chunks) {
  const int64_t max_blocks = int64_t(sm_count()) * kBlocksPerSm;
  return num_chunks < max_blocks ? num_chunks : max_blocks;
}

template <typename Functor>
cudaError_t launch(const Segment* table, int32_t num_segments, int64_t num_chunks,
                   const Functor& op, cudaStream_t stream) {
  if (num_segments <= 0 || num_chunks <= 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(grid_size(num_chunks));
  multi_segment_kernel<<<grid, kBlockSize, 0, stream>>>(table, num_segments, num_chunks, op);
  return cudaGetLastError();
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
  return num_chunks > 0 ? grid_size(num_chunks) : 0;
}

cudaError_t launch_unflatten_average(DType flat_dtype, DType param_dtype, const Segment* table,
                                     int32_t num_segments, int64_t num_chunks, const void* flat,
                                     const SgdHyper& hyper, bool sgd, double* divergence,
                                     double* block_sums, cudaStream_t stream) {
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
        const SgdConsts<op_t> c = make_consts<op_t>(hyper);
        auto run = [&](auto sgd_tag, auto divergence_tag) {
          using Op = AverageFunctor<flat_t, param_t, decltype(sgd_tag)::value,
                                    decltype(divergence_tag)::value>;
          return launch(table, num_segments, num_chunks, Op{f, c, block_sums}, stream);
        };
        using yes = std::true_type;
        using no = std::false_type;
        if (divergence == nullptr) {
          err = sgd ? run(yes{}, no{}) : run(no{}, no{});
        } else {
          err = sgd ? run(yes{}, yes{}) : run(no{}, yes{});
          if (err == cudaSuccess && num_segments > 0 && num_chunks > 0) {
            add_block_sums_kernel<<<1, kBlockSize, 0, stream>>>(block_sums,
                                                               grid_size(num_chunks), divergence);
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
