// CUDA kernel of the fused convex clustering loss L = -sum_{(s,c) in pairs} w_sc * logz_sc
// (semantics: csrc/cpu/cc_loss_kernel.cpp).
//
// Label-sparse: the rows paired with each class are listed on the device (pairs & class-not-empty, see
// build_class_rows), and a persistent grid walks the (row block, class) units of those lists. Per unit the
// class's exemplars stream by in 64-wide chunks; for each chunk the block
//   1. computes the 64 x 64 distance tile (dot_tile) and the scores s = log q - alpha d,
//   2. takes the row maxima (shuffles over the 16 threads of a row), rescales the running sums
//      L = sum exp(s - M) and omega = sum kappa exp(s - M) to the new maximum, and writes
//      W = kappa exp(s - M) to shared memory,
//   3. when dL/dx is wanted, rescales the row accumulators acc_s = sum_j W_sj y_j and adds W @ Y, in
//      64-feature slices of m. acc lives in a per-block scratch slab [64, m] in global memory (a block owns
//      its slab, so plain loads and stores; it stays in L2 for moderate m), as FlashAttention keeps O.
// At the end of the unit logz = M + log L, and the pair's share of dL/dx,
//   w * alpha * (omega x_s - acc_s) / L,
// is added to dx with one atomicAdd per (pair, feature) (torch.use_deterministic_algorithms raises here).
// A row with one or two pairs gets the same sum in
// any order (0 + a + b = 0 + b + a exactly); with three or more the result depends on the order of the
// additions at the level of rounding. The loss is reduced from a per-pair [N, C] buffer by ATen's sum
// (deterministic).
#include "cuda/fused.h"
#include "cuda/tile.cuh"

namespace ccluster {
namespace cuda {
namespace {

template <typename scalar_t, typename T, int BK>
__global__ void __launch_bounds__(kThreads)
    cc_loss_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ db, const T* __restrict__ lq,
                   const T* __restrict__ xx, const T* __restrict__ yy, const T* __restrict__ weight, RowsView rv,
                   int N, int C, int n, int m, T alpha, bool euclid, T* __restrict__ logz,
                   T* __restrict__ contrib, T* __restrict__ dx, T* __restrict__ scratch) {
  __shared__ T as[BK][kPad];
  __shared__ T bs[BK][kPad];
  __shared__ T ws[kTile][kPad];
  __shared__ int s_row[kTile];
  __shared__ T s_xx[kTile], s_scale[kTile];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const bool need_x = dx != nullptr;
  T* acc_slab = need_x ? scratch + int64_t(blockIdx.x) * kTile * m : nullptr;
  const int64_t row_blocks = (int64_t(N) + kTile - 1) / kTile;
  const int64_t units = row_blocks * C;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int c = static_cast<int>(u % C);
    const int r0 = static_cast<int>(u / C) * kTile;
    const int cnt = rv.cnt(c);
    if (r0 >= cnt) continue;
    const int rows = min(kTile, cnt - r0);
    __syncthreads();
    if (tid < kTile) {
      const int s = tid < rows ? rv.row(c, r0 + tid) : -1;
      s_row[tid] = s;
      s_xx[tid] = s >= 0 ? xx[s] : T(0);
    }
    __syncthreads();
    // Row state of rows ty + 16 i: M is the same in the 16 threads of a row; L and omega are each
    // thread's share over its columns, all relative to exp(-shift(M)).
    T M[4], L[4], O[4], xr[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      M[i] = ninf<T>();
      L[i] = O[i] = T(0);
      xr[i] = s_xx[ty + 16 * i];
    }
    const T* lqc = lq + int64_t(c) * n;
    const T* yyc = yy + int64_t(c) * n;
    for (int j0 = 0; j0 < n; j0 += kTile) {
      const int cols = min(kTile, n - j0);
      const scalar_t* yc = db + (int64_t(c) * n + j0) * m;
      T acc[4][4];
      dot_tile<scalar_t, T, BK>(x, s_row, yc, cols, m, as, bs, acc);
      T yj[4], lj[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = tx + 16 * j;
        yj[j] = col < cols ? yyc[j0 + col] : T(0);
        lj[j] = col < cols ? lqc[j0 + col] : ninf<T>();
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = ty + 16 * i;
        T s[4], kap[4];
        T mx = ninf<T>();
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const T d = distance(xr[i], yj[j], acc[i][j], euclid);
          s[j] = lj[j] - alpha * d;
          kap[j] = kappa(d, euclid);
          mx = lse_max(mx, s[j]);
        }
        mx = row_max16(mx);
        const T m_new = lse_max(M[i], mx);
        const T sh = lse_shift(m_new);
        // nothing to rescale while the row has seen only empty slots (M = -inf)
        // the row's state (M is shared by its 16 threads; a thread's own partial L may be 0): nothing to
        // rescale while the row has seen only empty slots
        const T scale = M[i] == ninf<T>() ? T(0) : dexp(M[i] - sh);
        L[i] *= scale;
        O[i] *= scale;
        M[i] = m_new;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const T e = dexp(s[j] - sh);
          const T w = kap[j] * e;
          L[i] += e;
          O[i] += w;
          if (need_x) ws[r][tx + 16 * j] = w;
        }
        if (need_x && tx == 0) s_scale[r] = scale;
      }
      if (!need_x) continue;
      __syncthreads();  // ws and s_scale are complete
      for (int f0 = 0; f0 < m; f0 += kTile) {
        T o[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int k = 0; k < 4; ++k) o[i][k] = T(0);
        for (int l0 = 0; l0 < kTile; l0 += BK) {
#pragma unroll
          for (int idx = tid; idx < BK * kTile; idx += kThreads) {
            const int l = idx / kTile, f = idx % kTile, fg = f0 + f;
            bs[l][f] = (l0 + l < cols && fg < m) ? static_cast<T>(yc[int64_t(l0 + l) * m + fg]) : T(0);
          }
          __syncthreads();
#pragma unroll
          for (int l = 0; l < BK; ++l) {
            T wr[4], yv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) wr[i] = ws[ty + 16 * i][l0 + l];
#pragma unroll
            for (int k = 0; k < 4; ++k) yv[k] = bs[l][tx + 16 * k];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
              for (int k = 0; k < 4; ++k) o[i][k] = fma(wr[i], yv[k], o[i][k]);
          }
          __syncthreads();
        }
        // acc <- acc * scale + W Y. Every (row, feature) of the slab is always touched by the same thread.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = ty + 16 * i;
          if (r >= rows) continue;
          const T sc = s_scale[r];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const int f = f0 + tx + 16 * k;
            if (f >= m) continue;
            T* a = acc_slab + int64_t(r) * m + f;
            *a = j0 == 0 ? o[i][k] : fma(*a, sc, o[i][k]);
          }
        }
      }
    }
    // Finish the unit: logz, the loss terms, and dL/dx.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ty + 16 * i;
      const T l = row_sum16(L[i]);
      const T om = row_sum16(O[i]);
      if (r >= rows) continue;
      const int s = s_row[r];
      const T lz = lse_finish(M[i], l);
      const T w = weight[int64_t(s) * C + c];
      if (tx == 0) {
        logz[int64_t(s) * C + c] = lz;
        contrib[int64_t(s) * C + c] = w != T(0) ? -w * lz : T(0);
      }
      if (!need_x) continue;
      const T f = l > T(0) ? w * alpha / l : T(0);
      const T fo = f * om;
      for (int f0 = tx; f0 < m; f0 += 16) {
        // features f0 = tx + 16 k (+ 64 per slice): the same thread that wrote them into the slab
        const int64_t o = int64_t(s) * m + f0;
        atomicAdd(dx + o, fo * static_cast<T>(x[o]) - f * acc_slab[int64_t(r) * m + f0]);
      }
    }
  }
}

}  // namespace

