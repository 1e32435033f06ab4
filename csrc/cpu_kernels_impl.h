// Bodies of the CPU kernels, included by cpu_kernels_default.cpp and cpu_kernels_avx2.cpp with
// PRSGD_CPU_NS naming the namespace (NOTE: [CPU capability] in cpu_kernels.h).
//
// One at::parallel_for over all elements of all segments, at::vec::Vectorized inner loops with
// fp32 (fp64 for double) opmath, rounding once when a value is written.
//
// NOTE: [One pass, balanced] The flat index space is split into equal ranges regardless of
// tensor boundaries, so hundreds of tiny tensors (biases, BatchNorm) cost no more scheduling
// than one big one, and every element of flat/params/grads/buffers is touched exactly once.
// NOTE: [No FMA] The reference computes `x - lr * d` as a rounded multiply then a rounded
// subtract; the build passes -ffp-contract=off (and the CUDA kernels use __fmul_rn/__fadd_rn)
// so the kernels round at the same places and match it bit for bit. at::vec's operator* and
// operator+ are separate instructions; fmadd is never called here.
#ifndef PRSGD_CPU_NS
#error "define PRSGD_CPU_NS before including cpu_kernels_impl.h"
#endif

#include "cpu_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace prsgd {
namespace cpu {
namespace PRSGD_CPU_NS {
namespace {

using at::vec::Vectorized;

template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr bool is_reduced_v = std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>;

// Every inner loop steps by two opmath vectors: that is one Vectorized<Half/BFloat16> worth.
template <typename op_t>
constexpr int64_t kStep = 2 * Vectorized<op_t>::size();

template <typename T, typename op_t = opmath_t<T>>
inline void load2(const T* p, Vectorized<op_t>& a, Vectorized<op_t>& b) {
  if constexpr (is_reduced_v<T>) {
    at::vec::load_to_float<T>(p, a, b);
  } else {
    static_assert(std::is_same_v<T, op_t>);
    a = Vectorized<op_t>::loadu(p);
    b = Vectorized<op_t>::loadu(p + Vectorized<op_t>::size());
  }
}

template <typename T, typename op_t = opmath_t<T>>
inline void store2(T* p, const Vectorized<op_t>& a, const Vectorized<op_t>& b) {
  if constexpr (is_reduced_v<T>) {
    at::vec::convert_from_float<T>(a, b).store(p);
  } else {
    static_assert(std::is_same_v<T, op_t>);
    a.store(p);
    b.store(p + Vectorized<op_t>::size());
  }
}

// The SGD constants, already rounded to opmath and broadcast to V (a scalar or a vector).
template <typename V>
struct SgdConsts {
  V scale, lr, momentum, one_minus_dampening, weight_decay, neg_one;
  bool has_weight_decay, has_momentum, nesterov, maximize;

