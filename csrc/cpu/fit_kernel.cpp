// CPU kernel of one convex-clustering pass (fit_step): per class c and each row s with w_sc > 0,
//   logz_s  = log sum_j q_j exp(-alpha d_sj)
//   log eta_j = log sum_s w_s exp(-alpha d_sj - logz_s)
// both from the same GEMM tile. A tile holds every exemplar of the class for its rows, so logz is complete
// before the column reduction for eta (the transposed product) starts. The column log-sum-exp is kept per
// worker (running column max and sum) and merged at the end in worker order.
#include <mutex>

#include "cpu/tile.h"

namespace ccluster {
namespace cpu {
namespace {

template <typename T>
void fit_kernel(const Inputs& in, const ClassRows& cr, const at::Tensor& weight, T alpha, Metric metric,
                at::Tensor& logz, at::Tensor& log_eta) {
  const int64_t C = in.C, n = in.n;
  const T ninf = -std::numeric_limits<T>::infinity();
  const T* yy = in.yy.data_ptr<T>();
  const T* lq = in.log_q.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  T* lz = logz.data_ptr<T>();
  // rows per tile: the whole class row of n exemplars must fit a tile of about kRowBlock x kColBlock.
  const int64_t rows_per_tile = std::max<int64_t>(1, std::min(kRowBlock, kRowBlock * kColBlock / std::max<int64_t>(n, 1)));
  const auto units = row_units(cr, C, rows_per_tile, [](int64_t) { return false; });

  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), units.size()));
  // per-worker column log-sum-exp state; worker k owns [k], indexed by the range's first unit
  std::vector<std::vector<T>> colM(workers), colS(workers);
  std::vector<int64_t> first_unit(workers, -1);
  std::mutex mu;
  int64_t next_worker = 0;

  parallel_units(static_cast<int64_t>(units.size()), [&](int64_t u0, int64_t u1) {
    int64_t k;
    {
      std::lock_guard<std::mutex> lock(mu);
      k = next_worker++;
      first_unit[k] = u0;
    }
    std::vector<T>& cm = colM[k];
    std::vector<T>& cs = colS[k];
    cm.assign(C * n, ninf);
    cs.assign(C * n, T(0));
    at::Tensor xbuf, gbuf;
    at::Tensor ebuf = at::empty({rows_per_tile * n}, in.x.options());
    RowBlock<T> rb;
    std::vector<T> tmax(rows_per_tile), v(rows_per_tile), cmax(n);
    const at::Tensor zero_lq = at::zeros({n}, in.x.options());
    for (int64_t u = u0; u < u1; ++u) {
      const Unit& un = units[u];
      const T* lqc = lq + un.c * n;
      rb.load(in, cr, un, xbuf);
      // t = -alpha d (scores with log q = 0), kept in g; e = t + log q - shift for logz
      at::Tensor g = gemm_tile(gbuf, rb.X, in.db[un.c]);
      T* gp = g.data_ptr<T>();
      scores_tile(gp, un.rows, n, rb.xx.data(), yy + un.c * n, zero_lq.data_ptr<T>(), alpha, metric, tmax.data());
      at::Tensor e = ebuf.narrow(0, 0, un.rows * n).view({un.rows, n});
      T* ep = e.data_ptr<T>();
      for (int64_t r = 0; r < un.rows; ++r) {
        const T* gr = gp + r * n;
        T* er = ep + r * n;
        T mx = ninf;
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j < n; ++j) {
          er[j] = gr[j] + lqc[j];
          mx = std::max(mx, er[j]);
        }
        const T shift = lse_shift(mx);
        tmax[r] = mx;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) er[j] -= shift;
      }
      e.exp_();
      for (int64_t r = 0; r < un.rows; ++r) {
        const T* er = ep + r * n;
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < n; ++j) s += er[j];
        const T z = lse_finish(tmax[r], s);
        const int64_t row = rb.ids[r];
        lz[row * C + un.c] = z;
        // v = log w - logz; rows whose class row is all -inf contribute nothing
        v[r] = (z == ninf) ? ninf : std::log(w[row * C + un.c]) - z;
      }
      // column log-sum-exp of t + v over this tile's rows, merged into the worker's running state
      std::fill(cmax.begin(), cmax.end(), ninf);
      for (int64_t r = 0; r < un.rows; ++r) {
        T* gr = gp + r * n;
        const T vr = v[r];
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          gr[j] += vr;
          cmax[j] = std::max(cmax[j], gr[j]);
        }
      }
      T* cmc = cm.data() + un.c * n;
      T* csc = cs.data() + un.c * n;
      for (int64_t j = 0; j < n; ++j) {
        const T m_new = std::max(cmc[j], cmax[j]);
        const T shift = lse_shift(m_new);
        csc[j] *= lse_scale(cmc[j], csc[j], shift);
        cmc[j] = m_new;
        cmax[j] = shift;
      }
      for (int64_t r = 0; r < un.rows; ++r) {
        T* gr = gp + r * n;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) gr[j] -= cmax[j];
      }
      g.exp_();
      for (int64_t r = 0; r < un.rows; ++r) {
        const T* gr = gp + r * n;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) csc[j] += gr[j];
      }
    }
  });

  // merge the workers' column states in the order of their ranges (deterministic)
  std::vector<int64_t> order;
  for (int64_t k = 0; k < workers; ++k)
    if (first_unit[k] >= 0) order.push_back(k);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return first_unit[a] < first_unit[b]; });
  T* le = log_eta.data_ptr<T>();
  for (int64_t i = 0; i < C * n; ++i) {
    T mx = ninf;
    for (int64_t k : order) mx = std::max(mx, colM[k][i]);
    const T shift = lse_shift(mx);
    T s = 0;
    for (int64_t k : order)
      if (colS[k][i] != T(0)) s += colS[k][i] * lse_scale(colM[k][i], colS[k][i], shift);
    le[i] = lq[i] == ninf ? ninf : lse_finish(mx, s);
  }
}

}  // namespace
}  // namespace cpu

namespace kernels {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> fit_step(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
                                            const at::Tensor& weight, double alpha, Metric metric) {
  using namespace ccluster::cpu;
  const auto t = acc_type(x.scalar_type());
  const auto opts = x.options().dtype(t);
  at::Tensor logz = at::zeros({x.size(0), db.size(0)}, opts);
  at::Tensor log_eta = at::full(log_q.sizes(), -std::numeric_limits<double>::infinity(), opts);
  if (x.size(0) > 0 && db.size(0) > 0) {  // n = 0 still runs: logz = -inf on the weighted pairs
    AT_DISPATCH_FLOATING_TYPES(t, "fit_step_cpu", [&] {
      const Inputs in = prepare<scalar_t>(x, db, log_q);
      const at::Tensor w = weight.to(t).contiguous();
      const ClassRows cr = rows_from_mask(w.gt(0));
      fit_kernel<scalar_t>(in, cr, w, static_cast<scalar_t>(alpha), metric, logz, log_eta);
    });
  }
  return {logz.to(x.scalar_type()), log_eta.to(x.scalar_type())};
}

}  // namespace cpu
}  // namespace kernels
}  // namespace ccluster
