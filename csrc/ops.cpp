// Operator schemas of prsgd_hvd and the Python module stub.
//
// One schema per op (pytorch/extension-cpp style); the CPU kernels are registered in
// cpu_ops.cpp and the CUDA ones in cuda/cuda_ops.cpp, which only CUDA builds compile.
// Python reaches the ops through torch.ops.prsgd_hvd.*; importing prsgd_hvd._C runs the static
// registrations below.
#include <Python.h>

#include <torch/library.h>

extern "C" {
// An empty module: `from prsgd_hvd import _C` only needs to load this library so that the
// TORCH_LIBRARY blocks run. No pybind11 bindings are needed.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      "prsgd_hvd kernels; the ops live in torch.ops.prsgd_hvd",  // m_doc
      -1,    // m_size
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(prsgd_hvd, m) {
  // Packs `tensors` (any shapes/strides) into a new 1-D tensor of tensors[0]'s dtype.
  // `align` (bytes, every op's last argument, defaulting to the packed layout so older calls
  // keep working): each segment starts at a multiple of it and the gaps are zeros (NOTE:
  // [Segment layout] in segment_table.h).
  m.def("flatten(Tensor[] tensors, int align=1) -> Tensor");
  // The same into `out` (cast to out's dtype), which it writes and does not return: an op that
  // returned its mutated argument would have to declare the output an alias of it
  // ("-> Tensor(a!)"), which is the out= convention, not a functional one; a separate
  // in-place op keeps both schemas exact (torch.library.opcheck's test_schema checks them).
  m.def("flatten_into(Tensor[] tensors, Tensor(a!) out, int align=1) -> ()");
  // params[i] = flat[segment_i] * scale. With `divergence` (1-element float64), also
  // divergence += sum (old params[i] - flat[segment_i] * scale)^2 (NOTE: [Divergence] in
  // common.h). It is last and defaults to None, so calls written before it still work.
  // `accumulate` (after it, for the same reason): params[i] = old params[i] +
  // flat[segment_i] * scale instead, rounded once (NOTE: [Accumulate] in common.h).
  m.def(
      "unflatten_average_(Tensor flat, Tensor(a!)[] params, float scale, "
      "Tensor(b!)? divergence=None, int align=1, bool accumulate=False) -> ()");
  // params[i] = SGD step applied to flat[segment_i] * scale (plus the old params[i] with
  // `accumulate`); momentum buffers updated; `divergence` as above, measured to that point
  // before the step.
  m.def(
      "unflatten_average_sgd_(Tensor flat, Tensor(a!)[] params, Tensor?[] grads, "
      "Tensor(b!)?[] momentum_buffers, bool[] first_step, float scale, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "Tensor(c!)? divergence=None, int align=1, bool accumulate=False) -> ()");
  // An outer round (outer=torch.optim.SGD): theta0 (`anchors`, flat's dtype) takes SGD's
  // step on the pseudo-gradient theta0 - flat[segment_i] * scale with the outer_* options
  // and `outer_buffers`; params[i] = the new theta0, or its inner SGD step where grads[i] is
  // given (inner options, momentum_buffers). `divergence` as above (old params to the average).
  m.def(
      "unflatten_average_outer_sgd_(Tensor flat, Tensor(a!)[] params, Tensor(b!)[] anchors, "
      "Tensor(c!)?[] outer_buffers, bool[] outer_first_step, Tensor?[] grads, "
      "Tensor(d!)?[] momentum_buffers, bool[] first_step, float scale, float outer_lr, "
      "float outer_momentum, float outer_dampening, float outer_weight_decay, "
      "bool outer_nesterov, bool outer_maximize, float lr, float momentum, float dampening, "
      "float weight_decay, bool nesterov, bool maximize, Tensor(e!)? divergence=None, "
      "int align=1) -> ()");
}
