// The fused-kernel tables: the CPU kernels, and the CUDA kernels registered by csrc/cuda/registration.cu.
#include "ops/kernels.h"

#include <atomic>

namespace ccluster {
namespace kernels {
namespace {

const Fused kCpu{&cpu::lse_forward, &cpu::lse_backward, &cpu::cc_loss, &cpu::fit_step};
std::atomic<const Fused*> g_cuda{nullptr};

}  // namespace

void register_cuda_fused(const Fused* table) { g_cuda.store(table); }

const Fused& fused_for(const at::Device& device, const char* op) {
  if (device.is_cpu()) return kCpu;
  const Fused* t = device.is_cuda() ? g_cuda.load() : nullptr;
  TORCH_CHECK(t != nullptr, op, ": no fused kernels for device ", device,
              " in this build (CUDA kernels are compiled when torch has CUDA and a toolkit is found)");
  return *t;
}

}  // namespace kernels
}  // namespace ccluster
