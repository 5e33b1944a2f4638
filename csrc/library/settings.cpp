#include "library/settings.h"

#include "library/epilogue.h"

namespace ccluster {
namespace library {

Settings& settings() {
  static Settings s;
  return s;
}

bool set_setting(const std::string& name, int64_t value) {
  Settings& s = settings();
  auto code = [&](int64_t hi) {
    TORCH_CHECK_VALUE(value >= 0 && value <= hi, "ccluster settings: ", name, " code must be 0 .. ", hi,
                      ", got ", value);
    return static_cast<int>(value);
  };
  if (name == "backend") {
    s.backend = code(2);
  } else if (name == "workspace_bytes") {
    TORCH_CHECK_VALUE(value > 0, "ccluster settings: workspace_bytes must be > 0, got ", value);
    s.workspace_bytes = value;
  } else if (name == "centring") {
    s.centring = code(2);
  } else if (name == "plan") {
    s.plan = code(2);
  } else if (name == "check_values") {
    s.check_values = code(2);
  } else {
    return false;
  }
  return true;
}

bool get_setting(const std::string& name, int64_t* value) {
  const Settings& s = settings();
  if (name == "backend") *value = s.backend.load();
  else if (name == "workspace_bytes") *value = s.workspace_bytes.load();
  else if (name == "centring") *value = s.centring.load();
  else if (name == "plan") *value = s.plan.load();
  else if (name == "check_values") *value = s.check_values.load();
  else if (name == "pieces") *value = s.pieces.load();
  else if (name == "host_syncs") *value = s.host_syncs.load();
  else if (name == "last_plan") *value = s.last_plan.load();
  else if (name == "cuda_kernels") *value = has_cuda_epilogues() ? 1 : 0;
  else return false;
  return true;
}

}  // namespace library
}  // namespace ccluster
