// The fused ops as plain Python functions of dla_fast._C (conv_bn_act, aggregate, max_pool), for eager calls on
// CUDA tensors. A call through torch.ops builds a boxed argument stack from the Python objects, matches it against
// the schema and goes through the dispatcher; at small batches and in host-paced detection calls the host's time per
// layer is the forward's time, and that path costs several microseconds of it. These take the same arguments as
// the ops and run the same kernels (conv_bn_act_cuda and the others), so they give the same results.
// dla_fast/backends/cuda.py calls them only for plain CUDA tensors outside torch.compile and jit tracing; tensor
// subclasses, fake and meta tensors and traced calls keep the registered ops, which those mechanisms see.
#include <array>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "ops/direct.h"

namespace dla_fast {

at::Tensor conv_bn_act_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                            const std::optional<at::Tensor>& bias_in, at::IntArrayRef stride, at::IntArrayRef padding,
                            int64_t groups, const std::optional<at::Tensor>& residual_in, bool relu,
                            at::IntArrayRef config);
at::Tensor aggregate_cuda(at::TensorList children_in, const at::Tensor& weight_in,
                          const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& residual_in,
                          bool relu, at::IntArrayRef config);
at::Tensor max_pool_cuda(const at::Tensor& x_in, int64_t k);

namespace {

// Argument parsing. A bad argument raises TypeError naming the op and the argument (torch's error translation
// turns the c10::TypeError into Python's).
[[noreturn]] void type_error(const char* op, const std::string& what) {
  throw c10::TypeError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, std::string("dla_fast._C.") + op + what);
}

[[noreturn]] void bad(const char* op, const char* arg, const char* want) {
  type_error(op, std::string(": ") + arg + " must be " + want);
}

const at::Tensor& tensor_arg(PyObject* o, const char* op, const char* arg) {
  if (!THPVariable_Check(o)) bad(op, arg, "a tensor");
  return THPVariable_Unpack(o);
}

std::optional<at::Tensor> opt_tensor_arg(PyObject* o, const char* op, const char* arg) {
  if (o == Py_None) return std::nullopt;
  return tensor_arg(o, op, arg);
}

// An int, or any integer type with __index__ (numpy's); not a bool, nor a float.
int64_t int_arg(PyObject* o, const char* op, const char* arg) {
  if (PyBool_Check(o) || PyFloat_Check(o)) bad(op, arg, "an int");
  PyObject* i = PyLong_Check(o) ? (Py_INCREF(o), o) : PyNumber_Index(o);
  if (i == nullptr) {
    PyErr_Clear();
    bad(op, arg, "an int");
  }
  const long long v = PyLong_AsLongLong(i);
  Py_DECREF(i);
  if (v == -1 && PyErr_Occurred()) throw python_error();
  return v;
}

// A tuple or list of at most N ints into `out`; returns how many.
template <size_t N>
size_t ints_arg(PyObject* o, std::array<int64_t, N>& out, const char* op, const char* arg, const char* want) {
  if (!PyTuple_Check(o) && !PyList_Check(o)) bad(op, arg, want);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
  if (n < 0 || static_cast<size_t>(n) > N) bad(op, arg, want);
  PyObject** items = PySequence_Fast_ITEMS(o);
  for (Py_ssize_t i = 0; i < n; ++i) out[i] = int_arg(items[i], op, arg);
  return static_cast<size_t>(n);
}

at::IntArrayRef pair_arg(PyObject* o, std::array<int64_t, 2>& buf, const char* op, const char* arg) {
  if (ints_arg(o, buf, op, arg, "a tuple of 2 ints") != 2) bad(op, arg, "a tuple of 2 ints");
  return at::IntArrayRef(buf.data(), 2);
}

at::IntArrayRef config_arg(PyObject* o, std::array<int64_t, 3>& buf, const char* op) {
  const size_t n = ints_arg(o, buf, op, "config", "a tuple of 0 or 3 ints");
  return at::IntArrayRef(buf.data(), n);
}

