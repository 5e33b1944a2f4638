// CPU kernel of the fused convex clustering loss  L = -sum_{(s,c) in pairs} w_sc * logz_sc.
//
// Rows are grouped by class (only the pairs are computed). Because L is linear in logz with weights known
// now, dL/dx is accumulated in the same pass, as FlashAttention accumulates softmax . V: per pair, with
// online rescaling to the running maximum,
//   acc_s   = sum_j W_sj y_j,  omega_s = sum_j W_sj,  W = kappa * exp(s - shift)
// and at the end  dL/dx_s += w_sc * alpha * (omega_s * x_s - acc_s) / l_s,  l_s = sum_j exp(s - shift).
// Two GEMMs per tile (x.y, then W.Y); nothing of size pairs x n is stored.
//
// dL/dx rows are shared by the classes of a segment: the first (lowest) class of each row writes its
// row directly; later classes go to a side buffer (one row per such pair) that is added afterwards in
// class order, so the result does not depend on thread timing.
#include "cpu/tile.h"

namespace ccluster {
namespace cpu {
namespace {

template <typename T>
void cc_loss_kernel(const Inputs& in, const ClassRows& cr, const at::Tensor& weight, T alpha, Metric metric,
                    at::Tensor& logz, at::Tensor& dx, T& loss) {
  const int64_t C = in.C, n = in.n, m = in.m;
  const T* yy = in.yy.data_ptr<T>();
  const T* lq = in.log_q.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  T* lz = logz.data_ptr<T>();
  const bool need_x = dx.defined();
  const T ninf = -std::numeric_limits<T>::infinity();

  // Classes with no filled slot are left out of the loss.
  std::vector<char> empty(C, 1);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < n; ++j)
      if (lq[c * n + j] != ninf) {
        empty[c] = 0;
        break;
      }

  // Destination of each pair's dx row: -1 = the segment's row of dx, else a side-buffer slot.
  std::vector<int64_t> dest(cr.rows.size(), -1);
  int64_t slots = 0;
  T* dxp = need_x ? dx.data_ptr<T>() : nullptr;
  if (need_x) {
    std::vector<char> seen(in.N, 0);
    for (int64_t c = 0; c < C; ++c) {
      if (empty[c]) continue;
      for (int64_t i = 0; i < cr.count(c); ++i) {
        const int64_t s = cr.row(c, i);
        if (seen[s]) dest[cr.offset[c] + i] = slots++;
        seen[s] = 1;
      }
    }
    // dx comes uninitialised: rows without a pair are zeroed here, the others are written whole below
    for (int64_t s = 0; s < in.N; ++s)
      if (!seen[s]) std::fill(dxp + s * m, dxp + (s + 1) * m, T(0));
  }
  at::Tensor side = empty_large({slots, m}, in.x.options());
  T* sidep = side.data_ptr<T>();

