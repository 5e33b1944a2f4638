// The hand-written fused kernels of each backend, as the op dispatchers (csrc/ops/*.cpp) call them:
// with checked arguments, the metric parsed, on the device of x, and (pairs) a mask on that device.
// The kernels choose nothing: the dispatcher of each op decides which implementation runs.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "numerics.h"

namespace ccluster {
namespace kernels {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

struct Fused {
  // [N, C] logz in the accumulation type
  at::Tensor (*lse_forward)(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q, double alpha,
                            Metric metric, const c10::optional<at::Tensor>& pairs);
  // gradients of x, db, log_q in their dtypes (empty where output_mask is false)
  Grads (*lse_backward)(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
                        const at::Tensor& logz, double alpha, Metric metric, const c10::optional<at::Tensor>& pairs,
                        std::array<bool, 3> output_mask);
  // (loss, logz, dL/dx or empty)
  Grads (*cc_loss)(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& pairs, const at::Tensor& db,
                   const at::Tensor& log_q, double alpha, Metric metric, bool grad_x);
  // (logz, log_eta)
  std::tuple<at::Tensor, at::Tensor> (*fit_step)(const at::Tensor& x, const at::Tensor& db,
                                                 const at::Tensor& log_q, const at::Tensor& weight, double alpha,
                                                 Metric metric);
};

// The fused kernels for x's device; a clear error where this build has none.
const Fused& fused_for(const at::Device& device, const char* op);
// Called once by the CUDA translation unit's static initialiser (csrc/cuda/registration.cu).
void register_cuda_fused(const Fused* table);

// The CPU kernels (csrc/cpu).
namespace cpu {
at::Tensor lse_forward(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q, double alpha,
                       Metric metric, const c10::optional<at::Tensor>& pairs);
Grads lse_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
                   const at::Tensor& logz, double alpha, Metric metric, const c10::optional<at::Tensor>& pairs,
                   std::array<bool, 3> output_mask);
Grads cc_loss(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& pairs, const at::Tensor& db,
              const at::Tensor& log_q, double alpha, Metric metric, bool grad_x);
std::tuple<at::Tensor, at::Tensor> fit_step(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
                                            const at::Tensor& weight, double alpha, Metric metric);
}  // namespace cpu

}  // namespace kernels
}  // namespace ccluster
