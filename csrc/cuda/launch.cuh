// Grid sizing for persistent (grid-stride) kernels from the occupancy API: as many blocks as the device
// keeps resident for this kernel, block size and shared memory, never more than the units of work.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace ccluster {
namespace cuda {

inline int sm_count() {
  static int sms[64] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 64) dev = 63;
  if (sms[dev] == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms[dev], cudaDevAttrMultiProcessorCount, dev));
  return sms[dev];
}

template <typename Kernel>
int occupancy_grid(Kernel kernel, int threads, size_t dynamic_smem, int64_t units) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, dynamic_smem));
  const int64_t cap = int64_t(sm_count()) * std::max(per_sm, 1);
  return static_cast<int>(std::max<int64_t>(1, std::min(units, cap)));
}

}  // namespace cuda
}  // namespace ccluster
