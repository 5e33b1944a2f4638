// The library-GEMM path of every op: device-generic ATen code (GEMMs from the BLAS library through ATen,
// i.e. cuBLAS on CUDA and MKL/OpenBLAS on CPU) around the small fused epilogues of epilogue.h. The op
// entry points (csrc/cpu/*.cpp, csrc/cuda/*.cu) call these after their argument checks when
// use_library(device) says so. Semantics and return dtypes are those of the ops (csrc/ccluster.cpp).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "common.h"

namespace ccluster {
namespace library {

// [N, C] in the accumulation type (float32 for float16/bfloat16/float32 inputs, float64 for float64).
at::Tensor exemplar_logsumexp(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q, double alpha,
                              Metric metric, const c10::optional<at::Tensor>& pairs);

// Gradients in the dtypes of x, db, log_q (empty where output_mask is false).
std::tuple<at::Tensor, at::Tensor, at::Tensor> exemplar_logsumexp_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
    const at::Tensor& logz, double alpha, Metric metric, const c10::optional<at::Tensor>& pairs,
    std::array<bool, 3> output_mask);

// (loss in x's dtype, logz [N, C] in the accumulation type, dL/dx in x's dtype or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cc_loss(const at::Tensor& x, const at::Tensor& weight,
                                                       const at::Tensor& pairs, const at::Tensor& db,
                                                       const at::Tensor& log_q, double alpha, Metric metric,
                                                       bool grad_x);

// (logz [N, C], log_eta [C, n]) in x's dtype.
std::tuple<at::Tensor, at::Tensor> fit_step(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
                                            const at::Tensor& weight, double alpha, Metric metric);

}  // namespace library
}  // namespace ccluster
