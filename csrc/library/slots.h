// Slot arithmetic of the library path's epilogues (epilogue.h, "Vocabulary"), host and device.
#pragma once

#include <cstdint>

#include "numerics.h"

namespace ccluster {
namespace library {

// Raw view of Slots for the kernels.
struct SlotsView {
  int64_t rows, ld, r0, c0;
  const int64_t* row_ids;      // nullptr: dense
  const int64_t* block_class;  // nullptr: c0
  // the x row of slot i (-1: padding)
  CC_HD int64_t row(int64_t i) const {
    if (!row_ids) return r0 + i;
    const int64_t b = i / rows;
    return row_ids[b * ld + r0 + (i - b * rows)];
  }
  // the first class of slot i's block
  CC_HD int64_t cls(int64_t i) const { return block_class ? block_class[i / rows] : c0; }
  CC_HD int64_t block_cls(int64_t b) const { return block_class ? block_class[b] : c0; }
};

}  // namespace library
}  // namespace ccluster
