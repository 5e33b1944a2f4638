// CPU kernels of exemplar_logsumexp and its backward.
//
// Forward: parallel over (class, row block) units; each streams the class's exemplars in kColBlock
// chunks, one GEMM tile per chunk, and keeps an online log-sum-exp per row. Memory: O(threads x tile).
//
// Backward: recomputes each tile from the saved log-sum-exp: P = grad * exp(s - logz) (the
// responsibilities scaled by the incoming gradient) and W = kappa * P, then
//   grad_x   = alpha * (W @ Y - rowsum(W) * x)
//   grad_db  = alpha * (W^T @ X - colsum(W) * y)
//   grad_lq  = colsum(P)
// With pairs, the rows outside them and the pairs whose incoming gradient is 0 are left out (never
// read): such a row gets exactly 0 gradient and adds nothing to grad_db / grad_lq, whatever it holds
// (NaN, inf). Without pairs, a row whose gradient is 0 everywhere still gets exactly 0 in grad_x.
// Parallel over (class, exemplar chunk) units, so grad_db and grad_lq rows are owned by one worker;
// grad_x rows are shared across classes and go through per-worker buffers added at the end.
#include <algorithm>
#include <array>
#include <mutex>
#include <utility>

#include "cpu/tile.h"

namespace ccluster {
namespace cpu {
namespace {

template <typename T>
void lse_forward(const Inputs& in, const ClassRows& cr, T alpha, Metric metric, at::Tensor& out) {
  const int64_t C = in.C, n = in.n;
  const T* yy = in.yy.data_ptr<T>();
  const T* lq = in.log_q.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const auto units = row_units(cr, C, kRowBlock, [](int64_t) { return false; });
  parallel_units(static_cast<int64_t>(units.size()), [&](int64_t u0, int64_t u1) {
    at::Tensor xbuf, gbuf;
    RowBlock<T> rb;
    std::vector<T> M(kRowBlock), L(kRowBlock), tmax(kRowBlock);
    for (int64_t u = u0; u < u1; ++u) {
      const Unit& un = units[u];
      rb.load(in, cr, un, xbuf);
      std::fill(M.begin(), M.end(), -std::numeric_limits<T>::infinity());
      std::fill(L.begin(), L.end(), T(0));
      for (int64_t j0 = 0; j0 < n; j0 += kColBlock) {
        const int64_t nc = std::min(kColBlock, n - j0);
        at::Tensor g = gemm_tile(gbuf, rb.X, in.db[un.c].narrow(0, j0, nc));
        T* gp = g.data_ptr<T>();
        scores_tile(gp, un.rows, nc, rb.xx.data(), yy + un.c * n + j0, lq + un.c * n + j0, alpha, metric,
                    tmax.data());
        for (int64_t r = 0; r < un.rows; ++r) {
          const T m_new = std::max(M[r], tmax[r]);
          const T shift = lse_shift(m_new);
          L[r] *= lse_scale(M[r], L[r], shift);  // rescale the running sum to the new shift
          M[r] = m_new;
          T* gr = gp + r * nc;
#pragma omp simd
          for (int64_t j = 0; j < nc; ++j) gr[j] -= shift;
        }
        g.exp_();
        for (int64_t r = 0; r < un.rows; ++r) {
          const T* gr = gp + r * nc;
          T s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < nc; ++j) s += gr[j];
          L[r] += s;
        }
      }
      for (int64_t r = 0; r < un.rows; ++r) o[rb.ids[r] * C + un.c] = lse_finish(M[r], L[r]);
    }
  });
}

template <typename T>
void lse_backward(const Inputs& in, const ClassRows& cr, const at::Tensor& grad, const at::Tensor& logz,
                  T alpha, Metric metric, at::Tensor& gx, at::Tensor& gdb, at::Tensor& glq) {
  const int64_t C = in.C, n = in.n, m = in.m, N = in.N;
  const bool need_x = gx.defined(), need_db = gdb.defined(), need_lq = glq.defined();
  const T* yy = in.yy.data_ptr<T>();
  const T* lq = in.log_q.data_ptr<T>();
  const T* gp_in = grad.data_ptr<T>();
  const T* lz = logz.data_ptr<T>();
  const bool euclid = metric == Metric::Euclidean;

  struct ChunkUnit {
    int64_t c, j0, cols;
  };
  std::vector<ChunkUnit> units;
  for (int64_t c = 0; c < C; ++c)
    if (cr.count(c) > 0)
      for (int64_t j0 = 0; j0 < n; j0 += kColBlock) units.push_back({c, j0, std::min(kColBlock, n - j0)});

  // grad_x rows receive contributions from every class: each worker accumulates into its own buffer
  // (the worker that starts at unit 0 uses grad_x itself), summed afterwards in unit order so that the
  // result does not depend on thread timing.
  // rowsum(W) is summed in double: grad_x = alpha (W Y - rowsum(W) x) cancels (the terms are about
  // |x| / d times the result for the euclidean metric near an exemplar), and a float sum over a tile's
  // 512 columns costs several ulps, which the cancellation multiplies. The W Y GEMM and each tile's
  // terms stay in T.
  std::mutex mu;
  std::vector<std::pair<int64_t, at::Tensor>> partial_gx;
  const auto dopts = in.x.options().dtype(at::kDouble);
  at::Tensor roww_all = need_x ? at::zeros({N}, dopts) : at::Tensor();
  std::vector<std::pair<int64_t, at::Tensor>> partial_roww;
  parallel_units(static_cast<int64_t>(units.size()), [&](int64_t u0, int64_t u1) {
    at::Tensor xbuf, gbuf, dbuf, tmp;
    at::Tensor gx_local, roww_local;  // this worker's share of grad_x and of rowsum(W)
    if (need_x) {
      gx_local = u0 == 0 ? gx : zeros_large({N, m}, in.x.options());
      roww_local = u0 == 0 ? roww_all : at::zeros({N}, dopts);
    }
    RowBlock<T> rb;
    std::vector<T> gr_s(kRowBlock), lz_s(kRowBlock), colw, colp, unused(kRowBlock);
    for (int64_t u = u0; u < u1; ++u) {
      const auto& cu = units[u];
      const at::Tensor Y = in.db[cu.c].narrow(0, cu.j0, cu.cols);
      const T* yyc = yy + cu.c * n + cu.j0;
      const T* lqc = lq + cu.c * n + cu.j0;
      colw.assign(cu.cols, T(0));
      colp.assign(cu.cols, T(0));
      at::Tensor gdb_c = need_db ? gdb[cu.c].narrow(0, cu.j0, cu.cols) : at::Tensor();
      for (int64_t r0 = 0; r0 < cr.count(cu.c); r0 += kRowBlock) {
        const Unit un{cu.c, r0, std::min(kRowBlock, cr.count(cu.c) - r0)};
        // rows whose gradient is 0 (or whose class is empty) contribute nothing
        bool any = false;
        for (int64_t r = 0; r < un.rows; ++r) {
          const int64_t s = cr.row(un.c, un.r0 + r);
          gr_s[r] = gp_in[s * C + un.c];
          lz_s[r] = lz[s * C + un.c];
          if (gr_s[r] == T(0) || lz_s[r] == -std::numeric_limits<T>::infinity()) gr_s[r] = T(0);
          any = any || gr_s[r] != T(0);
        }
        if (!any) continue;
        rb.load(in, cr, un, xbuf);
        at::Tensor g = gemm_tile(gbuf, rb.X, Y);
        T* gp = g.data_ptr<T>();
        T* dp = nullptr;
        if (euclid) {
          if (!dbuf.defined()) dbuf = at::empty({kRowBlock * kColBlock}, g.options());
          dp = dbuf.data_ptr<T>();
        }
        scores_tile(gp, un.rows, cu.cols, rb.xx.data(), yyc, lqc, alpha, metric, unused.data(), dp);
        for (int64_t r = 0; r < un.rows; ++r) {
          T* row = gp + r * cu.cols;
          if (gr_s[r] == T(0)) {  // exp(-inf) = 0 whatever the scores hold (s - inf is NaN for s = NaN)
            std::fill(row, row + cu.cols, -std::numeric_limits<T>::infinity());
            continue;
          }
          const T shift = lz_s[r];
#pragma omp simd
          for (int64_t j = 0; j < cu.cols; ++j) row[j] -= shift;
        }
        g.exp_();  // responsibilities exp(s - logz) (exactly 0 on rows without gradient)
        double* roww = need_x ? roww_local.data_ptr<double>() : nullptr;
        for (int64_t r = 0; r < un.rows; ++r) {
          T* row = gp + r * cu.cols;
          const T* drow = dp ? dp + r * cu.cols : nullptr;
          const T gs = gr_s[r];
          double rs = 0;
          if (euclid) {
#pragma omp simd reduction(+ : rs)
            for (int64_t j = 0; j < cu.cols; ++j) {
              const T p = gs * row[j];
              colp[j] += p;
              const T w = kappa(drow[j], metric) * p;
              row[j] = w;
              colw[j] += w;
              rs += double(w);
            }
          } else {
#pragma omp simd reduction(+ : rs)
            for (int64_t j = 0; j < cu.cols; ++j) {
              const T p = gs * row[j];
              colp[j] += p;
              row[j] = T(2) * p;
              colw[j] += T(2) * p;
              rs += double(T(2) * p);
            }
          }
          if (need_x) roww[rb.ids[r]] += rs;
        }
        if (need_x) {
          if (cr.dense) {
            gx_local.narrow(0, un.r0, un.rows).addmm_(g, Y, 1, alpha);
          } else {
            tmp = at::mm(g, Y);
            const T* tp = tmp.data_ptr<T>();
            T* gxp = gx_local.data_ptr<T>();
            for (int64_t r = 0; r < un.rows; ++r) {
              T* dst = gxp + rb.ids[r] * m;
              const T* src = tp + r * m;
#pragma omp simd
              for (int64_t k = 0; k < m; ++k) dst[k] += alpha * src[k];
            }
          }
        }
        if (need_db) gdb_c.addmm_(g.t(), rb.X, 1, alpha);
      }
      if (need_db) {
        T* gd = gdb_c.data_ptr<T>();
        const T* yp = Y.data_ptr<T>();
        for (int64_t j = 0; j < cu.cols; ++j)
          for (int64_t k = 0; k < m; ++k) gd[j * m + k] -= alpha * colw[j] * yp[j * m + k];
      }
      if (need_lq) std::copy(colp.begin(), colp.end(), glq.data_ptr<T>() + cu.c * n + cu.j0);
    }
    if (need_x && u0 != 0) {
      std::lock_guard<std::mutex> lock(mu);
      partial_gx.emplace_back(u0, gx_local);
      partial_roww.emplace_back(u0, roww_local);
    }
  });
  if (need_x) {
    std::sort(partial_gx.begin(), partial_gx.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    std::sort(partial_roww.begin(), partial_roww.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    for (auto& p : partial_gx) gx.add_(p.second);
    for (auto& p : partial_roww) roww_all.add_(p.second);
    // grad_x -= alpha rowsum(W) x, only on rows with a nonzero rowsum(W): a row outside the pairs (or
    // whose gradient is 0) has none and gets exactly 0 gradient, also when it holds NaN or inf (0 x NaN).
    const double* rw = roww_all.data_ptr<double>();
    const T* xp = in.x.data_ptr<T>();
    T* gxp = gx.data_ptr<T>();
    at::parallel_for(0, N, 64, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        if (rw[s] == 0.0) continue;
        const T f = static_cast<T>(-double(alpha) * rw[s]);
        const T* xr = xp + s * m;
        T* dst = gxp + s * m;
#pragma omp simd
        for (int64_t k = 0; k < m; ++k) dst[k] += f * xr[k];
      }
    });
  }
}

}  // namespace
}  // namespace cpu

