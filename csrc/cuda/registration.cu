// The CUDA side of the op registry: every op's CUDA dispatch key goes to the op's one dispatcher
// (csrc/ops/<op>.cpp, which checks the arguments and chooses the implementation), and the fused CUDA
// kernels are listed for it. Built only with CUDA, so a CPU-only build has no CUDA kernel registered.
#include <torch/library.h>

#include "cuda/fused.h"
#include "ops/dispatch.h"

namespace ccluster {
namespace cuda {
namespace {

const kernels::Fused kFused{&lse_forward, &lse_backward, &cc_loss, &fit_step};

struct Registrar {
  Registrar() { kernels::register_cuda_fused(&kFused); }
} registrar;

}  // namespace

TORCH_LIBRARY_IMPL(ccluster, CUDA, m) {
  m.impl("exemplar_logsumexp", &ops::exemplar_logsumexp);
  m.impl("exemplar_logsumexp_backward", &ops::exemplar_logsumexp_backward);
  m.impl("cc_loss", &ops::cc_loss);
  m.impl("fit_step", &ops::fit_step);
}

}  // namespace cuda
}  // namespace ccluster