  const auto units = row_units(cr, C, kRowBlock, [&](int64_t c) { return empty[c] != 0; });
  std::vector<T> unit_loss(units.size(), T(0));
  parallel_units(static_cast<int64_t>(units.size()), [&](int64_t u0, int64_t u1) {
    at::Tensor xbuf, gbuf, dbuf, acc;
    RowBlock<T> rb;
    std::vector<T> M(kRowBlock), L(kRowBlock), omega(kRowBlock), tmax(kRowBlock), scale(kRowBlock);
    if (need_x) acc = at::empty({kRowBlock, m}, in.x.options());
    for (int64_t u = u0; u < u1; ++u) {
      const Unit& un = units[u];
      rb.load(in, cr, un, xbuf);
      std::fill(M.begin(), M.end(), ninf);
      std::fill(L.begin(), L.end(), T(0));
      std::fill(omega.begin(), omega.end(), T(0));
      at::Tensor acc_u = need_x ? acc.narrow(0, 0, un.rows) : at::Tensor();
      for (int64_t j0 = 0; j0 < n; j0 += kColBlock) {
        const int64_t nc = std::min(kColBlock, n - j0);
        const at::Tensor Y = in.db[un.c].narrow(0, j0, nc);
        at::Tensor g = gemm_tile(gbuf, rb.X, Y);
        T* gp = g.data_ptr<T>();
        T* dp = nullptr;
        if (need_x && metric == Metric::Euclidean) {
          if (!dbuf.defined()) dbuf = at::empty({kRowBlock * kColBlock}, g.options());
          dp = dbuf.data_ptr<T>();
        }
        scores_tile(gp, un.rows, nc, rb.xx.data(), yy + un.c * n + j0, lq + un.c * n + j0, alpha, metric,
                    tmax.data(), dp);
        for (int64_t r = 0; r < un.rows; ++r) {
          const T m_new = std::max(M[r], tmax[r]);
          const T shift = lse_shift(m_new);
          scale[r] = L[r] != T(0) ? std::exp(M[r] - shift) : T(0);
          L[r] *= scale[r];
          omega[r] *= scale[r];
          M[r] = m_new;
          T* gr = gp + r * nc;
#pragma omp simd
          for (int64_t j = 0; j < nc; ++j) gr[j] -= shift;
        }
        g.exp_();
        for (int64_t r = 0; r < un.rows; ++r) {
          T* gr = gp + r * nc;
          T s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < nc; ++j) s += gr[j];
          L[r] += s;
          if (!need_x) continue;
          T o = 0;
          if (dp) {
            const T* dr = dp + r * nc;
#pragma omp simd reduction(+ : o)
            for (int64_t j = 0; j < nc; ++j) {
              gr[j] *= kappa(dr[j], metric);
              o += gr[j];
            }
          } else {
#pragma omp simd reduction(+ : o)
            for (int64_t j = 0; j < nc; ++j) {
              gr[j] *= T(2);
              o += gr[j];
            }
          }
          omega[r] += o;
        }
        if (need_x) {
          if (j0 == 0) {  // the first chunk overwrites: no zeroing, no rescaling pass
            at::mm_out(acc_u, g, Y);
          } else {
            acc_u.mul_(at::from_blob(scale.data(), {un.rows, 1}, in.x.options()));
            acc_u.addmm_(g, Y);
          }
        }
      }
      T part = 0;
      const T* accp = need_x ? acc_u.data_ptr<T>() : nullptr;
      const T* xp = rb.X.template data_ptr<T>();
      for (int64_t r = 0; r < un.rows; ++r) {
        const int64_t s = rb.ids[r];
        const T logz_r = lse_finish(M[r], L[r]);
        lz[s * C + un.c] = logz_r;
        const T ws = w[s * C + un.c];
        if (ws != T(0)) part -= ws * logz_r;
        if (!need_x) continue;
        // dL/dx_s for this pair: w * alpha * (omega x - acc) / l
        const int64_t d = dest[cr.offset.empty() ? 0 : cr.offset[un.c] + un.r0 + r];
        T* dst = d < 0 ? dxp + s * m : sidep + d * m;
        const T f = L[r] > T(0) ? ws * alpha / L[r] : T(0);
        const T fo = f * omega[r];
        const T* xr = xp + r * m;
        const T* ar = accp + r * m;
#pragma omp simd
        for (int64_t k = 0; k < m; ++k) dst[k] = fo * xr[k] - f * ar[k];
      }
      unit_loss[u] = part;
    }
  });
  loss = 0;
  for (T p : unit_loss) loss += p;  // fixed order: deterministic
  if (need_x && slots > 0) {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < cr.count(c); ++i) {
        const int64_t d = dest[cr.offset[c] + i];
        if (d < 0) continue;
        T* dst = dxp + cr.row(c, i) * m;
        const T* src = sidep + d * m;
        for (int64_t k = 0; k < m; ++k) dst[k] += src[k];
      }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cc_loss_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                           const at::Tensor& pairs, const at::Tensor& db,
                                                           const at::Tensor& log_q, double alpha,
                                                           c10::string_view metric_name, bool grad_x) {
  const char* op = "convex_clustering_loss";
  check_inputs(op, x, db, log_q, alpha);
  const Metric metric = parse_metric(op, metric_name);
  check_pairs(op, "pairs", pairs, x, db, /*is_mask=*/true);
  check_pairs(op, "attention", weight, x, db, /*is_mask=*/false);
  const auto t = acc_type(x.scalar_type());
  const auto opts = x.options().dtype(t);
  at::Tensor logz = at::zeros({x.size(0), db.size(0)}, opts);
  at::Tensor dx = grad_x ? empty_large(x.sizes(), opts) : at::Tensor();
  at::Tensor loss = at::zeros({}, opts);
  if (x.size(0) > 0 && db.size(0) > 0 && db.size(1) > 0) {
    AT_DISPATCH_FLOATING_TYPES(t, "cc_loss_cpu", [&] {
      const Inputs in = prepare<scalar_t>(x, db, log_q, /*row_norms=*/false);
      const ClassRows cr = rows_from_mask(pairs);
      const at::Tensor w = weight.to(t).contiguous();
      scalar_t l = 0;
      cc_loss_kernel<scalar_t>(in, cr, w, static_cast<scalar_t>(alpha), metric, logz, dx, l);
      loss.fill_(l);
    });
  } else if (grad_x) {
    dx.zero_();  // no class or no slot: nothing to learn
  }
  return {loss.to(x.scalar_type()), logz.to(x.scalar_type()),
          grad_x ? dx.to(x.scalar_type()) : at::empty({0}, x.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ccluster, CPU, m) {
  m.impl("cc_loss", &cc_loss_cpu);
}

}  // namespace cpu
}  // namespace ccluster
