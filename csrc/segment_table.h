// Segment layout and segment tables, torch-free and CUDA-free: plain C++17, so that the op glue
// (common.cpp, cuda/cuda_ops.cpp), the CUDA kernels (cuda/kernels.cu, through
// cuda/multi_segment.h) and the host emulation of those kernels (tests/cuda_emu/) all use this
// one definition.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace prsgd {

// NOTE: [Segment layout] Segment i of a flat buffer holds tensor i (in list order). With
// align_bytes <= the flat element size the segments are packed back to back: segment i starts
// at the sum of the numels before it (the default, and the only layout before `align`
// existed). With a larger align_bytes (a power of two, e.g. 16), every segment starts at an
// element offset that is a multiple of align_bytes / element size, and the flat buffer's total
// is rounded up the same way. The gaps are written as zeros by flatten(), so an allreduce sums
// zeros there and an average of them is zero; the unflatten ops never read them. Why: with the
// packed layout every segment after an odd-sized tensor starts misaligned, and the CUDA kernels
// then run that whole segment in their scalar loop; padded, every segment of an aligned tensor
// takes the 16-byte vector path. Every op derives its offsets from segment_offsets(), and
// prsgd_hvd.ops.segment_layout() and the Python reference compute the same numbers.

constexpr int64_t kMaxAlignBytes = 4096;

// True for the align_bytes values the ops accept: a power of two in [1, kMaxAlignBytes].
inline bool valid_align(int64_t align_bytes) {
  return align_bytes >= 1 && align_bytes <= kMaxAlignBytes &&
         (align_bytes & (align_bytes - 1)) == 0;
}

// Elements per alignment unit for a flat buffer of `elem_size`-byte elements (1 = packed).
inline int64_t align_elements(int64_t align_bytes, int64_t elem_size) {
  return align_bytes > elem_size ? align_bytes / elem_size : 1;
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// offsets[i] = first element of segment i; offsets[n] = the flat buffer's total numel.
// `numel(i)` gives tensor i's element count.
template <typename NumelOf>
std::vector<int64_t> segment_offsets(size_t n, const NumelOf& numel, int64_t align_elems) {
  std::vector<int64_t> offsets(n + 1);
  int64_t end = 0;
  for (size_t i = 0; i < n; ++i) {
    offsets[i] = round_up(end, align_elems);
    end = offsets[i] + numel(i);
  }
  offsets[n] = round_up(end, align_elems);
  return offsets;
}

namespace cuda {

// Elements one block processes at a time (MultiTensorApply's chunk_size). A multiple of the
// vector width, so every chunk of a 16-byte-aligned tensor starts 16-byte aligned.
constexpr int64_t kChunkSize = 32768;

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
constexpr size_t kNumDTypes = 4;

inline int64_t element_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
  }
  return 0;
}

// NOTE: [Segment table] One entry per non-empty tensor of one dtype group, in flat order. The
// glue builds it on the host, uploads it once and reuses the device copy for as long as the
// tensors (data pointers, sizes, first_step) stay the same (NOTE: [Segment table cache] in
// cuda_ops.cpp); every kernel walks it, so a launch is not limited to the ~110 tensors
// MultiTensorApply fits in kernel arguments.
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
  // Zero elements that follow the segment in `flat` (NOTE: [Segment layout]); flatten writes
  // them, the unflatten ops ignore them. 0 in the packed layout.
  int32_t flat_pad;
  // unflatten_average_outer_sgd_ only (nullptr / 0 for every other op): theta0, in flat's
  // dtype (read and written); the outer momentum buffer (flat's dtype; read unless
  // outer_first_step, written), nullptr when the outer momentum is 0.
  void* anchor;
  void* outer_buf;
  int32_t outer_first_step;
  int32_t reserved;  // 0: no padding bytes, so that tables compare with memcmp
};
static_assert(sizeof(Segment) == 80, "Segment must have no padding");

inline int64_t chunks_of(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

// The segments of one dtype (source dtype for flatten, param dtype for the unflatten ops) and
// their chunk count. add() is the one place that decides what goes into a table, for the glue
// and the emulated tests alike.
struct SegmentGroup {
  std::vector<Segment> segments;
  int64_t chunks = 0;

  // `pad`: zeros after the segment (offsets[i + 1] - offsets[i] - numel). A momentum buffer
  // only counts with a grad (no grad: no local update), and first_step only where a buffer is
  // written; normalising both keeps the table, and so its cache key, stable.
  void add(void* tensor, const void* grad, void* momentum_buf, int64_t flat_offset,
           int64_t numel, int64_t pad, bool first_step) {
    if (numel == 0) return;  // nothing to read or write; its padding is 0 (see segment_offsets)
    Segment s{};
    s.tensor = tensor;
    s.grad = grad;
    s.momentum_buf = grad != nullptr ? momentum_buf : nullptr;
    s.flat_offset = flat_offset;
    s.numel = numel;
    s.chunk_begin = chunks;
    s.first_step = (s.momentum_buf != nullptr && first_step) ? 1 : 0;
    s.flat_pad = static_cast<int32_t>(pad);
    segments.push_back(s);
    chunks += chunks_of(numel);
  }

  // A param of an outer round: add()'s fields (grad nullptr: no inner update) plus theta0 and
  // the outer buffer; outer_first_step normalised like first_step.
  void add_outer(void* param, const void* grad, void* momentum_buf, void* anchor,
                 void* outer_buf, int64_t flat_offset, int64_t numel, bool first_step,
                 bool outer_first_step) {
    if (numel == 0) return;
    add(param, grad, momentum_buf, flat_offset, numel, 0, first_step);
    Segment& s = segments.back();
    s.anchor = anchor;
    s.outer_buf = outer_buf;
    s.outer_first_step = (outer_buf != nullptr && outer_first_step) ? 1 : 0;
  }
};

using SegmentGroups = std::array<SegmentGroup, kNumDTypes>;

}  // namespace cuda
}  // namespace prsgd
