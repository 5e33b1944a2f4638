// Dispatcher of fit_step: argument checks, the check of the weights (eager on the CPU, a device flag
// that turns the results into NaN elsewhere: csrc/ops/dispatch.h), then the fused kernels of x's device
// or the library path with the plan of the cost model. The optional `pairs` is a host mask that contains
// weight > 0 (fit_representativeness passes it once per fit): with it the label-sparse plan needs no
// device read.
#include <torch/library.h>

#include "ops/dispatch.h"

namespace ccluster {
namespace ops {

std::tuple<at::Tensor, at::Tensor> fit_step(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
                                            const at::Tensor& weight, double alpha, c10::string_view metric_name,
                                            const c10::optional<at::Tensor>& pairs) {
  const char* op = "fit_step";
  check_inputs(op, x, db, log_q, alpha);
  const Metric metric = parse_metric(op, metric_name);
  check_pairs(op, "weight", weight, x, db, /*is_mask=*/false);
  if (pairs.has_value()) {
    check_pairs(op, "pairs", *pairs, x, db, /*is_mask=*/true, /*host_ok=*/true);
    TORCH_CHECK_VALUE(pairs->is_cpu(), op, ": pairs must be a CPU tensor (a host mask of weight > 0), got ",
                      pairs->device());
  }
  const c10::OptionalDeviceGuard guard(x.device());
  const at::NoGradGuard no_grad;  // the kernels' own ATen calls are not part of any graph
  at::Tensor bad;
  if (value_checks_eager(x)) {
    raise_bad_fit_weight(op, weight);
  } else {
    bad = bad_fit_weight(weight);
  }
  std::tuple<at::Tensor, at::Tensor> out;
  if (use_library(x.device())) {
    library::PairMask pm;
    pm.dev = weight.gt(0);
    if (x.is_cpu()) pm.host = pm.dev;  // free on the CPU
    else if (pairs.has_value()) pm.host = *pairs;
    const Route r = route(x, db, pm, /*gemms=*/1, /*epilogues=*/2);
    out = library::fit_step(x, db, log_q, weight, pm, alpha, metric, r.plan);
  } else {
    out = kernels::fused_for(x.device(), op).fit_step(x, db, log_q, weight, alpha, metric);
  }
  if (bad.defined()) {
    poison(std::get<0>(out), bad);
    poison(std::get<1>(out), bad);
  }
  return out;
}

TORCH_LIBRARY_IMPL(ccluster, CPU, m) { m.impl("fit_step", &fit_step); }

}  // namespace ops
}  // namespace ccluster
