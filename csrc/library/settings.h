// Process-wide settings of the kernels: which implementation an op runs (the library-GEMM path or the
// hand-written fused kernels), the workspace bound of the library path, and its centring mode. They are
// read each time an op runs, so a compiled graph follows the settings in force when it is executed.
// Python sets them through ccluster.kernel_settings (ccluster/settings.py).
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <string>

namespace ccluster {
namespace library {

enum class Backend : int { Auto = 0, Library = 1, Fused = 2 };
enum class Centring : int { Auto = 0, On = 1, Off = 2 };

struct Settings {
  std::atomic<int> backend{static_cast<int>(Backend::Auto)};
  // Upper bound on the scratch memory of one library-path call (GEMM output chunks, gathered rows).
  std::atomic<int64_t> workspace_bytes{int64_t(256) << 20};
  std::atomic<int> centring{static_cast<int>(Centring::Auto)};
  // Gather the rows of each class (label sparsity); needs the per-class counts on the host. Off, or
  // during CUDA graph capture, every row is computed for every class and the pairs act as a mask.
  std::atomic<int> gather{1};
  // Read-only statistic: pieces (GEMM output chunks) processed by the library path since the start; lets
  // tests check that a small workspace really splits the work.
  std::atomic<int64_t> pieces{0};
};

Settings& settings();

// "auto": the library path on CUDA, the fused kernels on CPU (they are at the GEMM floor there).
inline bool use_library(const at::Device& device) {
  const auto b = static_cast<Backend>(settings().backend.load());
  if (b == Backend::Library) return true;
  if (b == Backend::Fused) return false;
  return device.is_cuda();
}

// name in {"backend", "workspace_bytes", "centring", "gather"} (get also "pieces"); false for an unknown
// name.
bool set_setting(const std::string& name, int64_t value);
bool get_setting(const std::string& name, int64_t* value);

}  // namespace library
}  // namespace ccluster
