// The op schemas of the dla_fast namespace (schema.h, generated from dla_fast/backends/schema.py) and the Python
// module object `dla_fast._C`. Importing the module runs the static registrars of this library: the schemas below
// and the CUDA kernels of conv_bn_act.cpp, aggregate.cpp and max_pool.cpp. The module is a bare CPython module (no
// pybind11) to keep the build short; its functions are defined here and, for the ops' direct entry points, in
// direct.cpp.
#include <Python.h>

#include <torch/library.h>

#include "ops/direct.h"
#include "ops/schema.h"

namespace dla_fast {
const char* last_kernel();
}

TORCH_LIBRARY(dla_fast, m) {
  for (const char* s : dla_fast::kFusedOpSchemas) m.def(s);
  for (const char* s : dla_fast::kCudaOnlyOpSchemas) m.def(s);
}

namespace {
PyObject* py_last_kernel(PyObject*, PyObject*) { return PyUnicode_FromString(dla_fast::last_kernel()); }

PyObject* py_wgmma_built(PyObject*, PyObject*) {
#ifdef DLA_FAST_SM90A
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"last_kernel", py_last_kernel, METH_NOARGS,
     "Which kernel the last dla_fast CUDA op on this thread launched (e.g. 'tc f16 vw8 bn64', 'wgmma bf16 bn128 "
     "tma', 'simt f32', 'max_pool f16 vw8'); for tests and benchmarks."},
    {"wgmma_built", py_wgmma_built, METH_NOARGS,
     "Whether this build has the sm_90a (Hopper wgmma) kernels; they run on compute capability 9.x devices."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "dla_fast CUDA kernels (ops under torch.ops.dla_fast)", -1,
                          methods};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m != nullptr && PyModule_AddFunctions(m, dla_fast::direct_methods()) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
