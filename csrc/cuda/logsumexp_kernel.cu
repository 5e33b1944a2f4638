// CUDA kernels of exemplar_logsumexp and its backward (semantics: csrc/cpu/logsumexp_kernel.cpp).
//
// Forward: lse_forward_kernel (lse_forward.cuh), over (row block, class) units; deterministic.
//
// Backward: one block per (class, 64-exemplar chunk), looping over the row blocks of the class (the
// FlashAttention-2 backward order). Per row block the distance tile is recomputed and turned into
//   P = grad * exp(s - logz)   and   W = kappa * P          (kept in shared memory, 64 x 64)
// then, in 64-feature slices of m:
//   grad_db[c, j] += alpha * sum_r W[r, j] x_r         (block-owned rows of grad_db: plain stores)
//   grad_x[s]     += alpha * (sum_j W[s, j] y_j - rowsum(W)[s] x_s)
// At the end of the class grad_db[c, j] -= alpha * colsum(W)[j] y_j and grad_log_q[c, j] = colsum(P)[j],
// reduced in a fixed order. grad_x rows are shared by every exemplar chunk and class, so grad_x is
// accumulated with atomicAdd (float32 / float64): its value depends on the order of the additions, at the
// level of rounding (torch.use_deterministic_algorithms raises for it). grad_db and grad_log_q are
// deterministic. Only the rows of the pairs with a nonzero gradient are read: a row outside the pairs
// gets exactly 0 gradient and adds nothing to grad_db / grad_log_q, whatever it holds (NaN, inf).
// These are the hand-written kernels (backend "fused"); the default on CUDA is the
// library-GEMM path (csrc/library).
#include <array>

#include "cuda/fused.h"
#include "cuda/lse_forward.cuh"