  template <typename op_t>
  static SgdConsts make(const SgdOptions& o) {
    // (1 - dampening) is formed in double first, as the Python reference does.
    return {V(op_t(o.scale)), V(op_t(o.lr)), V(op_t(o.momentum)),
            V(op_t(1.0 - o.dampening)), V(op_t(o.weight_decay)), V(op_t(-1.0)),
            o.weight_decay != 0.0, o.momentum != 0.0, o.nesterov, o.maximize};
  }
};

// torch.optim.SGD's update of the averaged value x with gradient g; same operation order as
// ops_reference.unflatten_average_sgd_. `buf` is read unless `first`, and always written when
// momentum is on. V is an opmath scalar or an at::vec::Vectorized of it.
template <typename V>
inline V sgd_math(V x, V g, V& buf, bool first, const SgdConsts<V>& c) {
  V d = c.maximize ? g * c.neg_one : g;
  if (c.has_weight_decay) d = d + c.weight_decay * x;
  if (c.has_momentum) {
    buf = first ? d : buf * c.momentum + c.one_minus_dampening * d;
    d = c.nesterov ? d + c.momentum * buf : buf;
  }
  return x - c.lr * d;
}

// Elements per parallel task at least: at::internal::GRAIN_SIZE (TensorIterator.h, which this
// file does not include), so small models stay on one thread like torch's own kernels.
constexpr int64_t kGrainSize = 32768;

// Calls fn(segment, begin_in_segment, length) for the pieces of [begin, end) in flat order.
// `offsets` has one entry per segment plus the total.
template <typename F>
void for_segments(const std::vector<int64_t>& offsets, int64_t begin, int64_t end, const F& fn) {
  // Last segment starting at or before `begin`; empty segments share their successor's
  // offset, so this is never an empty one.
  int64_t s = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
  while (begin < end) {
    const int64_t seg_end = std::min(end, offsets[s + 1]);
    if (seg_end > begin) fn(s, begin - offsets[s], seg_end - begin);
    begin = std::max(begin, seg_end);
    ++s;
  }
}

// Runs fn(segment, begin_in_segment, length) over [0, total) split across threads
// (see NOTE: [One pass, balanced]).
template <typename F>
void parallel_segments(const std::vector<int64_t>& offsets, const F& fn) {
  const int64_t total = offsets.back();
  if (total == 0) return;
  at::parallel_for(0, total, kGrainSize, [&](int64_t begin, int64_t end) {
    for_segments(offsets, begin, end, fn);
  });
}

// Returns the sum over [0, total) of fn(segment, begin_in_segment, length) -> double, for
// NOTE: [Divergence]: the range is cut into fixed blocks of kGrainSize elements, each block's
// pieces are summed in flat order into its own slot, and the slots are added in block order
// on the calling thread, so the result does not depend on the thread count. Threads get the
// same amount of work as parallel_segments gives them.
template <typename F>
double parallel_segments_sum(const std::vector<int64_t>& offsets, const F& fn) {
  const int64_t total = offsets.back();
  if (total == 0) return 0.0;
  const int64_t blocks = (total + kGrainSize - 1) / kGrainSize;
  std::vector<double> partial(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double sum = 0.0;
      for_segments(offsets, b * kGrainSize, std::min(total, (b + 1) * kGrainSize),
                   [&](int64_t s, int64_t begin, int64_t n) { sum += fn(s, begin, n); });
      partial[b] = sum;
    }
  });
  double sum = 0.0;
  for (double p : partial) sum += p;
  return sum;
}

// ---- flatten ---------------------------------------------------------------------------

template <typename src_t, typename dst_t>
void cast_copy(const src_t* src, dst_t* dst, int64_t n) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    std::memcpy(dst, src, n * sizeof(src_t));
  } else {
    using op_t = float;  // only fp32/fp16/bf16 reach here (is_kernel_cast)
    Vectorized<op_t> a, b;
    int64_t i = 0;
    for (; i + kStep<op_t> <= n; i += kStep<op_t>) {
      load2<src_t>(src + i, a, b);
      store2<dst_t>(dst + i, a, b);
    }
    for (; i < n; ++i) dst[i] = static_cast<dst_t>(static_cast<op_t>(src[i]));
  }
}

// Calls f(T{}) with the C++ type of a floating dtype.
template <typename F>
void dispatch_float(c10::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(at::Half{});
    case at::kBFloat16:
      return f(at::BFloat16{});
    case at::kDouble:
      return f(double{});
    default:
      TORCH_CHECK(false, "prsgd_hvd: internal error: unchecked dtype ", t);
  }
}

// Calls f(a_t{}, b_t{}) with the C++ types of a pair of floating dtypes.
template <typename F>
void dispatch_pair(c10::ScalarType a, c10::ScalarType b, const F& f) {
  dispatch_float(a, [&](auto a_tag) {
    dispatch_float(b, [&](auto b_tag) { f(a_tag, b_tag); });
  });
}

// ---- unflatten_average_ / unflatten_average_sgd_ -------------------------------------------

