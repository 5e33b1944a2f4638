// CPU kernel of the fused convex clustering loss  L = -sum_{(s,c) in pairs} w_sc * logz_sc.
//
// Rows are grouped by class (only the pairs are computed). Because L is linear in logz with weights known
// now, dL/dx is accumulated in the same pass, as FlashAttention accumulates softmax . V: per pair, with
// online rescaling to the running maximum,
//   acc_s   = sum_j W_sj y_j,  omega_s = sum_j W_sj,  W = kappa * exp(s - shift)
// and at the end  dL/dx_s += w_sc * alpha * (omega_s * x_s - acc_s) / l_s,  l_s = sum_j exp(s - shift).
// Two GEMMs per tile (x.y, then W.Y); nothing of size pairs x n is stored.
//
// dL/dx rows are shared by the classes of a segment. The pairs are processed in rounds by rank: round r
// holds each row's r-th class (lowest first), so within a round no two units touch one row, round 0
// writes the rows and later rounds add to them. The sum is thus taken in class order whatever the
// thread timing, and needs no buffer.
#include "cpu/tile.h"

namespace ccluster {
namespace cpu {
namespace {

// The pairs of an [N, C] mask split by rank: element r lists, per class, the rows whose r-th non-skipped
// class (in ascending order) it is.
inline std::vector<ClassRows> rows_by_rank(const at::Tensor& mask, const std::vector<char>& skip) {
  const at::Tensor mk = mask.contiguous();
  const bool* p = mk.data_ptr<bool>();
  const int64_t N = mk.size(0), C = mk.size(1);
  std::vector<ClassRows> out;
  auto for_each_pair = [&](auto&& fn) {
    for (int64_t s = 0; s < N; ++s) {
      int64_t r = 0;
      for (int64_t c = 0; c < C; ++c)
        if (p[s * C + c] && !skip[c]) fn(s, c, r++);
    }
  };
  for_each_pair([&](int64_t, int64_t c, int64_t r) {
    if (r == static_cast<int64_t>(out.size())) {
      out.emplace_back();
      out.back().dense = false;
      out.back().N = N;
      out.back().offset.assign(C + 1, 0);
    }
    ++out[r].offset[c + 1];
  });
  std::vector<std::vector<int64_t>> fill(out.size());
  for (size_t r = 0; r < out.size(); ++r) {
    for (int64_t c = 0; c < C; ++c) out[r].offset[c + 1] += out[r].offset[c];
    out[r].rows.resize(out[r].offset[C]);
    fill[r].assign(out[r].offset.begin(), out[r].offset.end() - 1);
  }
  for_each_pair([&](int64_t s, int64_t c, int64_t r) { out[r].rows[fill[r][c]++] = s; });
  return out;
}

template <typename T>
void cc_loss_kernel(const Inputs& in, const at::Tensor& pairs, const at::Tensor& weight, T alpha, Metric metric,
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
  const std::vector<ClassRows> ranks = rows_by_rank(pairs, empty);

  T* dxp = need_x ? dx.data_ptr<T>() : nullptr;
  if (need_x) {  // dx comes uninitialised: rows without a pair are zeroed here, the others written below
    std::vector<char> seen(in.N, 0);
    if (!ranks.empty())
      for (int64_t s : ranks[0].rows) seen[s] = 1;
    for (int64_t s = 0; s < in.N; ++s)
      if (!seen[s]) std::fill(dxp + s * m, dxp + (s + 1) * m, T(0));
  }

  std::vector<T> round_loss;
  for (size_t rank = 0; rank < ranks.size(); ++rank) {
    const ClassRows& cr = ranks[rank];
    const bool first = rank == 0;
    const auto units = row_units(cr, C, kRowBlock, [](int64_t) { return false; });
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
            scale[r] = lse_scale(M[r], L[r], shift);
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
          T* dst = dxp + s * m;
          const T f = L[r] > T(0) ? ws * alpha / L[r] : T(0);
          const T fo = f * omega[r];
          const T* xr = xp + r * m;
          const T* ar = accp + r * m;
          if (first) {
#pragma omp simd
            for (int64_t k = 0; k < m; ++k) dst[k] = fo * xr[k] - f * ar[k];
          } else {
#pragma omp simd
            for (int64_t k = 0; k < m; ++k) dst[k] += fo * xr[k] - f * ar[k];
          }
        }
        unit_loss[u] = part;
      }
    });
    for (T part : unit_loss) round_loss.push_back(part);
  }
  loss = 0;
  for (T p : round_loss) loss += p;  // fixed order: deterministic
}

}  // namespace
}  // namespace cpu

namespace kernels {
namespace cpu {

Grads cc_loss(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& pairs, const at::Tensor& db,
              const at::Tensor& log_q, double alpha, Metric metric, bool grad_x) {
  using namespace ccluster::cpu;
  const auto t = acc_type(x.scalar_type());
  const auto opts = x.options().dtype(t);
  at::Tensor logz = at::zeros({x.size(0), db.size(0)}, opts);
  at::Tensor dx = grad_x ? empty_large(x.sizes(), opts) : at::Tensor();
  at::Tensor loss = at::zeros({}, opts);
  if (x.size(0) > 0 && db.size(0) > 0 && db.size(1) > 0) {
    AT_DISPATCH_FLOATING_TYPES(t, "cc_loss_cpu", [&] {
      const Inputs in = prepare<scalar_t>(x, db, log_q, /*row_norms=*/false);
      const at::Tensor w = weight.to(t).contiguous();
      scalar_t l = 0;
      cc_loss_kernel<scalar_t>(in, pairs, w, static_cast<scalar_t>(alpha), metric, logz, dx, l);
      loss.fill_(l);
    });
  } else if (grad_x) {
    dx.zero_();  // no class or no slot: nothing to learn
  }
  return {loss.to(x.scalar_type()), logz,  // logz in the accumulation type, as exemplar_logsumexp
          grad_x ? dx.to(x.scalar_type()) : at::empty({0}, x.options())};
}

}  // namespace cpu
}  // namespace kernels
}  // namespace ccluster
