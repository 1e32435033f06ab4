// CUDA implementations of the prsgd_hvd ops: the checked segment lists of common.cpp (shared
// with CPU) grouped into segment tables with a device-side cache, and calls into the torch-free
// launchers of kernels.cu on the current stream. Compiled only in CUDA builds (setup.py /
// CMakeLists.txt).
#include "common.h"
#include "cuda/multi_segment.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <list>
#include <mutex>
#include <vector>

namespace prsgd {
namespace {

using cuda::DType;
using cuda::Segment;

DType to_dtype(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "prsgd_hvd: internal error: unchecked dtype ", t);
  }
}

// NOTE: [Segment table cache] A training loop calls the ops with the same tensors every round,
// so the table (data pointers, sizes, offsets, first_step) is identical from round to round.
// The last kMaxEntries tables are kept on the device, keyed by their exact bytes and device,
// and reused without any host-to-device copy. A different table (new parameter set, grads
// reallocated by zero_grad(set_to_none=True), first_step flipping) costs one small
// asynchronous upload from pinned memory. kMaxEntries is far above the tables of one round
// (one per op, dtype and bucket), so a round never evicts a table it needs again.
//  - Streams: the upload is ordered before the kernel on the stream that missed; an event
//    recorded after it makes every other stream that later hits the entry wait for it (a
//    kernel on a second stream would otherwise read the table while the copy may still be
//    queued behind other work on the first). Device copies come from the caching allocator
//    and are recorded on every stream that uses them, so evicting one never frees memory a
//    queued kernel still reads.
//  - NOTE: [Tables in CUDA graphs] A captured kernel reads its table's device memory at every
//    replay, so that memory must never be freed or rewritten while the graph lives, and a copy
//    captured from a reused pinned staging buffer would replay whatever the buffer holds by
//    then. So while the current stream captures, the cache is only read: a hit whose upload
//    has completed is pinned (never evicted, for the life of the process) and used; a miss, or
//    an upload still in flight, is refused with an error that says to run the same call once
//    before capturing (the warm-up torch.cuda.graphs asks for anyway) and synchronize.
class TableCache {
 public:
  const Segment* get(std::vector<Segment> host, c10::DeviceIndex device,
                     const c10::cuda::CUDAStream& stream) {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t bytes = host.size() * sizeof(Segment);
    const uint64_t key = hash(host.data(), bytes);
    const bool capturing = is_capturing(stream);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->key == key && it->device == device && it->host.size() == host.size() &&
          std::memcmp(it->host.data(), host.data(), bytes) == 0) {
        entries_.splice(entries_.begin(), entries_, it);  // most recently used first
        Entry& e = entries_.front();
        if (capturing) return use_in_capture(e);
        if (e.upload_stream != stream) {
          C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), e.uploaded, 0));
        }
        return use(e, stream);
      }
    }
    TORCH_CHECK(!capturing,
                "prsgd_hvd: a CUDA graph is being captured, and the segment table of this call "
                "(its tensors, their data pointers, first_step) is not on the device yet. Run "
                "the same call once before capturing (a warm-up iteration) and synchronize.");
    at::Tensor staging = at::empty({static_cast<int64_t>(bytes)},
                                   at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(staging.data_ptr(), host.data(), bytes);
    at::Tensor dev = at::empty({static_cast<int64_t>(bytes)},
                               at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
    // Non-blocking from pinned memory: the host allocator keeps `staging` alive until the
    // copy has run, and the copy is ordered before our kernel on the current stream.
    dev.copy_(staging, /*non_blocking=*/true);
    cudaEvent_t uploaded = nullptr;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&uploaded, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(uploaded, stream.stream()));
    entries_.push_front(Entry{key, device, std::move(host), std::move(dev), uploaded, stream});
    evict();
    return use(entries_.front(), stream);
  }

 private:
  static constexpr size_t kMaxEntries = 256;
  struct Entry {
    uint64_t key;
    c10::DeviceIndex device;
    std::vector<Segment> host;
    at::Tensor dev;
    cudaEvent_t uploaded;  // recorded on upload_stream right after the copy
    c10::cuda::CUDAStream upload_stream;
    bool pinned = false;   // used by a captured graph: never evicted
  };

  static uint64_t hash(const void* data, size_t bytes) {  // FNV-1a: cheap, tables are small
    uint64_t h = 1469598103934665603ull;
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ull;
    return h;
  }

  static bool is_capturing(const c10::cuda::CUDAStream& stream) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));
    return status != cudaStreamCaptureStatusNone;
  }

  // Drops the least recently used unpinned entries beyond kMaxEntries.
  void evict() {
    size_t unpinned = 0;
    for (const Entry& e : entries_) unpinned += e.pinned ? 0 : 1;
    for (auto it = entries_.end(); unpinned > kMaxEntries && it != entries_.begin();) {
      --it;
      if (it->pinned) continue;
      // Destroying an event with work pending is allowed: it is released once that completes.
      C10_CUDA_CHECK(cudaEventDestroy(it->uploaded));
      it = entries_.erase(it);
      --unpinned;
    }
  }

  static const Segment* use(Entry& e, const c10::cuda::CUDAStream& stream) {
    c10::cuda::CUDACachingAllocator::recordStream(e.dev.storage().data_ptr(), stream);
    return static_cast<const Segment*>(e.dev.const_data_ptr());
  }

  static const Segment* use_in_capture(Entry& e) {
    // Querying an event recorded outside the capture is legal in relaxed mode only.
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    const cudaError_t done = cudaEventQuery(e.uploaded);
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    if (done == cudaErrorNotReady) (void)cudaGetLastError();
    TORCH_CHECK(done == cudaSuccess,
                "prsgd_hvd: a CUDA graph is being captured, and the segment table of this call "
                "is still being uploaded from an earlier call; synchronize before capturing.");
    e.pinned = true;
    return static_cast<const Segment*>(e.dev.const_data_ptr());
  }

  std::mutex mu_;
  std::list<Entry> entries_;
};

