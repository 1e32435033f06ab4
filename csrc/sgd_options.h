// Hyperparameters of the unflatten ops: one definition for the op glue (common.cpp), the CPU
// kernels (cpu_kernels_impl.h) and the CUDA kernels (cuda/kernels.cu, through
// cuda/multi_segment.h, and so the host emulation in tests/cuda_emu/). Plain C++ with no
// includes: kernels.cu must compile with a bare `nvcc -c` and the emulation with g++, neither
// with ATen headers, and the AVX2 kernel file includes nothing of ATen it does not need.
#pragma once

namespace prsgd {

// As the schema passes them (doubles). Each kernel rounds them to its opmath type, which is
// what torch does with a Python scalar times a tensor. unflatten_average_ uses only `scale`
// (average_only()); the others are torch.optim.SGD's.
struct SgdOptions {
  double scale;
  double lr;
  double momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;

  static SgdOptions average_only(double scale) {
    return SgdOptions{scale, 0.0, 0.0, 0.0, 0.0, false, false};
  }
};

}  // namespace prsgd
