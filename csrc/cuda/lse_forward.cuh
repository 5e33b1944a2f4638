// The forward log-sum-exp kernel, shared by exemplar_logsumexp and fit_step (its logz pass).
//
// A persistent grid over (row block, class) units, row-block major so that the non-empty units of a
// label-sparse mask come first and spread evenly over the blocks. A unit streams its class's exemplars in
// 64-wide chunks; each thread keeps an online log-sum-exp (running max, rescaled sum) for its 4 rows over
// its own columns, and the 16 threads of a row merge their states once at the end (shuffles). No atomics:
// every output entry is written by exactly one thread.
#pragma once

#include "cuda/tile.cuh"

namespace ccluster {
namespace cuda {
namespace {  // internal linkage: each .cu that includes this gets its own instantiations

template <typename scalar_t, typename T, int BK>
__global__ void __launch_bounds__(kThreads)
    lse_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ db, const T* __restrict__ lq,
                       const T* __restrict__ xx, const T* __restrict__ yy, RowsView rv, int N, int C, int n,
                       int m, T alpha, bool euclid, T* __restrict__ out) {
  __shared__ T as[BK][kPad];
  __shared__ T bs[BK][kPad];
  __shared__ int s_row[kTile];
  __shared__ T s_xx[kTile];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t row_blocks = (int64_t(N) + kTile - 1) / kTile;
  const int64_t units = row_blocks * C;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int c = static_cast<int>(u % C);
    const int r0 = static_cast<int>(u / C) * kTile;
    const int cnt = rv.cnt(c);
    if (r0 >= cnt) continue;  // uniform over the block
    const int rows = min(kTile, cnt - r0);
    __syncthreads();  // the previous unit's readers of s_row / s_xx are done
    if (tid < kTile) {
      const int s = tid < rows ? rv.row(c, r0 + tid) : -1;
      s_row[tid] = s;
      s_xx[tid] = s >= 0 ? xx[s] : T(0);
    }
    __syncthreads();
    T M[4], L[4], xr[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      M[i] = ninf<T>();
      L[i] = T(0);
      xr[i] = s_xx[ty + 16 * i];
    }
    const T* lqc = lq + int64_t(c) * n;
    const T* yyc = yy + int64_t(c) * n;
    for (int j0 = 0; j0 < n; j0 += kTile) {
      const int cols = min(kTile, n - j0);
      T acc[4][4];
      dot_tile<scalar_t, T, BK>(x, s_row, db + (int64_t(c) * n + j0) * m, cols, m, as, bs, acc);
      T yj[4], lj[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = tx + 16 * j;
        yj[j] = col < cols ? yyc[j0 + col] : T(0);
        lj[j] = col < cols ? lqc[j0 + col] : ninf<T>();  // padding: an empty slot
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        T s[4];
        T mx = ninf<T>();
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          s[j] = lj[j] - alpha * distance(xr[i], yj[j], acc[i][j], euclid);
          mx = lse_max(mx, s[j]);
        }
        const T m_new = lse_max(M[i], mx);
        const T sh = lse_shift(m_new);
        L[i] *= lse_scale(M[i], L[i], sh);
        M[i] = m_new;
#pragma unroll
        for (int j = 0; j < 4; ++j) L[i] += dexp(s[j] - sh);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      row_lse16(M[i], L[i]);
      const int r = ty + 16 * i;
      if (tx == 0 && r < rows) out[int64_t(s_row[r]) * C + c] = lse_finish(M[i], L[i]);
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace ccluster
