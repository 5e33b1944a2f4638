// Process-wide settings of the kernels: which implementation an op runs (the library-GEMM path or the
// hand-written fused kernels), the library path's plan, workspace bound and centring mode, and when
// the checks of values read the data. They are read each time an op runs, so a compiled graph follows the
// settings in force when it is executed. Python sets them through ccluster.kernel_settings
// (ccluster/settings.py).
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <string>

namespace ccluster {
namespace library {

enum class Backend : int { Auto = 0, Library = 1, Fused = 2 };
enum class Centring : int { Auto = 0, On = 1, Off = 2 };
// The library path's work layout (csrc/library/plan.h): chosen by the cost model, or forced.
enum class Plan : int { Auto = 0, Dense = 1, Packed = 2 };
// Checks of values (negative attention, log_q > 0, bad fit weights): eager reads the data and raises (a
// device synchronisation on an accelerator); deferred never reads it on the host and turns the op's
// results into NaN instead; auto is eager on the CPU and deferred elsewhere.
enum class CheckValues : int { Auto = 0, Eager = 1, Deferred = 2 };

struct Settings {
  std::atomic<int> backend{static_cast<int>(Backend::Auto)};
  // Upper bound on the scratch memory of one library-path call (GEMM output chunks, gathered rows).
  std::atomic<int64_t> workspace_bytes{int64_t(256) << 20};
  std::atomic<int> centring{static_cast<int>(Centring::Auto)};
  std::atomic<int> plan{static_cast<int>(Plan::Auto)};
  std::atomic<int> check_values{static_cast<int>(CheckValues::Auto)};
  // Read-only statistics since the start of the process: pieces (GEMM output chunks) processed by the
  // library path; host synchronisations the ops made to read device data (an eager check of values on
  // an accelerator, a packed plan forced without a host layout); the plan of the last library-path call
  // (1 dense, 2 packed).
  std::atomic<int64_t> pieces{0};
  std::atomic<int64_t> host_syncs{0};
  std::atomic<int> last_plan{0};
};

Settings& settings();

// name in {"backend", "workspace_bytes", "centring", "plan", "check_values"} (get also "pieces",
// "host_syncs", "last_plan", "cuda_kernels"); false for an unknown name.
bool set_setting(const std::string& name, int64_t value);
bool get_setting(const std::string& name, int64_t* value);

}  // namespace library
}  // namespace ccluster
