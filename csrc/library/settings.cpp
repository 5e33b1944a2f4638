#include "library/settings.h"

namespace ccluster {
namespace library {

Settings& settings() {
  static Settings s;
  return s;
}

bool set_setting(const std::string& name, int64_t value) {
  Settings& s = settings();
  if (name == "backend") {
    TORCH_CHECK(value >= 0 && value <= 2, "ccluster settings: backend code must be 0, 1 or 2, got ", value);
    s.backend = static_cast<int>(value);
  } else if (name == "workspace_bytes") {
    TORCH_CHECK(value > 0, "ccluster settings: workspace_bytes must be > 0, got ", value);
    s.workspace_bytes = value;
  } else if (name == "centring") {
    TORCH_CHECK(value >= 0 && value <= 2, "ccluster settings: centring code must be 0, 1 or 2, got ", value);
    s.centring = static_cast<int>(value);
  } else if (name == "gather") {
    s.gather = value != 0;
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
  else if (name == "gather") *value = s.gather.load();
  else if (name == "pieces") *value = s.pieces.load();
  else return false;
  return true;
}

}  // namespace library
}  // namespace ccluster