namespace kernels {
namespace cpu {

at::Tensor lse_forward(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q, double alpha,
                       Metric metric, const c10::optional<at::Tensor>& pairs) {
  using namespace ccluster::cpu;
  const auto t = acc_type(x.scalar_type());
  at::Tensor out = at::zeros({x.size(0), db.size(0)}, x.options().dtype(t));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(t, "exemplar_logsumexp_cpu", [&] {
    const Inputs in = prepare<scalar_t>(x, db, log_q);
    const ClassRows cr = pairs.has_value() ? rows_from_mask(*pairs) : all_rows(in.N);
    ccluster::cpu::lse_forward<scalar_t>(in, cr, static_cast<scalar_t>(alpha), metric, out);
  });
  return out;  // logz stays in the accumulation type (the backward recomputes p = exp(s - logz) from it)
}

Grads lse_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
                   const at::Tensor& logz, double alpha, Metric metric, const c10::optional<at::Tensor>& pairs,
                   std::array<bool, 3> output_mask) {
  using namespace ccluster::cpu;
  const auto t = acc_type(x.scalar_type());
  const auto opts = x.options().dtype(t);
  at::Tensor gx = output_mask[0] ? zeros_large(x.sizes(), opts) : at::Tensor();
  at::Tensor gdb = output_mask[1] ? zeros_large(db.sizes(), opts) : at::Tensor();
  at::Tensor glq = output_mask[2] ? at::zeros(log_q.sizes(), opts) : at::Tensor();
  if (x.size(0) > 0 && db.size(0) > 0 && db.size(1) > 0 && (gx.defined() || gdb.defined() || glq.defined())) {
    AT_DISPATCH_FLOATING_TYPES(t, "exemplar_logsumexp_backward_cpu", [&] {
      const Inputs in = prepare<scalar_t>(x, db, log_q);
      const at::Tensor g = grad.to(t).contiguous(), lz = logz.to(t).contiguous();
      // With pairs, only the pairs with a gradient take part: the rows of the others are never read, so
      // whatever they hold (NaN, inf) reaches no gradient.
      const ClassRows cr = pairs.has_value() ? rows_from_mask(at::logical_and(*pairs, g.ne(0))) : all_rows(in.N);
      ccluster::cpu::lse_backward<scalar_t>(in, cr, g, lz, static_cast<scalar_t>(alpha), metric, gx, gdb, glq);
    });
  }
  auto finish = [&](const at::Tensor& g, const at::Tensor& like) {
    return g.defined() ? g.to(like.scalar_type()) : at::empty({0}, like.options());
  };
  return {finish(gx, x), finish(gdb, db), finish(glq, log_q)};
}

}  // namespace cpu
}  // namespace kernels
}  // namespace ccluster
