// What the op dispatchers (csrc/ops/<op>.cpp) share: which implementation runs, the library path's
// plan, the pair mask on the device and (when free) on the host, and the policy for checks of values.
// Each dispatcher makes every decision for its op in its own file by calling these; kernels decide
// nothing.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <string>

#include "common.h"
#include "library/epilogue.h"
#include "library/library_path.h"
#include "library/plan.h"
#include "library/settings.h"
#include "ops/kernels.h"

namespace ccluster {
namespace ops {

// The dispatcher functions, registered for the CPU key in csrc/ops/<op>.cpp and for the CUDA key in
// csrc/cuda/registration.cu.
at::Tensor exemplar_logsumexp(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q, double alpha,
                              c10::string_view metric, const c10::optional<at::Tensor>& pairs);
std::tuple<at::Tensor, at::Tensor, at::Tensor> exemplar_logsumexp_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
    const at::Tensor& logz, double alpha, c10::string_view metric, const c10::optional<at::Tensor>& pairs,
    std::array<bool, 3> output_mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cc_loss(const at::Tensor& x, const at::Tensor& weight,
                                                       const at::Tensor& pairs, const at::Tensor& db,
                                                       const at::Tensor& log_q, double alpha,
                                                       c10::string_view metric, bool grad_x);
std::tuple<at::Tensor, at::Tensor> fit_step(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
                                            const at::Tensor& weight, double alpha, c10::string_view metric,
                                            const c10::optional<at::Tensor>& pairs);

// "auto": the library path on CUDA, the fused kernels on the CPU (they are at the GEMM floor there).
inline bool use_library(const at::Device& device) {
  const auto b = static_cast<library::Backend>(library::settings().backend.load());
  if (b == library::Backend::Library) return true;
  if (b == library::Backend::Fused) return false;
  return device.is_cuda();
}

// True while x's stream is being captured into a CUDA graph (nothing may be read back then).
inline bool capturing(const at::Tensor& x) {
  return x.is_cuda() && library::has_cuda_epilogues() && library::epilogues_for(x.device(), "").capturing();
}

// Checks of values read the data and raise (eager), or leave a device flag that turns the results into
// NaN (deferred): eager on the CPU, where reading is free; deferred on an accelerator, where reading
// would synchronise the device, and always while a CUDA graph is captured. kernel_settings(check_values=
// "eager") forces the reads (a synchronisation per call: for debugging), "deferred" forbids them.
inline bool value_checks_eager(const at::Tensor& x) {
  switch (static_cast<library::CheckValues>(library::settings().check_values.load())) {
    case library::CheckValues::Eager:
      return !capturing(x);
    case library::CheckValues::Deferred:
      return false;
    default:
      return x.is_cpu();
  }
}

// NaN where the deferred check flag `bad` (0-dim bool on the device) is set; no host read.
inline void poison(at::Tensor& t, const at::Tensor& bad) {
  if (t.defined() && t.numel() > 0) t.masked_fill_(bad, std::numeric_limits<double>::quiet_NaN());
}

// A [N, C] mask as the ops use it: on x's device (an asynchronous copy from pinned memory when the caller
// passed it on the CPU) and, when it is on the CPU, as it is for a host layout (no synchronisation).
inline library::PairMask pair_mask(const at::Tensor& mask, const at::Tensor& x) {
  library::PairMask pm;
  if (!mask.defined()) return pm;
  if (mask.device() == x.device()) {
    pm.dev = mask;
  } else {
    pm.dev = mask.is_cpu() && !x.is_cpu() ? mask.contiguous().pin_memory().to(x.device(), /*non_blocking=*/true)
                                          : mask.to(x.device());
  }
  if (mask.is_cpu()) pm.host = mask;
  return pm;
}

// Which implementation runs one call, and the library path's plan.
struct Route {
  bool library = false;
  library::Plan plan = library::Plan::Dense;
  library::Choice choice;
};

// gemms / epilogues: the op's GEMM passes and epilogue launches per piece (the cost model's workload).
inline Route route(const at::Tensor& x, const at::Tensor& db, library::PairMask& pairs, int gemms, int epilogues) {
  Route r;
  r.library = use_library(x.device());
  if (!r.library) return r;
  library::Workload w;
  w.device = x.device();
  w.dtype = x.scalar_type();
  w.tf32 = x.is_cuda() && x.scalar_type() == at::kFloat && at::globalContext().allowTF32CuBLAS();
  w.N = x.size(0), w.C = db.size(0), w.n = db.size(1), w.m = db.size(2);
  w.has_pairs = pairs.defined();
  w.gemms = gemms;
  w.epilogues = epilogues;
  w.workspace = library::settings().workspace_bytes.load();
  w.capturing = capturing(x);
  const auto requested = static_cast<library::Plan>(library::settings().plan.load());
  if (pairs.host.defined() && !w.capturing && requested != library::Plan::Dense) {
    pairs.counts = library::count_pairs(pairs.host);
    w.counts = pairs.counts;
  }
  r.choice = library::choose_plan(w, requested);
  r.plan = r.choice.plan;
  return r;
}

}  // namespace ops
}  // namespace ccluster
