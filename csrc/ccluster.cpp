// Every operator schema of the ccluster library, in one place. Kernels live in csrc/cpu and csrc/cuda;
// fake kernels and autograd formulas are registered from ccluster/ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "library/settings.h"

// `import ccluster._C` loads this shared object: the static TORCH_LIBRARY initialisers below register the
// operators with the dispatcher. The module itself only carries the kernel settings (read by every op
// when it runs; ccluster/settings.py is their Python face): _set_setting(name, int), _get_setting(name).
namespace {

PyObject* set_setting(PyObject*, PyObject* args) {
  const char* name = nullptr;
  long long value = 0;
  if (!PyArg_ParseTuple(args, "sL", &name, &value)) return nullptr;
  try {
    if (!ccluster::library::set_setting(name, value)) {
      PyErr_Format(PyExc_KeyError, "ccluster settings: unknown setting '%s'", name);
      return nullptr;
    }
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* get_setting(PyObject*, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  int64_t value = 0;
  if (!ccluster::library::get_setting(name, &value)) {
    PyErr_Format(PyExc_KeyError, "ccluster settings: unknown setting '%s'", name);
    return nullptr;
  }
  return PyLong_FromLongLong(static_cast<long long>(value));
}

PyMethodDef methods[] = {
    {"_set_setting", set_setting, METH_VARARGS, "Set one kernel setting (name, int value)."},
    {"_get_setting", get_setting, METH_VARARGS, "Read one kernel setting by name."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(ccluster, m) {
  // out[s, c] = log sum_j exp(log_q[c, j] - alpha * d(x[s], db[c, j])); with pairs, only those entries
  // (0 elsewhere). In the accumulation type: float32 for float16/bfloat16/float32, float64 for float64
  // (the Python front-end casts to x's dtype; autograd keeps the float32 logz for the backward).
  m.def("exemplar_logsumexp(Tensor x, Tensor db, Tensor log_q, float alpha, str metric, Tensor? pairs) "
        "-> Tensor");
  // Gradients of sum(grad * out) for x, db, log_q (each only where output_mask says so; the others come
  // back empty). Recomputes distance tiles from the saved out. grad and logz may come in x's dtype or in the
  // accumulation type (float32 for float16/bfloat16): the forward returns logz in the latter.
  m.def("exemplar_logsumexp_backward(Tensor grad, Tensor x, Tensor db, Tensor log_q, Tensor logz, "
        "float alpha, str metric, Tensor? pairs, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Convex clustering loss L = -sum_{pairs} weight[s, c] * logz[s, c]. Returns (L, logz on the pairs in the
  // accumulation type,
  // dL/dx accumulated in the same pass when grad_x, else empty). The autograd formula (ccluster/ops.py)
  // owns the third output: its backward scales it in place into the gradient of x.
  m.def("cc_loss(Tensor x, Tensor weight, Tensor pairs, Tensor db, Tensor log_q, float alpha, str metric, "
        "bool grad_x) -> (Tensor, Tensor, Tensor)");
  // One convex-clustering pass over the pairs with weight > 0: (logz [N, C], log_eta [C, n]).
  m.def("fit_step(Tensor x, Tensor db, Tensor log_q, Tensor weight, float alpha, str metric) "
        "-> (Tensor, Tensor)");
}