// Float64 sums of squared differences, one per vector lane plus one for the scalar tail,
// added up in a fixed order (NOTE: [Divergence]). The square is formed in opmath, then widened
// to float64 vectors (cvtps2pd on AVX2; through memory in the baseline build).
template <typename op_t>
struct SquareSum {
  using Vec = Vectorized<op_t>;
  using DVec = Vectorized<double>;
  static constexpr int kWiden = Vec::size() / DVec::size();  // float64 vectors per opmath one
  static_assert(kWiden * DVec::size() == Vec::size(), "opmath vector must widen evenly");
  DVec acc[2 * kWiden];
  double tail = 0.0;

  SquareSum() {
    for (auto& a : acc) a = DVec(0.0);
  }

  static inline void widen_add(DVec* a, const Vec& sq) {
    if constexpr (std::is_same_v<op_t, double>) {
      a[0] = a[0] + sq;
    } else {
#if defined(CPU_CAPABILITY_AVX2)
      static_assert(kWiden == 2);
      const __m256 v = sq;
      a[0] = a[0] + DVec(_mm256_cvtps_pd(_mm256_castps256_ps128(v)));
      a[1] = a[1] + DVec(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
#else
      alignas(64) op_t f[Vec::size()];
      alignas(64) double d[Vec::size()];
      sq.store(f);
      for (int k = 0; k < Vec::size(); ++k) d[k] = static_cast<double>(f[k]);
      for (int w = 0; w < kWiden; ++w) a[w] = a[w] + DVec::loadu(d + w * DVec::size());
#endif
    }
  }

  inline void add(const Vec& old0, const Vec& old1, const Vec& new0, const Vec& new1) {
    const Vec d0 = old0 - new0, d1 = old1 - new1;
    widen_add(acc, d0 * d0);
    widen_add(acc + kWiden, d1 * d1);
  }
  inline void add(op_t old_value, op_t new_value) {
    const op_t d = old_value - new_value;
    tail += static_cast<double>(d * d);
  }
  double sum() const {
    alignas(64) double lanes[2 * kWiden * DVec::size()];
    for (int w = 0; w < 2 * kWiden; ++w) acc[w].store(lanes + w * DVec::size());
    double s = 0.0;
    for (double l : lanes) s += l;
    return s + tail;
  }
};

// One piece of one segment. grad == nullptr: the param only receives the average.
// kAccumulate: the average is added to the param instead of replacing it, x = old + flat *
// scale in opmath, rounded once when written (a delayed merge: x + (c - x_sent), NOTE:
// [streaming] in prsgd_hvd/streaming.py); an SGD step then applies to that x.
// kDivergence: also return the sum of (old param - x)^2, x before any step. The param is read
// (once, just before it is overwritten) only when one of the two asks for it; without them the
// loops are exactly the plain average / step, so the options cost nothing when off.
template <bool kDivergence, bool kAccumulate, typename flat_t, typename param_t>
double average_sgd_piece(const flat_t* flat, param_t* param, const param_t* grad, param_t* buf,
                         bool first, int64_t n, const SgdOptions& o) {
  using op_t = opmath_t<param_t>;
  using Vec = Vectorized<op_t>;
  constexpr bool kReadParam = kDivergence || kAccumulate;
  const auto cv = SgdConsts<Vec>::template make<op_t>(o);
  const auto cs = SgdConsts<op_t>::template make<op_t>(o);
  [[maybe_unused]] SquareSum<op_t> div;
  // x = flat * scale, plus the old param with kAccumulate (p: the old param, when read).
  auto point = [&](Vec& x0, Vec& x1, int64_t i) {
    load2<flat_t>(flat + i, x0, x1);
    x0 = x0 * cv.scale;
    x1 = x1 * cv.scale;
    if constexpr (kReadParam) {
      Vec p0, p1;
      load2<param_t>(param + i, p0, p1);
      if constexpr (kAccumulate) {
        x0 = p0 + x0;
        x1 = p1 + x1;
      }
      if constexpr (kDivergence) div.add(p0, p1, x0, x1);  // to x, before any step
    }
  };
  auto point_scalar = [&](int64_t i) {
    op_t x = static_cast<op_t>(flat[i]) * cs.scale;
    if constexpr (kReadParam) {
      const op_t p = static_cast<op_t>(param[i]);
      if constexpr (kAccumulate) x = p + x;
      if constexpr (kDivergence) div.add(p, x);
    }
    return x;
  };
  int64_t i = 0;
  if (grad == nullptr) {
    for (; i + kStep<op_t> <= n; i += kStep<op_t>) {
      Vec x0, x1;
      point(x0, x1, i);
      store2<param_t>(param + i, x0, x1);
    }
    for (; i < n; ++i) param[i] = static_cast<param_t>(point_scalar(i));
  } else {
    const bool read_buf = cs.has_momentum && !first;
    for (; i + kStep<op_t> <= n; i += kStep<op_t>) {
      Vec x0, x1, g0, g1, b0, b1;
      load2<param_t>(grad + i, g0, g1);
      if (read_buf) load2<param_t>(buf + i, b0, b1);
      point(x0, x1, i);
      x0 = sgd_math(x0, g0, b0, first, cv);
      x1 = sgd_math(x1, g1, b1, first, cv);
      store2<param_t>(param + i, x0, x1);
      if (cs.has_momentum) store2<param_t>(buf + i, b0, b1);
    }
    for (; i < n; ++i) {
      op_t b = read_buf ? static_cast<op_t>(buf[i]) : op_t(0);
      const op_t x = sgd_math(point_scalar(i), static_cast<op_t>(grad[i]), b, first, cs);
      param[i] = static_cast<param_t>(x);
      if (cs.has_momentum) buf[i] = static_cast<param_t>(b);
    }
  }
  if constexpr (kDivergence) {
    return div.sum();
  } else {
    return 0.0;
  }
}

template <bool kDivergence, bool kAccumulate>
double dispatch_average_sgd(c10::ScalarType flat_type, c10::ScalarType param_type,
                            const void* flat, void* param, const void* grad, void* buf,
                            bool first, int64_t n, const SgdOptions& o) {
  double result = 0.0;
  dispatch_pair(flat_type, param_type, [&](auto flat_tag, auto param_tag) {
    using flat_t = decltype(flat_tag);
    using param_t = decltype(param_tag);
    if constexpr (std::is_same_v<flat_t, param_t> ||
                  (std::is_same_v<flat_t, float> && is_reduced_v<param_t>)) {
      result = average_sgd_piece<kDivergence, kAccumulate, flat_t, param_t>(
          static_cast<const flat_t*>(flat), static_cast<param_t*>(param),
          static_cast<const param_t*>(grad), static_cast<param_t*>(buf), first, n, o);
    } else {
      TORCH_CHECK(false, "prsgd_hvd: internal error: dtype pair not checked");
    }
  });
  return result;
}

// ---- unflatten_average_outer_sgd_ ---------------------------------------------------------

// One piece of one param of an outer round (ops_reference.unflatten_average_outer_sgd_):
// ybar = flat * scale; theta0 <- SGD(theta0, theta0 - ybar) with the outer constants `oc`,
// written to the anchor (flat_t) and its buffer; then, with a grad, the inner SGD of the new
// theta0 (`ic`); the param gets the result, rounded once. kDivergence: as average_sgd_piece,
// the distance of the old param from ybar.
template <bool kDivergence, typename flat_t, typename param_t>
double average_outer_sgd_piece(const flat_t* flat, param_t* param, flat_t* anchor,
                               flat_t* obuf, const param_t* grad, param_t* buf, bool ofirst,
                               bool first, int64_t n, const SgdOptions& oo,
                               const SgdOptions& io) {
  using op_t = opmath_t<param_t>;
  using Vec = Vectorized<op_t>;
  const auto ov = SgdConsts<Vec>::template make<op_t>(oo);
  const auto os = SgdConsts<op_t>::template make<op_t>(oo);
  const auto iv = SgdConsts<Vec>::template make<op_t>(io);
  const auto is = SgdConsts<op_t>::template make<op_t>(io);
  const bool read_obuf = os.has_momentum && !ofirst;
  const bool read_buf = grad != nullptr && is.has_momentum && !first;
  const bool write_buf = grad != nullptr && is.has_momentum;
  [[maybe_unused]] SquareSum<op_t> div;
  int64_t i = 0;
  for (; i + kStep<op_t> <= n; i += kStep<op_t>) {
    Vec y0, y1, t0, t1, ob0, ob1;
    load2<flat_t>(flat + i, y0, y1);
    load2<flat_t>(anchor + i, t0, t1);
    if (read_obuf) load2<flat_t>(obuf + i, ob0, ob1);
    y0 = y0 * ov.scale;
    y1 = y1 * ov.scale;
    if constexpr (kDivergence) {  // the distance is to the average
      Vec p0, p1;
      load2<param_t>(param + i, p0, p1);
      div.add(p0, p1, y0, y1);
    }
    t0 = sgd_math(t0, t0 - y0, ob0, ofirst, ov);
    t1 = sgd_math(t1, t1 - y1, ob1, ofirst, ov);
    store2<flat_t>(anchor + i, t0, t1);
    if (os.has_momentum) store2<flat_t>(obuf + i, ob0, ob1);
    if (grad != nullptr) {
      Vec g0, g1, b0, b1;
      load2<param_t>(grad + i, g0, g1);
      if (read_buf) load2<param_t>(buf + i, b0, b1);
      t0 = sgd_math(t0, g0, b0, first, iv);
      t1 = sgd_math(t1, g1, b1, first, iv);
      if (write_buf) store2<param_t>(buf + i, b0, b1);
    }
    store2<param_t>(param + i, t0, t1);
  }
  for (; i < n; ++i) {
    const op_t y = static_cast<op_t>(flat[i]) * os.scale;
    if constexpr (kDivergence) div.add(static_cast<op_t>(param[i]), y);
    op_t t = static_cast<op_t>(anchor[i]);
    op_t ob = read_obuf ? static_cast<op_t>(obuf[i]) : op_t(0);
    t = sgd_math(t, t - y, ob, ofirst, os);
    anchor[i] = static_cast<flat_t>(t);
    if (os.has_momentum) obuf[i] = static_cast<flat_t>(ob);
    if (grad != nullptr) {
      op_t b = read_buf ? static_cast<op_t>(buf[i]) : op_t(0);
      t = sgd_math(t, static_cast<op_t>(grad[i]), b, first, is);
      if (write_buf) buf[i] = static_cast<param_t>(b);
    }
    param[i] = static_cast<param_t>(t);
  }
  if constexpr (kDivergence) {
    return div.sum();
  } else {
    return 0.0;
  }
}

}  // namespace

