// Every operator schema of the ccluster library, in one place. Each op's dispatcher (argument checks,
// which implementation runs, the library path's plan) is csrc/ops/<op>.cpp; the kernels are in csrc/cpu,
// csrc/cuda and csrc/library. Fake kernels and autograd formulas are registered from ccluster/ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "library/plan.h"
#include "library/settings.h"

// `import ccluster._C` loads this shared object: the static TORCH_LIBRARY initialisers below register the
// operators with the dispatcher. The module itself carries the kernel settings (read by every op when it
// runs; ccluster/settings.py is their Python face), _set_setting(name, int) and _get_setting(name), and
// the cost model of the library path's plans, _estimate_plans(...).
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

PyObject* estimate_tuple(const ccluster::library::Estimate& e) {
  return Py_BuildValue("(ddLLLd)", e.gflop, e.gbyte, static_cast<long long>(e.pieces),
                       static_cast<long long>(e.launches), static_cast<long long>(e.syncs), e.seconds);
}

// _estimate_plans(device, dtype, tf32, N, C, n, m, gemms, epilogues, workspace, has_pairs, counts_known, Ca,
//                 Rmax, requested) -> (plan code, reason, dense estimate, packed estimate); an estimate is
// (GFLOP, GB, pieces, launches, syncs, seconds).
PyObject* estimate_plans(PyObject*, PyObject* args) {
  const char* device = nullptr;
  const char* dtype = nullptr;
  int tf32 = 0, has_pairs = 0, known = 0, gemms = 1, epilogues = 1, requested = 0;
  long long N = 0, C = 0, n = 0, m = 0, workspace = 0, Ca = 0, Rmax = 0;
  if (!PyArg_ParseTuple(args, "sspLLLLiiLppLLi", &device, &dtype, &tf32, &N, &C, &n, &m, &gemms, &epilogues,
                        &workspace, &has_pairs, &known, &Ca, &Rmax, &requested))
    return nullptr;
  try {
    using namespace ccluster::library;
    Workload w;
    w.device = at::Device(std::string(device));
    const std::string dt(dtype);
    w.dtype = dt == "float64" ? at::kDouble : dt == "float16" ? at::kHalf : dt == "bfloat16" ? at::kBFloat16 : at::kFloat;
    w.tf32 = tf32 != 0;
    w.N = N, w.C = C, w.n = n, w.m = m;
    w.gemms = gemms, w.epilogues = epilogues, w.workspace = workspace;
    w.has_pairs = has_pairs != 0;
    w.counts.known = known != 0;
    if (known) {
      w.counts.cls.assign(static_cast<size_t>(Ca), 0);
      w.counts.Rmax = Rmax;
    }
    TORCH_CHECK_VALUE(requested >= 0 && requested <= 2, "_estimate_plans: requested plan code must be 0 .. 2");
    const Choice ch = choose_plan(w, static_cast<Plan>(requested));
    PyObject* d = estimate_tuple(ch.dense);
    PyObject* p = estimate_tuple(ch.packed);
    PyObject* out = Py_BuildValue("(isNN)", static_cast<int>(ch.plan), ch.reason.c_str(), d, p);
    return out;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"_set_setting", set_setting, METH_VARARGS, "Set one kernel setting (name, int value)."},
    {"_get_setting", get_setting, METH_VARARGS, "Read one kernel setting by name."},
    {"_estimate_plans", estimate_plans, METH_VARARGS, "The library path's cost model for one workload."},
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
  // (the Python front-end casts to x's dtype; autograd keeps the float32 logz for the backward). pairs may
  // be a CPU tensor when x is on an accelerator: the label-sparse plan is then laid out on the host.
  m.def("exemplar_logsumexp(Tensor x, Tensor db, Tensor log_q, float alpha, str metric, Tensor? pairs) "
        "-> Tensor");
  // Gradients of sum(grad * out) for x, db, log_q (each only where output_mask says so; the others come
  // back empty). Recomputes distance tiles from the saved out. grad and logz may come in x's dtype or in the
  // accumulation type (float32 for float16/bfloat16): the forward returns logz in the latter.
  m.def("exemplar_logsumexp_backward(Tensor grad, Tensor x, Tensor db, Tensor log_q, Tensor logz, "
        "float alpha, str metric, Tensor? pairs, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Convex clustering loss L = -sum_{pairs} weight[s, c] * logz[s, c]. Returns (L, logz on the pairs in the
  // accumulation type, dL/dx accumulated in the same pass when grad_x, else empty). The autograd formula
  // (ccluster/ops.py) owns the third output: its backward scales it in place into the gradient of x.
  // pairs may be a CPU tensor when x is on an accelerator (as for exemplar_logsumexp).
  m.def("cc_loss(Tensor x, Tensor weight, Tensor pairs, Tensor db, Tensor log_q, float alpha, str metric, "
        "bool grad_x) -> (Tensor, Tensor, Tensor)");
  // One convex-clustering pass over the pairs with weight > 0: (logz [N, C], log_eta [C, n]). pairs: an
  // optional CPU mask that contains weight > 0, for a label-sparse plan without a device read.
  m.def("fit_step(Tensor x, Tensor db, Tensor log_q, Tensor weight, float alpha, str metric, "
        "Tensor? pairs=None) -> (Tensor, Tensor)");
}
