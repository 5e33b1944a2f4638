// Argument checks of the op dispatchers (csrc/ops). One exception type per kind of mistake, the same in
// ccluster/ops.py and the Python wrappers: a wrong dtype is a TypeError (TORCH_CHECK_TYPE), a wrong
// shape, device or value a ValueError (TORCH_CHECK_VALUE). Messages match ccluster/ops.py. Kernels do not
// include this header: they receive checked arguments (csrc/ops/kernels.h) and share csrc/numerics.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <string>

#include "numerics.h"

namespace ccluster {

inline Metric parse_metric(const char* op, c10::string_view metric) {
  if (metric == "sqeuclidean") return Metric::SqEuclidean;
  if (metric == "euclidean") return Metric::Euclidean;
  TORCH_CHECK_VALUE(false, op, ": metric must be 'sqeuclidean' or 'euclidean', got '", std::string(metric), "'");
}

// Checks shared by every op that reads (x, db, log_q, alpha).
inline void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
                         double alpha) {
  TORCH_CHECK_TYPE(x.is_floating_point(), op, ": x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK_TYPE(db.is_floating_point(), op, ": db must be a floating-point tensor, got ", db.scalar_type());
  TORCH_CHECK_TYPE(log_q.is_floating_point(), op, ": log_q must be a floating-point tensor, got ",
                   log_q.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be [N, m], got shape ", x.sizes());
  TORCH_CHECK_VALUE(db.dim() == 3, op, ": db must be [C, n, m], got shape ", db.sizes());
  TORCH_CHECK_VALUE(log_q.dim() == 2, op, ": log_q must be [C, n], got shape ", log_q.sizes());
  TORCH_CHECK_VALUE(db.size(2) == x.size(1), op, ": db feature size m=", db.size(2), " does not match x's m=",
                    x.size(1));
  TORCH_CHECK_VALUE(log_q.size(0) == db.size(0) && log_q.size(1) == db.size(1), op,
                    ": log_q must be [C, n] = [", db.size(0), ", ", db.size(1), "] to match db, got ",
                    log_q.sizes());
  TORCH_CHECK_TYPE(db.scalar_type() == x.scalar_type() && log_q.scalar_type() == x.scalar_type(), op,
                   ": x, db and log_q must have one dtype, got ", x.scalar_type(), ", ", db.scalar_type(), ", ",
                   log_q.scalar_type());
  TORCH_CHECK_VALUE(db.device() == x.device() && log_q.device() == x.device(), op,
                    ": x, db and log_q must be on one device, got ", x.device(), ", ", db.device(), ", ",
                    log_q.device());
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha > 0, op, ": alpha must be a finite number > 0, got ", alpha);
}

// pairs-like [N, C] arguments: a bool mask, or a weight of x's dtype. A mask may also live on the CPU when
// x is on an accelerator (host_ok): the op then plans the label-sparse layout on the host, without a
// device synchronisation (csrc/ops/dispatch.h).
inline void check_pairs(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                        const at::Tensor& db, bool is_mask, bool host_ok = false) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == db.size(0), op, ": ", name,
                    " must be [N, C] = [", x.size(0), ", ", db.size(0), "], got ", t.sizes());
  if (is_mask) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kBool, op, ": ", name, " must be a bool tensor, got ",
                     t.scalar_type());
  } else {
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ",
                     x.scalar_type(), ", got ", t.scalar_type());
  }
  TORCH_CHECK_VALUE(t.device() == x.device() || (host_ok && t.is_cpu()), op, ": ", name,
                    " must be on x's device ", x.device(), host_ok ? " (or on the CPU)" : "", ", got ",
                    t.device());
}

// [N, C] values that may come in x's dtype or in the accumulation type (grad and logz of the backward).
inline void check_values(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                         const at::Tensor& db) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == db.size(0), op, ": ", name,
                    " must be [N, C] = [", x.size(0), ", ", db.size(0), "], got ", t.sizes());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type() || t.scalar_type() == acc, op, ": ", name,
                   " must have x's dtype ", x.scalar_type(), " or ", acc, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
                    t.device());
}

// Checks of values. Each returns a 0-dim bool tensor on the data's device, true when the values are bad,
// computed without reading anything back to the host; raise_if_bad reads it (a device synchronisation on
// an accelerator) and raises with the message. The dispatchers decide which of the two happens
// (csrc/ops/dispatch.h: value_checks_eager).

// The loss's weights p(s|x): >= 0 on the pairs. NaN is not an error: it propagates to the loss, as NaN
// in x does.
inline at::Tensor bad_attention(const at::Tensor& weight, const at::Tensor& pairs) {
  return at::logical_and(pairs, weight.lt(0)).any();
}
inline void raise_bad_attention(const char* op, const at::Tensor& weight, const at::Tensor& pairs) {
  const at::Tensor bad = at::logical_and(pairs, weight.lt(0));
  if (bad.any().item<bool>()) {
    TORCH_CHECK_VALUE(false, op, ": attention must be >= 0 on the pairs (it weights -log z), got ",
                      weight.masked_select(bad).min().item<double>());
  }
}

// The loss's log_q: log-probabilities, <= 0 (-inf marks an empty slot; NaN propagates). A positive entry
// is q > 1, usually q passed where log q was meant.
inline at::Tensor bad_log_probabilities(const at::Tensor& log_q) { return log_q.gt(0).any(); }
inline void raise_bad_log_probabilities(const char* op, const at::Tensor& log_q) {
  const at::Tensor bad = log_q.gt(0);
  if (bad.any().item<bool>()) {
    TORCH_CHECK_VALUE(false, op, ": log_q must be log-probabilities (<= 0, -inf for an empty slot), got ",
                      log_q.masked_select(bad).max().item<double>(), " (pass log q, not q)");
  }
}

// The fit's weights: finite and >= 0 (a NaN weight would otherwise drop its pair without a trace).
inline at::Tensor bad_fit_weight(const at::Tensor& weight) {
  return at::logical_not(at::logical_and(at::isfinite(weight), weight.ge(0))).any();
}
inline void raise_bad_fit_weight(const char* op, const at::Tensor& weight) {
  const at::Tensor bad = at::logical_not(at::logical_and(at::isfinite(weight), weight.ge(0)));
  if (bad.any().item<bool>()) {
    TORCH_CHECK_VALUE(false, op, ": weight must be finite and >= 0, got ",
                      weight.masked_select(bad).flatten()[0].item<double>());
  }
}

}  // namespace ccluster