TableCache& table_cache() {
  // Leaked on purpose: device tensors must not be freed during static destruction, after the
  // CUDA runtime may have shut down.
  static TableCache* cache = new TableCache();
  return *cache;
}

using cuda::SegmentGroup;
using cuda::SegmentGroups;
using cuda::kNumDTypes;

// For each non-empty group: its table on the device (cached), then
// launch(group dtype, table, segments, chunks), a launcher's cudaError_t, checked.
template <typename Launch>
void launch_groups(SegmentGroups& groups, c10::DeviceIndex device,
                   const c10::cuda::CUDAStream& stream, const Launch& launch) {
  for (size_t d = 0; d < kNumDTypes; ++d) {
    SegmentGroup& g = groups[d];
    if (g.segments.empty()) continue;
    const int32_t n = static_cast<int32_t>(g.segments.size());
    const Segment* table = table_cache().get(std::move(g.segments), device, stream);
    C10_CUDA_CHECK(launch(static_cast<DType>(d), table, n, g.chunks));
  }
}

// The CUDA kernels of every op (DeviceOps in common.h): the call's segments grouped by dtype
// into segment tables (NOTE: [Segment table]), one launch per non-empty group.
struct CudaKernels {
  static void flatten(FlattenCall& call) {
    const at::Tensor& out = call.out;
    const c10::cuda::CUDAGuard guard(out.device());
    SegmentGroups groups;
    for (const FlattenSegment& s : call.segments) {
      groups[static_cast<size_t>(to_dtype(s.src_type))].add(
          const_cast<void*>(s.src), nullptr, nullptr, s.flat_offset, s.numel, s.pad, false);
    }
    const auto stream = c10::cuda::getCurrentCUDAStream();  // what at::cuda:: aliases
    launch_groups(groups, out.device().index(), stream,
                  [&](DType src, const Segment* table, int32_t n, int64_t chunks) {
                    return cuda::launch_flatten(src, to_dtype(out.scalar_type()), table, n,
                                                chunks, out.data_ptr(), stream.stream());
                  });
  }