kernels::Grads cc_loss(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& pairs, const at::Tensor& db,
                       const at::Tensor& log_q, double alpha, Metric metric, bool grad_x) {
  const char* op = "convex_clustering_loss";
  // dL/dx is accumulated with atomicAdd here: with 3+ classes per row its last bits depend on the order
  if (grad_x)
    at::globalContext().alertNotDeterministic(
        "ccluster::cc_loss (fused CUDA kernel, gradient of x); the library-GEMM path "
        "(ccluster.kernel_settings(backend=\"library\")) is deterministic");
  const auto t = acc_type(x.scalar_type());
  const auto opts = x.options().dtype(t);
  at::Tensor logz = at::zeros({x.size(0), db.size(0)}, opts);
  at::Tensor dx = grad_x ? at::zeros(x.sizes(), opts) : at::Tensor();
  at::Tensor loss = at::zeros({}, opts);
  if (x.size(0) > 0 && db.size(0) > 0 && db.size(1) > 0) {
    const Inputs in = prepare(op, x, db, log_q);
    // Classes with no filled slot are left out of the loss (logz stays 0 there).
    const at::Tensor nonempty = in.log_q.ne(-std::numeric_limits<double>::infinity()).any(1);
    const ClassRows cr = build_class_rows(at::logical_and(pairs, nonempty.unsqueeze(0)).t().contiguous());
    const at::Tensor w = weight.to(t).contiguous();
    at::Tensor contrib = at::zeros({x.size(0), db.size(0)}, opts);
    const int64_t units = ((int64_t(in.N) + kTile - 1) / kTile) * in.C;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cc_loss_cuda", [&] {
      using T = at::opmath_type<scalar_t>;
      // as many blocks as stay resident; one [64, m] accumulator slab per block when dL/dx is wanted
      // (at most 2 per SM: the slabs are grid x 64 x m floats)
      const int grid = std::min(occupancy_grid(cc_loss_kernel<scalar_t, T, Cfg<T>::BK>, kThreads, 0, units),
                                2 * sm_count());
      at::Tensor scratch = at::empty({grad_x ? int64_t(grid) * kTile * in.m : 0}, opts);
      cc_loss_kernel<scalar_t, T, Cfg<T>::BK><<<grid, kThreads, 0, stream>>>(
          in.x.data_ptr<scalar_t>(), in.db.data_ptr<scalar_t>(), in.log_q.data_ptr<T>(), in.xx.data_ptr<T>(),
          in.yy.data_ptr<T>(), w.data_ptr<T>(), cr.view(), in.N, in.C, in.n, in.m, static_cast<T>(alpha),
          metric == Metric::Euclidean, logz.data_ptr<T>(), contrib.data_ptr<T>(),
          grad_x ? dx.data_ptr<T>() : nullptr, grad_x ? scratch.data_ptr<T>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    loss = contrib.sum();
  }
  return {loss.to(x.scalar_type()), logz,  // logz in the accumulation type, as exemplar_logsumexp
          grad_x ? dx.to(x.scalar_type()) : at::empty({0}, x.options())};
}

}  // namespace cuda
}  // namespace ccluster
