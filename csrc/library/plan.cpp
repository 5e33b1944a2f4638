#include "library/plan.h"

#include <algorithm>
#include <cmath>

namespace ccluster {
namespace library {
namespace {

// Rates of one device kind. CUDA: an H100-class GPU (SXM published peaks: 67 TFLOP/s float32 and
// float64 on CUDA cores, 495 TF32 and 989 bf16/fp16 on tensor cores, 3.35 TB/s), derated to what cuBLAS
// and a memory-bound epilogue reach (~75 % of the GEMM peaks at these shapes, ~60 % of bandwidth); a
// kernel launch costs ~6 us of host time and a synchronisation drains the queue (~40 us, and the host
// then issues the rest of the step while the GPU idles). CPU: one core of this project's development
// machine (float32 SGEMM ~90 GFLOP/s, float64 ~45; ~10 GB/s), where a "launch" is an ATen call.
struct Rates {
  double flops, bytes, launch, sync;
};

Rates rates_of(const at::Device& device, at::ScalarType dtype, bool tf32) {
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  if (device.is_cpu()) return Rates{dtype == at::kDouble ? 4.5e10 : 9e10, 1e10, 2e-6, 0.0};
  double flops = 5e13;                                   // float32 / float64 on CUDA cores
  if (half) flops = 7e14;
  else if (dtype == at::kFloat && tf32) flops = 3.5e14;
  return Rates{flops, 2e12, 6e-6, 4e-5};
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / std::max<int64_t>(b, 1); }

Estimate estimate(const Workload& w, int64_t blocks, int64_t rows, bool packed, const Rates& r) {
  Estimate e;
  const int64_t tsz = w.dtype == at::kDouble ? 8 : 4;
  const int64_t gsz = at::elementSize(w.dtype);
  const double slots = double(blocks) * double(rows);   // GEMM rows over all blocks
  const double classes = packed ? 1.0 : double(w.C);    // classes per GEMM row
  const double cols = classes * double(w.n);
  e.gflop = 2.0 * slots * cols * double(w.m) * w.gemms / 1e9;
  // S written by the GEMM, read and rewritten by each epilogue, read by each gradient GEMM; the
  // gathered rows (packed: always; dense: x read once per pass) and the gradient rows scattered back.
  const double s_bytes = slots * cols * tsz;
  const double x_bytes = slots * double(w.m) * gsz;
  e.gbyte = (s_bytes * (1 + 2 * w.epilogues + (w.gemms - 1)) + x_bytes * (packed ? 2 + (w.gemms - 1) : 1)) / 1e9;
  const double per_slot = cols * (tsz + 1) + (packed ? double(w.m) * gsz : 0.0) + tsz;
  e.pieces = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(slots * per_slot / double(w.workspace))));
  // per piece: the GEMMs, the epilogues, packed: the gather of the rows and the scatter of dL/dx
  const int64_t per_piece = w.gemms + w.epilogues + (packed ? 1 + (w.gemms > 1 ? 1 : 0) : 0);
  e.launches = e.pieces * per_piece + 4;  // + norms, the row terms and small setup ops
  e.syncs = packed && !w.counts.known ? 1 : 0;
  e.seconds = e.gflop * 1e9 / r.flops + e.gbyte * 1e9 / r.bytes + e.launches * r.launch + e.syncs * r.sync;
  return e;
}

}  // namespace

PairCounts count_pairs(const at::Tensor& mask_host) {
  TORCH_INTERNAL_ASSERT(mask_host.is_cpu() && mask_host.scalar_type() == at::kBool && mask_host.dim() == 2);
  const at::Tensor mk = mask_host.contiguous();
  const bool* p = mk.data_ptr<bool>();
  const int64_t N = mk.size(0), C = mk.size(1);
  std::vector<int64_t> cnt(C, 0);
  for (int64_t s = 0; s < N; ++s)
    for (int64_t c = 0; c < C; ++c) cnt[c] += p[s * C + c];
  PairCounts pc;
  pc.known = true;
  for (int64_t c = 0; c < C; ++c) {
    if (cnt[c] == 0) continue;
    pc.cls.push_back(c);
    pc.cnt.push_back(cnt[c]);
    pc.P += cnt[c];
    pc.Rmax = std::max(pc.Rmax, cnt[c]);
  }
  return pc;
}

Choice choose_plan(const Workload& w, Plan requested) {
  const Rates r = rates_of(w.device, w.dtype, w.tf32);
  Choice ch;
  ch.dense = estimate(w, 1, w.N, false, r);
  // without a host copy of the mask, the packed estimate assumes one pair per row spread evenly
  const int64_t Ca = w.counts.known ? static_cast<int64_t>(w.counts.cls.size()) : std::max<int64_t>(w.C, 1);
  const int64_t Rmax = w.counts.known ? w.counts.Rmax : ceil_div(w.N, std::max<int64_t>(w.C, 1));
  ch.packed = estimate(w, Ca, Rmax, true, r);
  if (!w.has_pairs) {
    ch.plan = Plan::Dense;
    ch.reason = "no pairs: both plans are the same";
  } else if (w.capturing) {
    ch.plan = Plan::Dense;
    ch.reason = "a CUDA graph is being captured: shapes must not depend on the data";
  } else if (requested == Plan::Dense || requested == Plan::Packed) {
    ch.plan = requested;
    ch.reason = "set by kernel_settings(plan=...)";
  } else if (!w.counts.known) {
    ch.plan = Plan::Dense;
    ch.reason = "the pair mask is on the device: the packed plan would need a synchronisation";
  } else {
    ch.plan = ch.packed.seconds < ch.dense.seconds ? Plan::Packed : Plan::Dense;
    ch.reason = "cost model";
  }
  return ch;
}

}  // namespace library
}  // namespace ccluster