bool bool_arg(PyObject* o, const char* op, const char* arg) {
  if (PyBool_Check(o)) return o == Py_True;
  if (!PyLong_Check(o)) bad(op, arg, "a bool");
  return PyObject_IsTrue(o) == 1;  // 0 / 1
}

void check_nargs(Py_ssize_t got, Py_ssize_t want, const char* op) {
  if (got != want) type_error(op, " takes " + std::to_string(want) + " arguments, got " + std::to_string(got));
}

PyObject* py_conv_bn_act(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "conv_bn_act";
  check_nargs(nargs, 9, op);
  std::array<int64_t, 2> st{}, pad{};
  std::array<int64_t, 3> cfg{};
  const at::Tensor& x = tensor_arg(args[0], op, "x");
  const at::Tensor& w = tensor_arg(args[1], op, "weight");
  const std::optional<at::Tensor> bias = opt_tensor_arg(args[2], op, "bias");
  const at::IntArrayRef stride = pair_arg(args[3], st, op, "stride");
  const at::IntArrayRef padding = pair_arg(args[4], pad, op, "padding");
  const int64_t groups = int_arg(args[5], op, "groups");
  const std::optional<at::Tensor> residual = opt_tensor_arg(args[6], op, "residual");
  const bool relu = bool_arg(args[7], op, "relu");
  const at::IntArrayRef config = config_arg(args[8], cfg, op);
  RECORD_FUNCTION("dla_fast::conv_bn_act", std::vector<c10::IValue>());
  return THPVariable_Wrap(conv_bn_act_cuda(x, w, bias, stride, padding, groups, residual, relu, config));
  END_HANDLE_TH_ERRORS
}

PyObject* py_aggregate(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "aggregate";
  check_nargs(nargs, 6, op);
  PyObject* kids = args[0];
  if (!PyTuple_Check(kids) && !PyList_Check(kids)) bad(op, "children", "a list of tensors");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(kids);
  std::vector<at::Tensor> children;
  children.reserve(static_cast<size_t>(n));
  PyObject** items = PySequence_Fast_ITEMS(kids);
  for (Py_ssize_t i = 0; i < n; ++i) children.push_back(tensor_arg(items[i], op, "children"));
  std::array<int64_t, 3> cfg{};
  const at::Tensor& w = tensor_arg(args[1], op, "weight");
  const std::optional<at::Tensor> bias = opt_tensor_arg(args[2], op, "bias");
  const std::optional<at::Tensor> residual = opt_tensor_arg(args[3], op, "residual");
  const bool relu = bool_arg(args[4], op, "relu");
  const at::IntArrayRef config = config_arg(args[5], cfg, op);
  RECORD_FUNCTION("dla_fast::aggregate", std::vector<c10::IValue>());
  return THPVariable_Wrap(aggregate_cuda(children, w, bias, residual, relu, config));
  END_HANDLE_TH_ERRORS
}

PyObject* py_max_pool(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "max_pool";
  check_nargs(nargs, 2, op);
  const at::Tensor& x = tensor_arg(args[0], op, "x");
  const int64_t k = int_arg(args[1], op, "k");
  RECORD_FUNCTION("dla_fast::max_pool", std::vector<c10::IValue>());
  return THPVariable_Wrap(max_pool_cuda(x, k));
  END_HANDLE_TH_ERRORS
}

PyMethodDef kDirectMethods[] = {
    {"conv_bn_act", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_conv_bn_act)), METH_FASTCALL,
     "conv_bn_act(x, weight, bias, stride, padding, groups, residual, relu, config): torch.ops.dla_fast.conv_bn_act "
     "without the dispatcher, for plain CUDA tensors (stride, padding: 2 ints; config: () or 3 ints)."},
    {"aggregate", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_aggregate)), METH_FASTCALL,
     "aggregate(children, weight, bias, residual, relu, config): torch.ops.dla_fast.aggregate without the "
     "dispatcher, for plain CUDA tensors."},
    {"max_pool", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_max_pool)), METH_FASTCALL,
     "max_pool(x, k): torch.ops.dla_fast.max_pool without the dispatcher, for plain CUDA tensors."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* direct_methods() { return kDirectMethods; }

}  // namespace dla_fast
