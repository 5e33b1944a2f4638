// CUDA kernel of one convex-clustering pass, fit_step (semantics: csrc/cpu/fit_kernel.cpp):
// per class c and each row s with w_sc > 0,
//   logz_s    = log sum_j q_j exp(-alpha d_sj)
//   log eta_j = log sum_s w_s exp(-alpha d_sj - logz_s)
//
// Two passes over the same distance tiles, both label-sparse over the rows with w > 0:
//   1. logz: lse_forward_kernel (lse_forward.cuh), one block per (row block, class) unit.
//   2. log eta: one block per (class, 64-exemplar chunk), looping over the row blocks of the class. Each
//      thread keeps an online column log-sum-exp of t + v over its 4 rows per tile (t = -alpha d,
//      v_s = log w_s - logz_s), and the 16 threads of a column merge their states in a fixed order at the
//      end: deterministic, no atomics.
// The CPU kernel gets both from one GEMM tile because a tile holds a whole class row (all n exemplars);
// on the GPU a 64 x n tile does not fit on chip for the n of real databases, so the distance tile is
// computed twice (2 x the GEMM work of one pass). A single-pass variant for n <= 64, or one that keeps
// per-row-block column partials and merges them, is future work.
#include "cuda/fused.h"
#include "cuda/lse_forward.cuh"

namespace ccluster {
namespace cuda {
namespace {

template <typename scalar_t, typename T, int BK>
__global__ void __launch_bounds__(kThreads)
    fit_eta_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ db, const T* __restrict__ lq,
                   const T* __restrict__ xx, const T* __restrict__ yy, const T* __restrict__ weight,
                   const T* __restrict__ logz, RowsView rv, int C, int n, int m, T alpha, bool euclid,
                   T* __restrict__ log_eta) {
  __shared__ T as[BK][kPad];
  __shared__ T bs[BK][kPad];
  __shared__ int s_row[kTile];
  __shared__ T s_xx[kTile], s_v[kTile];
  __shared__ T s_m[16][kTile], s_l[16][kTile];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int chunks = (n + kTile - 1) / kTile;
  const int64_t units = int64_t(chunks) * C;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int c = static_cast<int>(u / chunks);
    const int j0 = static_cast<int>(u % chunks) * kTile;
    const int cols = min(kTile, n - j0);
    const int cnt = rv.cnt(c);
    if (cnt == 0) continue;  // log_eta stays -inf: no row has weight in this class
    const scalar_t* yc = db + (int64_t(c) * n + j0) * m;
    T yj[4], cm[4], cl[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = tx + 16 * j;
      yj[j] = col < cols ? yy[int64_t(c) * n + j0 + col] : T(0);
      cm[j] = ninf<T>();
      cl[j] = T(0);
    }
    for (int r0 = 0; r0 < cnt; r0 += kTile) {
      const int rows = min(kTile, cnt - r0);
      __syncthreads();
      if (tid < kTile) {
        const int s = tid < rows ? rv.row(c, r0 + tid) : -1;
        T v = ninf<T>();
        if (s >= 0) {
          const T z = logz[int64_t(s) * C + c];
          // rows whose class row is all -inf contribute nothing
          v = z == ninf<T>() ? ninf<T>() : ::log(weight[int64_t(s) * C + c]) - z;
        }
        s_row[tid] = s;
        s_xx[tid] = s >= 0 ? xx[s] : T(0);
        s_v[tid] = v;
      }
      __syncthreads();
      T acc[4][4];
      dot_tile<scalar_t, T, BK>(x, s_row, yc, cols, m, as, bs, acc);
      T xr[4], vr[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        xr[i] = s_xx[ty + 16 * i];
        vr[i] = s_v[ty + 16 * i];
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        T t[4];
        T mx = ninf<T>();
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          t[i] = vr[i] - alpha * distance(xr[i], yj[j], acc[i][j], euclid);  // padded rows: v = -inf
          mx = lse_max(mx, t[i]);
        }
        const T m_new = lse_max(cm[j], mx);
        const T sh = lse_shift(m_new);
        cl[j] *= lse_scale(cm[j], cl[j], sh);
        cm[j] = m_new;
#pragma unroll
        for (int i = 0; i < 4; ++i) cl[j] += dexp(t[i] - sh);
      }
    }
    // Merge the 16 partial states of each column (threads ty = 0..15) in a fixed order.
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      s_m[ty][tx + 16 * j] = cm[j];
      s_l[ty][tx + 16 * j] = cl[j];
    }
    __syncthreads();
    if (tid < cols) {
      T mm = s_m[0][tid], ll = s_l[0][tid];
      for (int t = 1; t < 16; ++t) lse_merge(mm, ll, s_m[t][tid], s_l[t][tid]);
      const int64_t o = int64_t(c) * n + j0 + tid;
      log_eta[o] = lq[o] == ninf<T>() ? ninf<T>() : lse_finish(mm, ll);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fit_step(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
                                            const at::Tensor& weight, double alpha, Metric metric) {
  const char* op = "fit_step";
  const auto t = acc_type(x.scalar_type());
  const auto opts = x.options().dtype(t);
  at::Tensor logz = at::zeros({x.size(0), db.size(0)}, opts);
  at::Tensor log_eta = at::full(log_q.sizes(), -std::numeric_limits<double>::infinity(), opts);
  if (x.size(0) > 0 && db.size(0) > 0) {  // n = 0 still runs: logz = -inf on the weighted pairs (as CPU)
    const Inputs in = prepare(op, x, db, log_q);
    const at::Tensor w = weight.to(t).contiguous();
    const ClassRows cr = build_class_rows(w.gt(0).t().contiguous());
    const bool euclid = metric == Metric::Euclidean;
    const int64_t units_z = ((int64_t(in.N) + kTile - 1) / kTile) * in.C;
    const int64_t units_eta = int64_t((in.n + kTile - 1) / kTile) * in.C;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fit_step_cuda", [&] {
      using T = at::opmath_type<scalar_t>;
      constexpr int BK = Cfg<T>::BK;
      const int grid_z = occupancy_grid(lse_forward_kernel<scalar_t, T, BK>, kThreads, 0, units_z);
      const int grid_eta = occupancy_grid(fit_eta_kernel<scalar_t, T, BK>, kThreads, 0, units_eta);
      lse_forward_kernel<scalar_t, T, BK><<<grid_z, kThreads, 0, stream>>>(
          in.x.data_ptr<scalar_t>(), in.db.data_ptr<scalar_t>(), in.log_q.data_ptr<T>(), in.xx.data_ptr<T>(),
          in.yy.data_ptr<T>(), cr.view(), in.N, in.C, in.n, in.m, static_cast<T>(alpha), euclid,
          logz.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      fit_eta_kernel<scalar_t, T, BK><<<grid_eta, kThreads, 0, stream>>>(
          in.x.data_ptr<scalar_t>(), in.db.data_ptr<scalar_t>(), in.log_q.data_ptr<T>(), in.xx.data_ptr<T>(),
          in.yy.data_ptr<T>(), w.data_ptr<T>(), logz.data_ptr<T>(), cr.view(), in.C, in.n, in.m,
          static_cast<T>(alpha), euclid, log_eta.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {logz.to(x.scalar_type()), log_eta.to(x.scalar_type())};
}

}  // namespace cuda
}  // namespace ccluster
