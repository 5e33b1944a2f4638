// Every operator schema of the ccluster library, in one place. Kernels live in csrc/cpu and csrc/cuda;
// fake kernels and autograd formulas are registered from ccluster/ops.py.
#include <Python.h>
#include <torch/library.h>

// `import ccluster._C` only has to load this shared object: the static TORCH_LIBRARY initialisers
// below register the operators with the dispatcher. The module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(ccluster, m) {
  // out[s, c] = log sum_j exp(log_q[c, j] - alpha * d(x[s], db[c, j])); with pairs, only those entries
  // (0 elsewhere).
  m.def("exemplar_logsumexp(Tensor x, Tensor db, Tensor log_q, float alpha, str metric, Tensor? pairs) "
        "-> Tensor");
  // Gradients of sum(grad * out) for x, db, log_q (each only where output_mask says so; the others come
  // back empty). Recomputes distance tiles from the saved out.
  m.def("exemplar_logsumexp_backward(Tensor grad, Tensor x, Tensor db, Tensor log_q, Tensor logz, "
        "float alpha, str metric, Tensor? pairs, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Convex clustering loss L = -sum_{pairs} weight[s, c] * logz[s, c]. Returns (L, logz on the pairs,
  // dL/dx accumulated in the same pass when grad_x, else empty). The autograd formula (ccluster/ops.py)
  // owns the third output: its backward scales it in place into the gradient of x.
  m.def("cc_loss(Tensor x, Tensor weight, Tensor pairs, Tensor db, Tensor log_q, float alpha, str metric, "
        "bool grad_x) -> (Tensor, Tensor, Tensor)");
  // One convex-clustering pass over the pairs with weight > 0: (logz [N, C], log_eta [C, n]).
  m.def("fit_step(Tensor x, Tensor db, Tensor log_q, Tensor weight, float alpha, str metric) "
        "-> (Tensor, Tensor)");
}
