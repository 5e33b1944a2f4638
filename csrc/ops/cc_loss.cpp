// Dispatcher of cc_loss: argument checks, the checks of values (eager on the CPU, a device flag that
// turns the loss and dL/dx into NaN elsewhere: csrc/ops/dispatch.h), then the fused kernels of x's
// device or the library path with the plan of the cost model.
#include <torch/library.h>

#include "ops/dispatch.h"

namespace ccluster {
namespace ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cc_loss(const at::Tensor& x, const at::Tensor& weight,
                                                       const at::Tensor& pairs, const at::Tensor& db,
                                                       const at::Tensor& log_q, double alpha,
                                                       c10::string_view metric_name, bool grad_x) {
  const char* op = "convex_clustering_loss";
  check_inputs(op, x, db, log_q, alpha);
  const Metric metric = parse_metric(op, metric_name);
  check_pairs(op, "pairs", pairs, x, db, /*is_mask=*/true, /*host_ok=*/true);
  check_pairs(op, "attention", weight, x, db, /*is_mask=*/false);
  const c10::OptionalDeviceGuard guard(x.device());
  const at::NoGradGuard no_grad;  // the kernels' own ATen calls are not part of any graph
  library::PairMask pm = pair_mask(pairs, x);
  at::Tensor bad;
  if (value_checks_eager(x)) {
    raise_bad_attention(op, weight, pm.dev);
    raise_bad_log_probabilities(op, log_q);
  } else {
    bad = at::logical_or(bad_attention(weight, pm.dev), bad_log_probabilities(log_q));
  }
  const Route r = route(x, db, pm, /*gemms=*/grad_x ? 2 : 1, /*epilogues=*/1);
  auto out = r.library ? library::cc_loss(x, weight, pm, db, log_q, alpha, metric, grad_x, r.plan)
                       : kernels::fused_for(x.device(), op).cc_loss(x, weight, pm.dev, db, log_q, alpha, metric,
                                                                    grad_x);
  if (bad.defined()) {
    poison(std::get<0>(out), bad);
    poison(std::get<2>(out), bad);
  }
  return out;
}

TORCH_LIBRARY_IMPL(ccluster, CPU, m) { m.impl("cc_loss", &cc_loss); }

}  // namespace ops
}  // namespace ccluster