namespace ccluster {
namespace cuda {
namespace {

// One block per SM at least (minBlocksPerMultiprocessor = 1): the register budget is then the full
// 255 per thread. The kernel keeps two 4 x 4 accumulators (W Y and W^T X), the tile's scores and the
// column sums live; at the default budget ptxas spilled 150-500 bytes per thread.
template <typename scalar_t, typename T, int BK>
__global__ void __launch_bounds__(kThreads, 1)
    lse_backward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ db, const T* __restrict__ lq,
                        const T* __restrict__ xx, const T* __restrict__ yy, const T* __restrict__ grad,
                        const T* __restrict__ logz, RowsView rv, int C, int n, int m, T alpha, bool euclid,
                        T* __restrict__ gx, T* __restrict__ gdb, T* __restrict__ glq) {
  __shared__ T as[BK][kPad];
  __shared__ T bs[BK][kPad];
  __shared__ T ws[kTile][kPad];  // W tile; reused for the final column reductions
  __shared__ int s_row[kTile];
  __shared__ T s_xx[kTile], s_g[kTile], s_lz[kTile], s_roww[kTile], s_colw[kTile];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const bool need_x = gx != nullptr, need_db = gdb != nullptr;
  const int chunks = (n + kTile - 1) / kTile;
  const int64_t units = int64_t(chunks) * C;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int c = static_cast<int>(u / chunks);
    const int j0 = static_cast<int>(u % chunks) * kTile;
    const int cols = min(kTile, n - j0);
    const int cnt = rv.cnt(c);
    if (cnt == 0) continue;
    const scalar_t* yc = db + (int64_t(c) * n + j0) * m;  // this chunk's exemplars [cols, m]
    T yj[4], lj[4], colp[4], colw[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = tx + 16 * j;
      yj[j] = col < cols ? yy[int64_t(c) * n + j0 + col] : T(0);
      lj[j] = col < cols ? lq[int64_t(c) * n + j0 + col] : ninf<T>();
      colp[j] = colw[j] = T(0);
    }
    for (int r0 = 0; r0 < cnt; r0 += kTile) {
      const int rows = min(kTile, cnt - r0);
      __syncthreads();  // previous readers of the shared row data and of ws are done
      bool mine = false;
      if (tid < kTile) {
        const int s = tid < rows ? rv.row(c, r0 + tid) : -1;
        T g = T(0), lz = T(0);
        if (s >= 0) {
          g = grad[int64_t(s) * C + c];
          lz = logz[int64_t(s) * C + c];
          if (lz == ninf<T>()) g = T(0);  // an empty class: no gradient
        }
        s_row[tid] = s;
        s_xx[tid] = s >= 0 ? xx[s] : T(0);
        s_g[tid] = g;
        s_lz[tid] = lz;
        mine = g != T(0);
      }
      if (!__syncthreads_or(mine)) continue;  // rows without gradient contribute nothing
      T acc[4][4];
      dot_tile<scalar_t, T, BK>(x, s_row, yc, cols, m, as, bs, acc);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = ty + 16 * i;
        const T g = s_g[r], lz = s_lz[r], xr = s_xx[r];
        T rw = T(0);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int col = tx + 16 * j;
          T p = T(0), w = T(0);
          if (g != T(0) && col < cols) {
            const T d = distance(xr, yj[j], acc[i][j], euclid);
            p = g * dexp(lj[j] - alpha * d - lz);
            w = kappa(d, euclid) * p;
          }
          ws[r][col] = w;
          colp[j] += p;
          colw[j] += w;
          rw += w;
        }
        rw = row_sum16(rw);
        if (tx == 0) s_roww[r] = rw;
      }
      __syncthreads();
      if (!need_x && !need_db) continue;
      for (int f0 = 0; f0 < m; f0 += kTile) {
        // ox[i][k]: (W Y)[row ty+16i, feature f0+tx+16k]; od[i][k]: (W^T X)[exemplar ty+16i, same feature]
        T ox[4][4], od[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int k = 0; k < 4; ++k) ox[i][k] = od[i][k] = T(0);
        for (int l0 = 0; l0 < kTile; l0 += BK) {
#pragma unroll
          for (int idx = tid; idx < BK * kTile; idx += kThreads) {
            const int l = idx / kTile, f = idx % kTile, fg = f0 + f;
            const int s = s_row[l0 + l];
            // rows without gradient (W = 0) are not read: 0 * NaN would reach grad_db
            as[l][f] = (need_db && s >= 0 && s_g[l0 + l] != T(0) && fg < m) ? static_cast<T>(x[int64_t(s) * m + fg])
                                                                                : T(0);
            bs[l][f] = (need_x && l0 + l < cols && fg < m) ? static_cast<T>(yc[int64_t(l0 + l) * m + fg]) : T(0);
          }
          __syncthreads();
#pragma unroll
          for (int l = 0; l < BK; ++l) {
            T wr[4], wc[4], xv[4], yv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              wr[i] = ws[ty + 16 * i][l0 + l];  // W[row, exemplar l0+l]
              wc[i] = ws[l0 + l][ty + 16 * i];  // W[row l0+l, exemplar]
            }
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              xv[k] = as[l][tx + 16 * k];
              yv[k] = bs[l][tx + 16 * k];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
              for (int k = 0; k < 4; ++k) {
                ox[i][k] = fma(wr[i], yv[k], ox[i][k]);
                od[i][k] = fma(wc[i], xv[k], od[i][k]);
              }
          }
          __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = ty + 16 * i;  // a row for grad_x, an exemplar for grad_db
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const int f = f0 + tx + 16 * k;
            if (f >= m) continue;
            if (need_x && r < rows && s_g[r] != T(0)) {
              const int64_t o = int64_t(s_row[r]) * m + f;
              atomicAdd(gx + o, alpha * (ox[i][k] - s_roww[r] * static_cast<T>(x[o])));  // order-dependent
            }
            if (need_db && r < cols) {
              T* dst = gdb + (int64_t(c) * n + j0 + r) * m + f;  // owned by this block
              *dst += alpha * od[i][k];
            }
          }
        }
      }
    }
    // Column sums over the 16 threads of each column, in a fixed order.
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 4; ++j) ws[ty][tx + 16 * j] = colw[j];
    __syncthreads();
    if (tid < kTile) {
      T s = T(0);
      for (int t = 0; t < 16; ++t) s += ws[t][tid];
      s_colw[tid] = s;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 4; ++j) ws[ty][tx + 16 * j] = colp[j];
    __syncthreads();
    if (tid < cols && glq != nullptr) {
      T s = T(0);
      for (int t = 0; t < 16; ++t) s += ws[t][tid];
      glq[int64_t(c) * n + j0 + tid] = s;
    }
    if (need_db) {
      for (int64_t idx = tid; idx < int64_t(cols) * m; idx += kThreads) {
        const int j = static_cast<int>(idx / m);
        gdb[(int64_t(c) * n + j0) * m + idx] -= alpha * s_colw[j] * static_cast<T>(yc[idx]);
      }
    }
  }
}

}  // namespace

