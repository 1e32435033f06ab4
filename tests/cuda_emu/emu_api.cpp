// The emulated ops: the same layout (segment_offsets), the same tables (SegmentGroup::add) and
// the same launcher calls as csrc/cuda/cuda_ops.cpp, with host memory standing in for device
// memory. What the glue does with torch (argument checks, the table cache, streams) is tested
// on a GPU (tests/test_ops.py); everything from the table down runs here.
#include "emu_api.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "cuda/multi_segment.h"
#include "segment_table.h"

using prsgd::cuda::DType;
using prsgd::cuda::SegmentGroup;
using prsgd::cuda::SegmentGroups;

namespace {

// Each table in its own exact-size allocation, so that AddressSanitizer sees a read past its end.
struct DeviceTable {
  prsgd::cuda::Segment* data;
  explicit DeviceTable(const SegmentGroup& g)
      : data(static_cast<prsgd::cuda::Segment*>(std::malloc(g.segments.size() * sizeof(g.segments[0])))) {
    std::memcpy(data, g.segments.data(), g.segments.size() * sizeof(g.segments[0]));
  }
  ~DeviceTable() { std::free(data); }
};

bool layout(int n, const int64_t* numels, int32_t flat_dtype, int64_t align_bytes,
            std::vector<int64_t>* offsets) {
  if (!prsgd::valid_align(align_bytes)) return false;
  const int64_t a = prsgd::align_elements(align_bytes,
                                          prsgd::cuda::element_size(static_cast<DType>(flat_dtype)));
  *offsets = prsgd::segment_offsets(static_cast<size_t>(n), [&](size_t i) { return numels[i]; }, a);
  return true;
}

}  // namespace

