// The one schema block of the fastres:: operators, and the Python module fastres._C.
//
// The BatchNorm family, per channel c of x [N, C, *] (NCHW or channels_last), fp32 / fp16 /
// bf16 / fp64 in, fp32 accumulation (fp64 for fp64 inputs):
//   bn_stats          x -> mean[c], m2[c] = sum (x - mean)^2 (count = N * H * W; mergeable
//                     across processes with Chan's formula, so SyncBN can all-gather them)
//   bn_finalize       mean, m2, count, weight, bias, eps -> scale, shift, invstd
//   bn_finalize_update
//                     bn_finalize, and the running statistics updated in place as
//                     nn.BatchNorm2d's training forward does (momentum, or None: the
//                     cumulative average; unbiased variance; num_batches_tracked + 1)
//   bn_apply          act(x * scale + shift [+ r | + r * scale_r + shift_r]), act ReLU / identity
//   bn_backward_reduce / bn_backward_elemt
//                     the two passes of the backward of bn_apply and of a training-mode BN
//                     in front of it; the ReLU mask is recomputed from the inputs.
//   bn_backward       both passes and the affine gradients in one op (one process's batch);
//                     count 0: a BN on running statistics (no batch terms)
//   add_relu_         y = ReLU(y + r) in place (an inference tail after a folded convolution)
// The per-channel arithmetic: batchnorm_math.h, shared by the CPU loops and the CUDA kernels.
// `variant` picks the CUDA kernels: 0 those of cuda/batchnorm_kernels.cu, 1 the bandwidth-bound
// ones of cuda/batchnorm_fast_kernels.cu (an 'auto' candidate until measured); CPU ignores it.
// Kernels register per dispatch key: cpu/batchnorm_cpu.cpp, cuda/batchnorm_cuda.cpp.

#include <Python.h>
#include <torch/library.h>

#include "cpu/block_cache.h"

TORCH_LIBRARY(fastres, m) {
  m.def("bn_stats(Tensor x, int variant=0) -> (Tensor mean, Tensor m2)");
  m.def(
      "bn_finalize(Tensor mean, Tensor m2, int count, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor scale, Tensor shift, Tensor invstd)");
  m.def(
      "bn_finalize_update(Tensor mean, Tensor m2, int count, Tensor? weight, Tensor? bias,"
      " float eps, Tensor(a!) running_mean, Tensor(b!) running_var,"
      " Tensor(c!)? num_batches_tracked, float? momentum)"
      " -> (Tensor scale, Tensor shift, Tensor invstd)");
  m.def(
      "bn_apply(Tensor x, Tensor scale, Tensor shift, Tensor? residual, Tensor? scale_r,"
      " Tensor? shift_r, bool relu, int variant=0) -> Tensor");
  m.def(
      "bn_backward_reduce(Tensor grad_out, Tensor x, Tensor scale, Tensor shift,"
      " Tensor? residual, Tensor? scale_r, Tensor? shift_r, bool relu, Tensor? mean,"
      " Tensor? mean_r, int variant=0) -> (Tensor sum_dy, Tensor sum_dy_xmu, Tensor sum_dy_rmu)");
  m.def(
      "bn_backward_elemt(Tensor grad_out, Tensor x, Tensor scale, Tensor shift,"
      " Tensor? residual, Tensor? scale_r, Tensor? shift_r, bool relu, Tensor? mean,"
      " Tensor? invstd, Tensor? sum_dy, Tensor? sum_dy_xmu, Tensor? mean_r, Tensor? invstd_r,"
      " Tensor? sum_dy_rmu, int count, bool grad_residual, int variant=0)"
      " -> (Tensor grad_x, Tensor grad_r)");
  m.def(
      "bn_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor shift, Tensor? residual,"
      " Tensor? scale_r, Tensor? shift_r, bool relu, Tensor mean, Tensor invstd, Tensor? mean_r,"
      " Tensor? invstd_r, int count, bool grad_residual, int variant=0) -> (Tensor grad_x,"
      " Tensor grad_r, Tensor grad_weight, Tensor grad_bias, Tensor grad_weight_r,"
      " Tensor grad_bias_r)");
  m.def("add_relu_(Tensor(a!) y, Tensor r) -> ()");
}

// A plain module object: importing fastres._C loads this library, whose static initialisers
// register the operators above with the dispatcher. Its functions are the CPU block cache's
// (cpu/block_cache.h), called once per block, so no pybind11, to keep the build short.
namespace {

PyObject* cpu_cache_enter(PyObject*, PyObject*) {
  return PyBool_FromLong(fastres::cpu_cache_enter());
}

PyObject* cpu_cache_exit(PyObject*, PyObject*) {
  fastres::cpu_cache_exit();
  Py_RETURN_NONE;
}

PyObject* cpu_cache_pause(PyObject*, PyObject*) {
  return PyLong_FromLong(fastres::cpu_cache_pause());
}

PyObject* cpu_cache_resume(PyObject*, PyObject* depth) {
  const long value = PyLong_AsLong(depth);
  if (value == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  fastres::cpu_cache_resume(static_cast<int>(value));
  Py_RETURN_NONE;
}

PyObject* cpu_cache_release(PyObject*, PyObject*) {
  fastres::cpu_cache_release();
  Py_RETURN_NONE;
}

PyObject* cpu_cache_stats(PyObject*, PyObject*) {
  const fastres::CpuCacheStats s = fastres::cpu_cache_stats();
  return Py_BuildValue("(KKKK)", static_cast<unsigned long long>(s.live_bytes),
                       static_cast<unsigned long long>(s.cached_bytes),
                       static_cast<unsigned long long>(s.hits),
                       static_cast<unsigned long long>(s.misses));
}

PyMethodDef methods[] = {
    {"cpu_cache_enter", cpu_cache_enter, METH_NOARGS, "Enters a block-cache scope on this thread."},
    {"cpu_cache_exit", cpu_cache_exit, METH_NOARGS, "Leaves the innermost CPU block-cache scope."},
    {"cpu_cache_pause", cpu_cache_pause, METH_NOARGS, "Leaves all scopes; returns how many."},
    {"cpu_cache_resume", cpu_cache_resume, METH_O, "Re-enters the scopes cpu_cache_pause left."},
    {"cpu_cache_release", cpu_cache_release, METH_NOARGS, "Frees the cached CPU blocks."},
    {"cpu_cache_stats", cpu_cache_stats, METH_NOARGS, "(live bytes, cached bytes, hits, misses)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
