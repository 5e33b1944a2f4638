// Dispatcher of exemplar_logsumexp and its backward: argument checks, then the fused kernels of x's
// device or the library path with the plan of the cost model (csrc/ops/dispatch.h).
#include <torch/library.h>

#include "ops/dispatch.h"

namespace ccluster {
namespace ops {

at::Tensor exemplar_logsumexp(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q, double alpha,
                              c10::string_view metric_name, const c10::optional<at::Tensor>& pairs) {
  const char* op = "exemplar_logsumexp";
  check_inputs(op, x, db, log_q, alpha);
  const Metric metric = parse_metric(op, metric_name);
  if (pairs.has_value()) check_pairs(op, "pairs", *pairs, x, db, /*is_mask=*/true, /*host_ok=*/true);
  const c10::OptionalDeviceGuard guard(x.device());
  const at::NoGradGuard no_grad;  // the kernels' own ATen calls are not part of any graph
  library::PairMask pm = pair_mask(pairs.has_value() ? *pairs : at::Tensor(), x);
  const Route r = route(x, db, pm, /*gemms=*/1, /*epilogues=*/1);
  if (r.library) return library::exemplar_logsumexp(x, db, log_q, alpha, metric, pm, r.plan);
  const c10::optional<at::Tensor> dev = pm.defined() ? c10::optional<at::Tensor>(pm.dev) : c10::nullopt;
  return kernels::fused_for(x.device(), op).lse_forward(x, db, log_q, alpha, metric, dev);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> exemplar_logsumexp_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
    const at::Tensor& logz, double alpha, c10::string_view metric_name, const c10::optional<at::Tensor>& pairs,
    std::array<bool, 3> output_mask) {
  const char* op = "exemplar_logsumexp_backward";
  check_inputs(op, x, db, log_q, alpha);
  const Metric metric = parse_metric(op, metric_name);
  check_values(op, "grad", grad, x, db);
  check_values(op, "logz", logz, x, db);
  if (pairs.has_value()) check_pairs(op, "pairs", *pairs, x, db, /*is_mask=*/true, /*host_ok=*/true);
  const c10::OptionalDeviceGuard guard(x.device());
  const at::NoGradGuard no_grad;  // the kernels' own ATen calls are not part of any graph
  library::PairMask pm = pair_mask(pairs.has_value() ? *pairs : at::Tensor(), x);
  const int gemms = 1 + int(output_mask[0]) + int(output_mask[1]);
  const Route r = route(x, db, pm, gemms, /*epilogues=*/1 + int(output_mask[1] || output_mask[2]));
  if (r.library)
    return library::exemplar_logsumexp_backward(grad, x, db, log_q, logz, alpha, metric, pm, r.plan, output_mask);
  const c10::optional<at::Tensor> dev = pm.defined() ? c10::optional<at::Tensor>(pm.dev) : c10::nullopt;
  return kernels::fused_for(x.device(), op).lse_backward(grad, x, db, log_q, logz, alpha, metric, dev, output_mask);
}

TORCH_LIBRARY_IMPL(ccluster, CPU, m) {
  m.impl("exemplar_logsumexp", &exemplar_logsumexp);
  m.impl("exemplar_logsumexp_backward", &exemplar_logsumexp_backward);
}

}  // namespace ops
}  // namespace ccluster