void flatten(const std::vector<CastSegment>& segs, c10::ScalarType dst_type) {
  std::vector<int64_t> offsets(segs.size() + 1, 0);
  for (size_t i = 0; i < segs.size(); ++i) offsets[i + 1] = offsets[i] + segs[i].numel;
  const int64_t dst_size = c10::elementSize(dst_type);
  parallel_segments(offsets, [&](int64_t s, int64_t begin, int64_t n) {
    const CastSegment& g = segs[s];
    const void* src = static_cast<const char*>(g.src) + begin * c10::elementSize(g.src_type);
    void* dst = static_cast<char*>(g.dst) + begin * dst_size;
    dispatch_pair(g.src_type, dst_type, [&](auto src_tag, auto dst_tag) {
      using src_t = decltype(src_tag);
      using dst_t = decltype(dst_tag);
      if constexpr (std::is_same_v<src_t, dst_t> ||
                    (!std::is_same_v<src_t, double> && !std::is_same_v<dst_t, double>)) {
        cast_copy(static_cast<const src_t*>(src), static_cast<dst_t*>(dst), n);
      } else {
        TORCH_CHECK(false, "prsgd_hvd: internal error: cast not handled by the kernel");
      }
    });
  });
}

void average_sgd(const std::vector<SgdSegment>& segs, c10::ScalarType flat_type,
                 const SgdOptions& o, bool accumulate, double* divergence) {
  std::vector<int64_t> offsets(segs.size() + 1, 0);
  for (size_t i = 0; i < segs.size(); ++i) offsets[i + 1] = offsets[i] + segs[i].numel;
  const int64_t flat_size = c10::elementSize(flat_type);
  auto piece = [&](auto divergence_tag, auto accumulate_tag, int64_t s, int64_t begin,
                   int64_t n) {
    const SgdSegment& g = segs[s];
    const int64_t off = begin * c10::elementSize(g.param_type);
    return dispatch_average_sgd<decltype(divergence_tag)::value,
                                decltype(accumulate_tag)::value>(
        flat_type, g.param_type, static_cast<const char*>(g.flat) + begin * flat_size,
        static_cast<char*>(g.param) + off,
        g.grad ? static_cast<const char*>(g.grad) + off : nullptr,
        g.buf ? static_cast<char*>(g.buf) + off : nullptr, g.first, n, o);
  };
  auto run = [&](auto accumulate_tag) {
    if (divergence == nullptr) {
      parallel_segments(offsets, [&](int64_t s, int64_t begin, int64_t n) {
        piece(std::false_type{}, accumulate_tag, s, begin, n);
      });
    } else {
      *divergence += parallel_segments_sum(offsets, [&](int64_t s, int64_t begin, int64_t n) {
        return piece(std::true_type{}, accumulate_tag, s, begin, n);
      });
    }
  };
  if (accumulate) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
}