at::Tensor lse_forward(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q, double alpha,
                       Metric metric, const c10::optional<at::Tensor>& pairs) {
  const char* op = "exemplar_logsumexp";
  const auto t = acc_type(x.scalar_type());
  at::Tensor out = at::zeros({x.size(0), db.size(0)}, x.options().dtype(t));
  if (out.numel() == 0) return out;
  const Inputs in = prepare(op, x, db, log_q);
  const ClassRows cr = pairs.has_value() ? build_class_rows(pairs->t().contiguous()) : dense_rows(in.N);
  const int64_t units = ((int64_t(in.N) + kTile - 1) / kTile) * in.C;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "exemplar_logsumexp_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const int grid = occupancy_grid(lse_forward_kernel<scalar_t, T, Cfg<T>::BK>, kThreads, 0, units);
    lse_forward_kernel<scalar_t, T, Cfg<T>::BK><<<grid, kThreads, 0, stream>>>(
        in.x.data_ptr<scalar_t>(), in.db.data_ptr<scalar_t>(), in.log_q.data_ptr<T>(), in.xx.data_ptr<T>(),
        in.yy.data_ptr<T>(), cr.view(), in.N, in.C, in.n, in.m, static_cast<T>(alpha),
        metric == Metric::Euclidean, out.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;  // logz stays in the accumulation type (the backward recomputes p = exp(s - logz) from it)
}

kernels::Grads lse_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& db,
                            const at::Tensor& log_q, const at::Tensor& logz, double alpha, Metric metric,
                            const c10::optional<at::Tensor>& pairs, std::array<bool, 3> output_mask) {
  const char* op = "exemplar_logsumexp_backward";
  // grad_x is accumulated with atomicAdd here: its last bits depend on the order of the additions
  if (output_mask[0])
    at::globalContext().alertNotDeterministic(
        "ccluster::exemplar_logsumexp_backward (fused CUDA kernel, gradient of x); the library-GEMM path "
        "(ccluster.kernel_settings(backend=\"library\")) is deterministic");
  const auto t = acc_type(x.scalar_type());
  const auto opts = x.options().dtype(t);
  at::Tensor gx = output_mask[0] ? at::zeros(x.sizes(), opts) : at::Tensor();
  at::Tensor gdb = output_mask[1] ? at::zeros(db.sizes(), opts) : at::Tensor();
  at::Tensor glq = output_mask[2] ? at::zeros(log_q.sizes(), opts) : at::Tensor();
  if (x.size(0) > 0 && db.size(0) > 0 && db.size(1) > 0 && (gx.defined() || gdb.defined() || glq.defined())) {
    const Inputs in = prepare(op, x, db, log_q);
    const ClassRows cr = pairs.has_value() ? build_class_rows(pairs->t().contiguous()) : dense_rows(in.N);
    const at::Tensor g = grad.to(t).contiguous(), lz = logz.to(t).contiguous();
    const int64_t units = int64_t((in.n + kTile - 1) / kTile) * in.C;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "exemplar_logsumexp_backward_cuda",
                                    [&] {
      using T = at::opmath_type<scalar_t>;
      const int grid = occupancy_grid(lse_backward_kernel<scalar_t, T, Cfg<T>::BK>, kThreads, 0, units);
      lse_backward_kernel<scalar_t, T, Cfg<T>::BK><<<grid, kThreads, 0, stream>>>(
          in.x.data_ptr<scalar_t>(), in.db.data_ptr<scalar_t>(), in.log_q.data_ptr<T>(), in.xx.data_ptr<T>(),
          in.yy.data_ptr<T>(), g.data_ptr<T>(), lz.data_ptr<T>(), cr.view(), in.C, in.n, in.m,
          static_cast<T>(alpha), metric == Metric::Euclidean, gx.defined() ? gx.data_ptr<T>() : nullptr,
          gdb.defined() ? gdb.data_ptr<T>() : nullptr, glq.defined() ? glq.data_ptr<T>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto finish = [&](const at::Tensor& v, const at::Tensor& like) {
    return v.defined() ? v.to(like.scalar_type()) : at::empty({0}, like.options());
  };
  return {finish(gx, x), finish(gdb, db), finish(glq, log_q)};
}

}  // namespace cuda
}  // namespace ccluster