  static void unflatten(const at::Tensor& flat, UnflattenCall& call) {
    const c10::cuda::CUDAGuard guard(flat.device());
    SegmentGroups groups;
    for (const ParamSegment& s : call.segments) {
      // The unflatten kernels never touch the padding: pad 0 keeps one table per param list.
      groups[static_cast<size_t>(to_dtype(s.param_type))].add(
          s.param, s.grad, s.momentum_buf, s.flat_offset, s.numel, 0, s.first_step);
    }
    const auto stream = c10::cuda::getCurrentCUDAStream();  // what at::cuda:: aliases
    // NOTE: [Divergence] (common.h): one block-sum scratch buffer, from the caching allocator,
    // shared by the dtype groups' launches, which run in order on this stream.
    at::Tensor block_sums;
    if (call.divergence != nullptr) {
      int64_t scratch = 0;
      for (const SegmentGroup& g : groups) {
        scratch = std::max(scratch, cuda::divergence_scratch_size(g.chunks));
      }
      if (scratch == 0) return;  // no elements: nothing to add
      block_sums = at::empty({scratch}, flat.options().dtype(at::kDouble));
    }
    double* sums = call.divergence != nullptr ? block_sums.data_ptr<double>() : nullptr;
    launch_groups(groups, flat.device().index(), stream,
                  [&](DType param, const Segment* table, int32_t n, int64_t chunks) {
                    return cuda::launch_unflatten_average(
                        to_dtype(flat.scalar_type()), param, table, n, chunks,
                        flat.const_data_ptr(), call.options, call.sgd, call.accumulate,
                        call.divergence, sums, stream.stream());
                  });
  }

  // The outer round: the same grouping (by param dtype) and divergence scratch as unflatten.
  static void unflatten_outer(const at::Tensor& flat, OuterUnflattenCall& call) {
    const c10::cuda::CUDAGuard guard(flat.device());
    SegmentGroups groups;
    for (const OuterParamSegment& o : call.segments) {
      const ParamSegment& s = o.inner;
      groups[static_cast<size_t>(to_dtype(s.param_type))].add_outer(
          s.param, s.grad, s.momentum_buf, o.anchor, o.outer_buf, s.flat_offset, s.numel,
          s.first_step, o.outer_first);
    }
    const auto stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor block_sums;
    if (call.divergence != nullptr) {
      int64_t scratch = 0;
      for (const SegmentGroup& g : groups) {
        scratch = std::max(scratch, cuda::divergence_scratch_size(g.chunks));
      }
      if (scratch == 0) return;  // no elements: nothing to add or write
      block_sums = at::empty({scratch}, flat.options().dtype(at::kDouble));
    }
    double* sums = call.divergence != nullptr ? block_sums.data_ptr<double>() : nullptr;
    launch_groups(groups, flat.device().index(), stream,
                  [&](DType param, const Segment* table, int32_t n, int64_t chunks) {
                    return cuda::launch_unflatten_average_outer(
                        to_dtype(flat.scalar_type()), param, table, n, chunks,
                        flat.const_data_ptr(), call.outer, call.inner, call.divergence, sums,
                        stream.stream());
                  });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(prsgd_hvd, CUDA, m) { DeviceOps<CudaKernels>::register_impls(m); }

// NOTE: [Launch configuration] (cuda/multi_segment.h) for benchmarks and tests, in a namespace
// of its own so that it is no part of the ops' API: [persistent, split_log2, unroll] now;
// set_launch_config raises on a value out of range.
TORCH_LIBRARY(prsgd_hvd_cuda, m) {
  m.def("launch_config() -> int[]", [] {
    const cuda::LaunchConfig c = cuda::launch_config();
    return std::vector<int64_t>{c.persistent, c.split_log2, c.unroll};
  });
  m.def("default_launch_config() -> int[]", [] {
    const cuda::LaunchConfig c = cuda::default_launch_config();
    return std::vector<int64_t>{c.persistent, c.split_log2, c.unroll};
  });
  m.def("set_launch_config(int persistent, int split_log2, int unroll) -> ()",
        [](int64_t persistent, int64_t split_log2, int64_t unroll) {
          TORCH_CHECK(cuda::set_launch_config({static_cast<int32_t>(persistent),
                                               static_cast<int32_t>(split_log2),
                                               static_cast<int32_t>(unroll)}),
                      "prsgd_hvd_cuda.set_launch_config: persistent must be 0 or 1, split_log2 "
                      "0..", cuda::kMaxSplitLog2, ", unroll 0, 1, 2 or 4; got ", persistent, ", ",
                      split_log2, ", ", unroll);
        });
}

}  // namespace prsgd
