// The hand-written fused CUDA kernels (backend "fused"), as csrc/cuda/registration.cu lists them for the
// op dispatchers (csrc/ops/kernels.h: checked arguments, the metric parsed, pairs on x's device).
#pragma once

#include <ATen/ATen.h>

#include "ops/kernels.h"

namespace ccluster {
namespace cuda {

at::Tensor lse_forward(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q, double alpha,
                       Metric metric, const c10::optional<at::Tensor>& pairs);
kernels::Grads lse_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& db,
                            const at::Tensor& log_q, const at::Tensor& logz, double alpha, Metric metric,
                            const c10::optional<at::Tensor>& pairs, std::array<bool, 3> output_mask);
kernels::Grads cc_loss(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& pairs, const at::Tensor& db,
                       const at::Tensor& log_q, double alpha, Metric metric, bool grad_x);
std::tuple<at::Tensor, at::Tensor> fit_step(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
                                            const at::Tensor& weight, double alpha, Metric metric);

}  // namespace cuda
}  // namespace ccluster
