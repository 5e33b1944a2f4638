// The library path's two work layouts and the cost model that chooses between them.
//
//   dense   every row of x against every class: chunks of consecutive rows, each against all classes
//           (or the largest group of classes the workspace holds) in ONE GEMM; the pairs only mask the
//           epilogue. C x the FLOPs of the pairs, but no host read of the data, the fewest launches, and
//           shapes that never depend on the data (CUDA graphs).
//   packed  only the (row, class) pairs: each active class's rows gathered into a block, the blocks
//           padded to the largest class's count, and each chunk of rows of every block in ONE batched
//           GEMM (bmm over the classes). FLOPs of the pairs times the padding; needs the per-class
//           counts on the host: free on the CPU, free when the caller passes the pair mask on the CPU
//           (the batch's labels, which the data loader has), a device synchronisation otherwise.
//
// The cost model adds, per plan: GEMM FLOPs / the device's rate for the dtype, bytes of the GEMM output
// and gathered rows moved by the epilogues / memory bandwidth, launches x the host cost of a launch, and
// host synchronisations x their cost. The rates (plan.cpp) are published figures of an H100-class GPU
// derated to what cuBLAS reaches, and this machine kind's measured single-core rates for the CPU; the
// benchmarks print the estimates next to the measured times so that a GPU run calibrates them.
// "auto" takes the cheaper plan among those that need no synchronisation (on the CPU there is none to
// avoid); the packed plan is never taken while a CUDA graph is captured.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "library/settings.h"

namespace ccluster {
namespace library {

// The per-class counts of a pair mask read on the host (classes with at least one pair).
struct PairCounts {
  bool known = false;         // false: no host copy of the mask (counts unknown)
  std::vector<int64_t> cls;   // active classes, ascending
  std::vector<int64_t> cnt;   // their pair counts
  int64_t P = 0, Rmax = 0;
};
PairCounts count_pairs(const at::Tensor& mask_host);  // [N, C] bool on the CPU

struct Workload {
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;
  bool tf32 = false;        // float32 GEMMs may round to TF32 (torch's switch, CUDA)
  int64_t N = 0, C = 0, n = 0, m = 0;
  bool has_pairs = false;   // a pair mask restricts the work (otherwise both plans are the same)
  PairCounts counts;        // when known on the host
  int gemms = 1;            // GEMM passes: forward 1; loss with dL/dx 2; backward 1 + (x) + (db)
  int epilogues = 1;        // epilogue launches per piece
  int64_t workspace = int64_t(256) << 20;
  bool capturing = false;   // a CUDA graph is being captured
};

struct Estimate {
  double gflop = 0, gbyte = 0;
  int64_t pieces = 0, launches = 0, syncs = 0;
  double seconds = 0;
};

struct Choice {
  Plan plan = Plan::Dense;
  Estimate dense, packed;
  std::string reason;
};

Choice choose_plan(const Workload& w, Plan requested);

}  // namespace library
}  // namespace ccluster
