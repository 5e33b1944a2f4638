// Helpers of the CUDA tile engine (tile.cuh): per-class row lists and squared norms.
#include "cuda/tile.cuh"

namespace ccluster {
namespace cuda {
namespace {

constexpr int kScanThreads = 1024;

// One block per class: scans row c of the [C, N] mask in chunks of 1024 rows, a block-wide exclusive
// scan (warp ballots, then a scan of the 32 warp totals) giving each selected row its slot. The list is
// ascending and independent of scheduling.
__global__ void __launch_bounds__(kScanThreads)
    class_rows_kernel(const bool* __restrict__ mask_t, int N, int* __restrict__ rows, int* __restrict__ count) {
  __shared__ int warp_total[32];
  __shared__ int warp_base[32];
  __shared__ int chunk_total;
  const int c = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool* mrow = mask_t + int64_t(c) * N;
  int* out = rows + int64_t(c) * N;
  int running = 0;
  for (int base = 0; base < N; base += kScanThreads) {
    const int s = base + tid;
    const bool on = s < N && mrow[s];
    const unsigned ballot = __ballot_sync(0xffffffffu, on);
    const int in_warp = __popc(ballot & ((1u << lane) - 1u));
    if (lane == 0) warp_total[warp] = __popc(ballot);
    __syncthreads();
    if (warp == 0) {
      const int v = warp_total[lane];
      int incl = v;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int u = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += u;
      }
      warp_base[lane] = incl - v;
      if (lane == 31) chunk_total = incl;
    }
    __syncthreads();
    if (on) out[running + warp_base[warp] + in_warp] = s;
    running += chunk_total;
    __syncthreads();  // warp_total, warp_base and chunk_total are rewritten by the next chunk
  }
  if (tid == 0) count[c] = running;
}

// One warp per row: sum of squares in the accumulation type.
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(256)
    sqnorm_kernel(const scalar_t* __restrict__ a, int64_t R, int m, T* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < R; r += warps) {
    const scalar_t* row = a + r * m;
    T s = T(0);
    for (int k = lane; k < m; k += 32) {
      const T v = static_cast<T>(row[k]);
      s = fma(v, v, s);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) out[r] = s;
  }
}

}  // namespace

ClassRows build_class_rows(const at::Tensor& mask_t) {
  TORCH_INTERNAL_ASSERT(mask_t.dim() == 2 && mask_t.scalar_type() == at::kBool && mask_t.is_contiguous());
  const int64_t C = mask_t.size(0), N = mask_t.size(1);
  ClassRows cr;
  cr.N = static_cast<int>(N);
  const auto iopts = mask_t.options().dtype(at::kInt);
  cr.rows = at::empty({C, std::max<int64_t>(N, 1)}, iopts);
  cr.count = at::zeros({std::max<int64_t>(C, 1)}, iopts);
  if (C == 0 || N == 0) return cr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  class_rows_kernel<<<static_cast<unsigned>(C), kScanThreads, 0, stream>>>(
      mask_t.data_ptr<bool>(), static_cast<int>(N), cr.rows.data_ptr<int>(), cr.count.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return cr;
}

at::Tensor row_sqnorms(const at::Tensor& a2d, at::ScalarType acc) {
  TORCH_INTERNAL_ASSERT(a2d.dim() == 2 && a2d.is_contiguous());
  const int64_t R = a2d.size(0);
  const int m = static_cast<int>(a2d.size(1));
  at::Tensor out = at::zeros({R}, a2d.options().dtype(acc));
  if (R == 0 || m == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min<int64_t>((R + 7) / 8, 65535);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a2d.scalar_type(), "ccluster_row_sqnorms", [&] {
    using T = at::opmath_type<scalar_t>;
    sqnorm_kernel<scalar_t, T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        a2d.data_ptr<scalar_t>(), R, m, out.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace cuda
}  // namespace ccluster
