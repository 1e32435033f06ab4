// Hyperparameters of unflatten_average_sgd_, shared by the op glue and the CPU kernels.
// Plain C++, so that the AVX2 kernel file includes nothing of ATen it does not need.
#pragma once

namespace prsgd {

// Hyperparameters of unflatten_average_sgd_, as the schema passes them (doubles). Each kernel
// rounds them to its opmath type, which is what torch does with a Python scalar times a tensor.
struct SgdOptions {
  double scale;
  double lr;
  double momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
};

}  // namespace prsgd
