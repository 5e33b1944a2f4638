// The library-GEMM path of every op: device-generic ATen code (GEMMs from the BLAS library through ATen,
// i.e. cuBLAS on CUDA and MKL/OpenBLAS on CPU) around the small fused epilogues of epilogue.h. The op
// dispatchers (csrc/ops) call these after their argument checks, with the plan they chose
// (library/plan.h). Semantics and return dtypes are those of the ops (csrc/ccluster.cpp). Nothing here
// reads device data on the host, but for a packed plan forced without a host copy of the pair mask.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "library/plan.h"
#include "numerics.h"

namespace ccluster {
namespace library {

// The pairs an op computes.
struct PairMask {
  at::Tensor dev;       // [N, C] bool on x's device; undefined: every pair
  at::Tensor host;      // the same mask on the CPU when it is at hand without a device synchronisation
  PairCounts counts;    // of host, when defined
  bool defined() const { return dev.defined(); }
};

// [N, C] in the accumulation type (float32 for float16/bfloat16/float32 inputs, float64 for float64).
at::Tensor exemplar_logsumexp(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q, double alpha,
                              Metric metric, const PairMask& pairs, Plan plan);

// Gradients in the dtypes of x, db, log_q (empty where output_mask is false). `pairs`: the forward's
// pairs; the pairs whose gradient is 0 take no part.
std::tuple<at::Tensor, at::Tensor, at::Tensor> exemplar_logsumexp_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
    const at::Tensor& logz, double alpha, Metric metric, const PairMask& pairs, Plan plan,
    std::array<bool, 3> output_mask);

// (loss in x's dtype, logz [N, C] in the accumulation type, dL/dx in x's dtype or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cc_loss(const at::Tensor& x, const at::Tensor& weight,
                                                       const PairMask& pairs, const at::Tensor& db,
                                                       const at::Tensor& log_q, double alpha, Metric metric,
                                                       bool grad_x, Plan plan);

// (logz [N, C], log_eta [C, n]) in x's dtype. `pairs`: weight > 0 (dev), and on the host a mask that
// contains it (a superset is allowed: the pairs of weight 0 are skipped).
std::tuple<at::Tensor, at::Tensor> fit_step(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
                                            const at::Tensor& weight, const PairMask& pairs, double alpha,
                                            Metric metric, Plan plan);

}  // namespace library
}  // namespace ccluster
