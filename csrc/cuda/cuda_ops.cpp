// CUDA implementations of the prsgd_hvd ops: argument checks (shared with CPU, common.cpp),
// segment tables with a device-side cache, and calls into the torch-free launchers of
// kernels.cu on the current stream. Compiled only in CUDA builds (setup.py / CMakeLists.txt).
#include "common.h"
#include "cuda/multi_segment.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
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
// asynchronous upload from pinned memory. Device copies come from the caching allocator and
// are recorded on every stream that uses them, so evicting one never frees memory a queued
// kernel still reads.
class TableCache {
 public:
  const Segment* get(std::vector<Segment> host, c10::DeviceIndex device,
                     const c10::cuda::CUDAStream& stream) {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t bytes = host.size() * sizeof(Segment);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->device == device && it->host.size() == host.size() &&
          std::memcmp(it->host.data(), host.data(), bytes) == 0) {
        entries_.splice(entries_.begin(), entries_, it);  // most recently used first
        return use(entries_.front(), stream);
      }
    }
    at::Tensor staging = at::empty({static_cast<int64_t>(bytes)},
                                   at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(staging.data_ptr(), host.data(), bytes);
    at::Tensor dev = at::empty({static_cast<int64_t>(bytes)},
                               at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
    // Non-blocking from pinned memory: the host allocator keeps `staging` alive until the
    // copy has run, and the copy is ordered before our kernel on the current stream.
    dev.copy_(staging, /*non_blocking=*/true);
    entries_.push_front(Entry{device, std::move(host), std::move(dev)});
    if (entries_.size() > kMaxEntries) entries_.pop_back();
    return use(entries_.front(), stream);
  }

 private:
  static constexpr size_t kMaxEntries = 16;
  struct Entry {
    c10::DeviceIndex device;
    std::vector<Segment> host;
    at::Tensor dev;
  };

  static const Segment* use(Entry& e, const c10::cuda::CUDAStream& stream) {
    c10::cuda::CUDACachingAllocator::recordStream(e.dev.storage().data_ptr(), stream);
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

// Segments of one dtype (source dtype for flatten, param dtype for the unflatten ops).
struct Group {
  std::vector<Segment> segments;
  int64_t chunks = 0;
  void add(void* tensor, const void* grad, void* buf, int64_t flat_offset, int64_t numel,
           bool first) {
    Segment s{};
    s.tensor = tensor;
    s.grad = grad;
    s.momentum_buf = buf;
    s.flat_offset = flat_offset;
    s.numel = numel;
    s.chunk_begin = chunks;
    s.first_step = first ? 1 : 0;
    s.reserved = 0;
    segments.push_back(s);
    chunks += cuda::chunks_of(numel);
  }
};

constexpr size_t kNumDTypes = 4;

at::Tensor flatten_cuda(at::TensorList tensors, const c10::optional<at::Tensor>& out) {
  const auto offsets = segment_offsets(tensors);
  at::Tensor result = flatten_prepare_out(tensors, out, offsets.back());
  const c10::cuda::CUDAGuard guard(result.device());
  std::array<Group, kNumDTypes> groups;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    if (t.is_contiguous() && is_kernel_cast(t.scalar_type(), result.scalar_type())) {
      groups[static_cast<size_t>(to_dtype(t.scalar_type()))].add(
          const_cast<void*>(t.const_data_ptr()), nullptr, nullptr, offsets[i], t.numel(), false);
    } else {  // strided sources and casts to/from fp64: torch's copy kernel, still one pass
      result.narrow(0, offsets[i], t.numel()).view(t.sizes()).copy_(t);
    }
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();  // what at::cuda:: aliases
  for (size_t d = 0; d < kNumDTypes; ++d) {
    Group& g = groups[d];
    if (g.segments.empty()) continue;
    const int32_t n = static_cast<int32_t>(g.segments.size());
    const Segment* table = table_cache().get(std::move(g.segments), result.device().index(), stream);
    C10_CUDA_CHECK(cuda::launch_flatten(static_cast<DType>(d), to_dtype(result.scalar_type()),
                                        table, n, g.chunks, result.data_ptr(), stream.stream()));
  }
  return result;
}

void run_unflatten(const at::Tensor& flat, std::array<Group, kNumDTypes>& groups,
                   const cuda::SgdHyper& hyper, bool sgd, double* divergence) {
  const auto stream = c10::cuda::getCurrentCUDAStream();  // what at::cuda:: aliases
  // NOTE: [Divergence] (common.h): one block-sum scratch buffer, from the caching allocator,
  // shared by the dtype groups' launches, which run in order on this stream.
  at::Tensor block_sums;
  if (divergence != nullptr) {
    int64_t scratch = 0;
    for (const Group& g : groups) scratch = std::max(scratch, cuda::divergence_scratch_size(g.chunks));
    if (scratch == 0) return;  // no elements: nothing to add
    block_sums = at::empty({scratch}, flat.options().dtype(at::kDouble));
  }
  for (size_t d = 0; d < kNumDTypes; ++d) {
    Group& g = groups[d];
    if (g.segments.empty()) continue;
    const int32_t n = static_cast<int32_t>(g.segments.size());
    const Segment* table = table_cache().get(std::move(g.segments), flat.device().index(), stream);
    C10_CUDA_CHECK(cuda::launch_unflatten_average(
        to_dtype(flat.scalar_type()), static_cast<DType>(d), table, n, g.chunks,
        flat.const_data_ptr(), hyper, sgd, divergence,
        divergence != nullptr ? block_sums.data_ptr<double>() : nullptr, stream.stream()));
  }
}

void unflatten_average_cuda(const at::Tensor& flat, at::TensorList params, double scale,
                            const c10::optional<at::Tensor>& divergence) {
  const auto offsets = check_unflatten("unflatten_average_", flat, params);
  double* div = check_divergence("unflatten_average_", flat, divergence);
  const c10::cuda::CUDAGuard guard(flat.device());
  std::array<Group, kNumDTypes> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    groups[static_cast<size_t>(to_dtype(p.scalar_type()))].add(p.data_ptr(), nullptr, nullptr,
                                                                offsets[i], p.numel(), false);
  }
  run_unflatten(flat, groups, cuda::SgdHyper{scale, 0.0, 0.0, 0.0, 0.0, 0, 0}, false, div);
}

void unflatten_average_sgd_cuda(const at::Tensor& flat, at::TensorList params,
                                const c10::List<c10::optional<at::Tensor>>& grads,
                                const c10::List<c10::optional<at::Tensor>>& momentum_buffers,
                                const c10::List<bool>& first_step, double scale, double lr,
                                double momentum, double dampening, double weight_decay,
                                bool nesterov, bool maximize,
                                const c10::optional<at::Tensor>& divergence) {
  const auto offsets = check_unflatten("unflatten_average_sgd_", flat, params);
  check_sgd(flat, params, grads, momentum_buffers, first_step, momentum);
  double* div = check_divergence("unflatten_average_sgd_", flat, divergence);
  const c10::cuda::CUDAGuard guard(flat.device());
  std::array<Group, kNumDTypes> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    const c10::optional<at::Tensor> g = grads.get(i);
    const bool has_grad = g.has_value() && g->defined();
    void* buf = nullptr;
    if (has_grad && momentum != 0.0) buf = momentum_buffers.get(i)->data_ptr();
    // first_step only matters where a buffer is written; normalising it elsewhere keeps the
    // table (and its cache key) stable.
    groups[static_cast<size_t>(to_dtype(p.scalar_type()))].add(
        p.data_ptr(), has_grad ? g->const_data_ptr() : nullptr, buf, offsets[i], p.numel(),
        buf != nullptr && first_step.get(i));
  }
  run_unflatten(flat, groups,
                cuda::SgdHyper{scale, lr, momentum, dampening, weight_decay, nesterov ? 1 : 0,
                               maximize ? 1 : 0},
                true, div);
}

}  // namespace

TORCH_LIBRARY_IMPL(prsgd_hvd, CUDA, m) {
  m.impl("flatten", &flatten_cuda);
  m.impl("unflatten_average_", &unflatten_average_cuda);
  m.impl("unflatten_average_sgd_", &unflatten_average_sgd_cuda);
}

}  // namespace prsgd