void average_outer_sgd(const std::vector<OuterSegment>& segs, c10::ScalarType flat_type,
                       const SgdOptions& outer, const SgdOptions& inner, double* divergence) {
  std::vector<int64_t> offsets(segs.size() + 1, 0);
  for (size_t i = 0; i < segs.size(); ++i) offsets[i + 1] = offsets[i] + segs[i].numel;
  const int64_t flat_size = c10::elementSize(flat_type);
  auto piece = [&](auto divergence_tag, int64_t s, int64_t begin, int64_t n) {
    const OuterSegment& g = segs[s];
    const int64_t off = begin * c10::elementSize(g.param_type);
    const int64_t flat_off = begin * flat_size;
    double result = 0.0;
    dispatch_pair(flat_type, g.param_type, [&](auto flat_tag, auto param_tag) {
      using flat_t = decltype(flat_tag);
      using param_t = decltype(param_tag);
      if constexpr (std::is_same_v<flat_t, param_t> ||
                    (std::is_same_v<flat_t, float> && is_reduced_v<param_t>)) {
        result = average_outer_sgd_piece<decltype(divergence_tag)::value, flat_t, param_t>(
            reinterpret_cast<const flat_t*>(static_cast<const char*>(g.flat) + flat_off),
            reinterpret_cast<param_t*>(static_cast<char*>(g.param) + off),
            reinterpret_cast<flat_t*>(static_cast<char*>(g.anchor) + flat_off),
            g.outer_buf ? reinterpret_cast<flat_t*>(static_cast<char*>(g.outer_buf) + flat_off)
                        : nullptr,
            g.grad ? reinterpret_cast<const param_t*>(static_cast<const char*>(g.grad) + off)
                   : nullptr,
            g.buf ? reinterpret_cast<param_t*>(static_cast<char*>(g.buf) + off) : nullptr,
            g.outer_first, g.first, n, outer, inner);
      } else {
        TORCH_CHECK(false, "prsgd_hvd: internal error: dtype pair not checked");
      }
    });
    return result;
  };
  if (divergence == nullptr) {
    parallel_segments(offsets, [&](int64_t s, int64_t begin, int64_t n) {
      piece(std::false_type{}, s, begin, n);
    });
  } else {
    *divergence += parallel_segments_sum(offsets, [&](int64_t s, int64_t begin, int64_t n) {
      return piece(std::true_type{}, s, begin, n);
    });
  }
}

}  // namespace PRSGD_CPU_NS
}  // namespace cpu
}  // namespace prsgd