extern "C" {

int prsgd_emu_set_launch_config(int persistent, int split_log2, int unroll) {
  return prsgd::cuda::set_launch_config({persistent, split_log2, unroll}) ? 0 : -1;
}

int prsgd_emu_layout(int n, const int64_t* numels, int32_t flat_dtype, int64_t align_bytes,
                     int64_t* offsets) {
  std::vector<int64_t> o;
  if (!layout(n, numels, flat_dtype, align_bytes, &o)) return -1;
  std::memcpy(offsets, o.data(), o.size() * sizeof(int64_t));
  return 0;
}

int prsgd_emu_flatten(int n, void* const* tensors, const int64_t* numels, const int32_t* dtypes,
                      void* flat, int32_t flat_dtype, int64_t align_bytes) {
  std::vector<int64_t> offsets;
  if (!layout(n, numels, flat_dtype, align_bytes, &offsets)) return cudaErrorInvalidValue;
  SegmentGroups groups;
  for (int i = 0; i < n; ++i) {
    groups[dtypes[i]].add(tensors[i], nullptr, nullptr, offsets[i], numels[i],
                          offsets[i + 1] - offsets[i] - numels[i], false);
  }
  for (size_t d = 0; d < groups.size(); ++d) {
    const SegmentGroup& g = groups[d];
    if (g.segments.empty()) continue;
    DeviceTable table(g);
    const cudaError_t err = prsgd::cuda::launch_flatten(
        static_cast<DType>(d), static_cast<DType>(flat_dtype), table.data,
        static_cast<int32_t>(g.segments.size()), g.chunks, flat, nullptr);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

int prsgd_emu_unflatten(int n, void* const* params, const void* const* grads,
                        void* const* bufs, const uint8_t* first_step, const int64_t* numels,
                        const int32_t* dtypes, const void* flat, int32_t flat_dtype,
                        int64_t align_bytes, int sgd, const double* hyper, double* divergence,
                        int accumulate) {
  std::vector<int64_t> offsets;
  if (!layout(n, numels, flat_dtype, align_bytes, &offsets)) return cudaErrorInvalidValue;
  const bool momentum = sgd && hyper[2] != 0.0;
  SegmentGroups groups;
  for (int i = 0; i < n; ++i) {
    // pad 0, as the glue passes: the unflatten kernels never touch the padding.
    groups[dtypes[i]].add(params[i], sgd ? grads[i] : nullptr, momentum ? bufs[i] : nullptr,
                          offsets[i], numels[i], 0, sgd && first_step[i]);
  }
  const prsgd::SgdOptions h =
      sgd ? prsgd::SgdOptions{hyper[0], hyper[1], hyper[2], hyper[3], hyper[4],
                              hyper[5] != 0.0, hyper[6] != 0.0}
          : prsgd::SgdOptions::average_only(hyper[0]);
  // One scratch for all groups, as the glue has; NaN so that a block sum the reduction reads
  // but no block wrote shows up in the result.
  int64_t scratch = 0;
  for (const SegmentGroup& g : groups) {
    scratch = std::max(scratch, prsgd::cuda::divergence_scratch_size(g.chunks));
  }
  double* block_sums = nullptr;
  if (divergence != nullptr && scratch > 0) {
    block_sums = static_cast<double*>(std::malloc(scratch * sizeof(double)));
    for (int64_t i = 0; i < scratch; ++i) block_sums[i] = std::numeric_limits<double>::quiet_NaN();
  }
  cudaError_t err = cudaSuccess;
  for (size_t d = 0; d < groups.size() && err == cudaSuccess; ++d) {
    const SegmentGroup& g = groups[d];
    if (g.segments.empty()) continue;
    DeviceTable table(g);
    err = prsgd::cuda::launch_unflatten_average(
        static_cast<DType>(flat_dtype), static_cast<DType>(d), table.data,
        static_cast<int32_t>(g.segments.size()), g.chunks, flat, h, sgd != 0, accumulate != 0,
        block_sums != nullptr ? divergence : nullptr, block_sums, nullptr);
  }
  std::free(block_sums);
  return err;
}

int prsgd_emu_unflatten_outer(int n, void* const* params, void* const* anchors,
                              void* const* outer_bufs, const uint8_t* outer_first_step,
                              const void* const* grads, void* const* bufs,
                              const uint8_t* first_step, const int64_t* numels,
                              const int32_t* dtypes, const void* flat, int32_t flat_dtype,
                              int64_t align_bytes, const double* outer_hyper,
                              const double* inner_hyper, double* divergence) {
  std::vector<int64_t> offsets;
  if (!layout(n, numels, flat_dtype, align_bytes, &offsets)) return cudaErrorInvalidValue;
  auto options = [](const double* h) {
    return prsgd::SgdOptions{h[0], h[1], h[2], h[3], h[4], h[5] != 0.0, h[6] != 0.0};
  };
  const prsgd::SgdOptions outer = options(outer_hyper);
  prsgd::SgdOptions inner = options(inner_hyper);
  inner.scale = outer.scale;
  // As cuda_ops.cpp's glue (after common.cpp's checks): buffers only where their momentum is on.
  SegmentGroups groups;
  for (int i = 0; i < n; ++i) {
    groups[dtypes[i]].add_outer(params[i], grads[i], inner.momentum != 0.0 ? bufs[i] : nullptr,
                                anchors[i], outer.momentum != 0.0 ? outer_bufs[i] : nullptr,
                                offsets[i], numels[i], first_step[i] != 0,
                                outer_first_step[i] != 0);
  }
  int64_t scratch = 0;
  for (const SegmentGroup& g : groups) {
    scratch = std::max(scratch, prsgd::cuda::divergence_scratch_size(g.chunks));
  }
  double* block_sums = nullptr;
  if (divergence != nullptr && scratch > 0) {  // NaN: a sum no block wrote would show
    block_sums = static_cast<double*>(std::malloc(scratch * sizeof(double)));
    for (int64_t i = 0; i < scratch; ++i) block_sums[i] = std::numeric_limits<double>::quiet_NaN();
  }
  cudaError_t err = cudaSuccess;
  for (size_t d = 0; d < groups.size() && err == cudaSuccess; ++d) {
    const SegmentGroup& g = groups[d];
    if (g.segments.empty()) continue;
    DeviceTable table(g);
    err = prsgd::cuda::launch_unflatten_average_outer(
        static_cast<DType>(flat_dtype), static_cast<DType>(d), table.data,
        static_cast<int32_t>(g.segments.size()), g.chunks, flat, outer, inner,
        block_sums != nullptr ? divergence : nullptr, block_sums, nullptr);
  }
  std::free(block_sums);
  return err;
}

}  // extern "C"
