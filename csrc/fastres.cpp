// The one schema block of the fastres:: operators, and the Python module fastres._C.
//
// The BatchNorm family, per channel c of x [N, C, *] (NCHW or channels_last), fp32 / fp16 /
// bf16 / fp64 in, fp32 accumulation (fp64 for fp64 inputs):
//   bn_stats          x -> mean[c], m2[c] = sum (x - mean)^2 (count = N * H * W; mergeable
//                     across processes with Chan's formula, so SyncBN can all-gather them)
//   bn_finalize       mean, m2, count, weight, bias, eps -> scale, shift, invstd
//   bn_apply          act(x * scale + shift [+ r | + r * scale_r + shift_r]), act ReLU / identity
//   bn_backward_reduce / bn_backward_elemt
//                     the two passes of the backward of bn_apply and of a training-mode BN
//                     in front of it; the ReLU mask is recomputed from the inputs.
// Kernels register per dispatch key: cpu/batchnorm_cpu.cpp, cuda/batchnorm_cuda.cpp.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastres, m) {
  m.def("bn_stats(Tensor x) -> (Tensor mean, Tensor m2)");
  m.def(
      "bn_finalize(Tensor mean, Tensor m2, int count, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor scale, Tensor shift, Tensor invstd)");
  m.def(
      "bn_apply(Tensor x, Tensor scale, Tensor shift, Tensor? residual, Tensor? scale_r,"
      " Tensor? shift_r, bool relu) -> Tensor");
  m.def(
      "bn_backward_reduce(Tensor grad_out, Tensor x, Tensor scale, Tensor shift,"
      " Tensor? residual, Tensor? scale_r, Tensor? shift_r, bool relu, Tensor? mean,"
      " Tensor? mean_r) -> (Tensor sum_dy, Tensor sum_dy_xmu, Tensor sum_dy_rmu)");
  m.def(
      "bn_backward_elemt(Tensor grad_out, Tensor x, Tensor scale, Tensor shift,"
      " Tensor? residual, Tensor? scale_r, Tensor? shift_r, bool relu, Tensor? mean,"
      " Tensor? invstd, Tensor? sum_dy, Tensor? sum_dy_xmu, Tensor? mean_r, Tensor? invstd_r,"
      " Tensor? sum_dy_rmu, int count, bool grad_residual) -> (Tensor grad_x, Tensor grad_r)");
}

// A plain module object: importing fastres._C loads this library, whose static initialisers
// register the operators above with the dispatcher. No pybind11, to keep the build short.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
