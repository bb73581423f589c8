// The opqn_ext._C Python module. Importing it loads the ops library (libopqn_ext_ops), whose static
// initializers register every op with the dispatcher; the module itself only reports how the library
// was built and lets tests pick the CPU instruction-set path, through the library's C++ API.
#include <Python.h>

#include <string>

#include <c10/util/Exception.h>

#include "opqn_ext/ops.h"

namespace {

PyObject* available_cpu_isas(PyObject*, PyObject*) {
  const auto isas = opqn_ext::available_cpu_isas();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(isas.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < isas.size(); ++i)
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), PyUnicode_FromString(isas[i].c_str()));
  return list;
}

PyObject* active_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(opqn_ext::active_cpu_isa().c_str());
}

PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  try {
    opqn_ext::set_cpu_isa(name);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* cuda_built(PyObject*, PyObject*) { return PyBool_FromLong(opqn_ext::cuda_built()); }

PyMethodDef methods[] = {
    {"available_cpu_isas", available_cpu_isas, METH_NOARGS, "CPU instruction-set paths this machine runs."},
    {"active_cpu_isa", active_cpu_isa, METH_NOARGS, "The CPU instruction-set path in use."},
    {"set_cpu_isa", set_cpu_isa, METH_O, "Force a CPU instruction-set path: 'scalar', 'avx2' or 'avx512'."},
    {"cuda_built", cuda_built, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "opqn_ext compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
