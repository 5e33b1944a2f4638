// CPU implementation of the library-path epilogues (semantics: epilogue.h). Plain loops over slots and
// columns, parallel over slots where the slots are independent; every reduction runs in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "library/epilogue.h"
#include "numerics.h"

namespace ccluster {
namespace library {
namespace {

template <typename T>
void rows_impl(const RowArgs& a) {
  const int64_t ld = a.g * a.k;
  T* S = a.S.data_ptr<T>();
  T* P = a.P.defined() ? a.P.data_ptr<T>() : nullptr;
  const T* xx = a.xx.data_ptr<T>();
  const T* yy = a.yy.data_ptr<T>();
  const T* lq = a.lq.data_ptr<T>();
  const SlotsView sv = slots_view(a.sl);
  const bool* mask = a.mask.defined() ? a.mask.data_ptr<bool>() : nullptr;
  T* logz = a.logz.data_ptr<T>();
  const T* coef = a.coef.defined() ? a.coef.data_ptr<T>() : nullptr;
  T* rowsum = a.rowsum.defined() ? a.rowsum.data_ptr<T>() : nullptr;
  const T alpha = static_cast<T>(a.alpha);
  const int64_t C = a.C, n = a.n, k = a.k;
  const RowMode mode = a.mode;
  at::parallel_for(0, a.sl.count(), 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = sv.row(i);
      const T xi = xx[i];
      for (int64_t h = 0; h < a.g; ++h) {
        const int64_t c = sv.cls(i) + h;
        T* row = S + i * ld + h * k;
        T* prow = P ? P + i * ld + h * k : nullptr;
        const bool active = s >= 0 && (!mask || mask[s * C + c]);
        if (!active) {
          if (mode == RowMode::Lse) continue;
          const T fill = (mode == RowMode::Fit || mode == RowMode::Eta) ? ninf<T>() : T(0);
          std::fill(row, row + k, fill);
          if (prow) std::fill(prow, prow + k, T(0));
          continue;
        }
        const int64_t pc = s * C + c;
        const T* lqc = lq + c * n + a.j0;
        const T* yyc = yy + c * n + a.j0;
        T t, kap;
        T z;  // the row's log-sum-exp: computed here (Lse, LseW, Fit) or given (W, Eta)
        if (mode == RowMode::Lse || mode == RowMode::LseW || mode == RowMode::Fit) {
          T mx = ninf<T>();
          for (int64_t j = 0; j < k; ++j)
            mx = lse_max(mx, score_of(row[j], xi, yyc[j], lqc[j], alpha, a.euclid, a.folded, &t, &kap));
          const T sh = lse_shift(mx);
          double l = 0;  // a float sum over k columns would cost several ulps of logz (see rs below)
          for (int64_t j = 0; j < k; ++j)
            l += double(std::exp(score_of(row[j], xi, yyc[j], lqc[j], alpha, a.euclid, a.folded, &t, &kap) - sh));
          z = lse_finish(mx, l);
          if (mode == RowMode::Lse && !a.first) z = log_add(logz[pc], z);
          logz[pc] = z;
          if (mode == RowMode::Lse) continue;
        } else {
          z = logz[pc];
        }
        const T cf = coef[pc];
        if (mode == RowMode::Fit || mode == RowMode::Eta) {
          const T v = z == ninf<T>() ? ninf<T>() : std::log(cf) - z;
          for (int64_t j = 0; j < k; ++j) {
            score_of(row[j], xi, yyc[j], lqc[j], alpha, a.euclid, a.folded, &t, &kap);
            row[j] = t + v;
          }
          continue;
        }
        // W, LseW: responsibilities scaled by the row's coefficient; rows without one contribute 0
        if (cf == T(0) || z == ninf<T>()) {
          std::fill(row, row + k, T(0));
          if (prow) std::fill(prow, prow + k, T(0));
          continue;
        }
        // summed in double: grad_x = alpha (W Y - rowsum(W) x) cancels, and a float sum over k columns
        // costs several ulps that the cancellation multiplies (by |x| / d for the euclidean metric)
        double rs = 0;
        for (int64_t j = 0; j < k; ++j) {
          const T sc = score_of(row[j], xi, yyc[j], lqc[j], alpha, a.euclid, a.folded, &t, &kap);
          const T p = cf * std::exp(sc - z);
          const T w = kap * p;
          if (prow) prow[j] = p;
          row[j] = w;
          rs += double(w);
        }
        if (rowsum) rowsum[pc] += static_cast<T>(rs);
      }
    }
  });
}

template <typename T>
void cols_impl(const ColArgs& a) {
  const int64_t ld = a.g * a.k;
  const T* S = a.S.data_ptr<T>();
  T* acc = a.acc.data_ptr<T>();
  T* acc2 = a.acc2.defined() ? a.acc2.data_ptr<T>() : nullptr;
  const SlotsView sv = slots_view(a.sl);
  const int64_t nb = a.sl.nb, rows = a.sl.rows;
  at::parallel_for(0, ld, 64, [&](int64_t q0, int64_t q1) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t cbase = sv.block_cls(b);
      const T* Sb = S + b * rows * ld;
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t o = (cbase + q / a.k) * a.n + a.j0 + q % a.k;
        if (!a.lse) {
          T sum = 0;
          for (int64_t r = 0; r < rows; ++r) sum += Sb[r * ld + q];
          acc[o] += sum;
        } else {
          T mx = ninf<T>();
          for (int64_t r = 0; r < rows; ++r) mx = lse_max(mx, Sb[r * ld + q]);
          const T sh = lse_shift(mx);
          T l = 0;
          for (int64_t r = 0; r < rows; ++r) l += std::exp(Sb[r * ld + q] - sh);
          lse_merge(acc[o], acc2[o], mx, l);
        }
      }
    }
  });
}

template <typename T, typename src_t, typename out_t>
void gather_typed(const GatherArgs& a) {
  const int64_t m = a.src.size(1);
  const int64_t st0 = a.src.stride(0), st1 = a.src.stride(1);
  const src_t* src = a.src.data_ptr<src_t>();
  const SlotsView sv = slots_view(a.sl);
  const T* mu = a.mu.defined() ? a.mu.data_ptr<T>() : nullptr;
  out_t* out = a.out.defined() ? a.out.data_ptr<out_t>() : nullptr;
  T* xx = a.xx.data_ptr<T>();
  const bool* keep = a.keep.defined() ? a.keep.data_ptr<bool>() : nullptr;
  const bool* mask = a.mask.defined() ? a.mask.data_ptr<bool>() : nullptr;
  at::parallel_for(0, a.sl.count(), 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = sv.row(i);
      if (r < 0 || (keep && !keep[r]) || (mask && !mask[r * a.C + sv.cls(i)])) {
        if (out) std::fill(out + i * m, out + (i + 1) * m, out_t(0));
        xx[i] = T(0);
        continue;
      }
      const src_t* sr = src + r * st0;
      T s = 0;
      for (int64_t f = 0; f < m; ++f) {
        T v = static_cast<T>(sr[f * st1]);
        if (mu) v -= mu[f];
        const out_t o = static_cast<out_t>(v);
        const T vr = static_cast<T>(o);
        if (out) out[i * m + f] = o;
        s += vr * vr;
      }
      xx[i] = s;
    }
  });
}

template <typename T>
void gather_impl(const GatherArgs& a) {
  const at::ScalarType ot = a.out.defined() ? a.out.scalar_type() : a.round_to;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.src.scalar_type(), "ccluster_gather_src", [&] {
    using src_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ot, "ccluster_gather_out", [&] {
      gather_typed<T, src_t, scalar_t>(a);
    });
  });
}

template <typename T>
void scatter_impl(const ScatterArgs& a) {
  const int64_t m = a.dst.size(1);
  const int64_t U = a.run_begin.numel() - 1;
  const int64_t* rows = a.sorted_rows.data_ptr<int64_t>();
  const int64_t* order = a.order.data_ptr<int64_t>();
  const int64_t* rb = a.run_begin.data_ptr<int64_t>();
  const T* src = a.src.data_ptr<T>();
  T* dst = a.dst.data_ptr<T>();
  const T scale = static_cast<T>(a.scale);
  // the entries of one row are consecutive in the sorted list, in class order; runs are distinct rows,
  // so they run in parallel
  at::parallel_for(0, U, 16, [&](int64_t u0, int64_t u1) {
    std::vector<T> sum(m);
    for (int64_t u = u0; u < u1; ++u) {
      bool any = false;
      std::fill(sum.begin(), sum.end(), T(0));
      for (int64_t q = rb[u]; q < rb[u + 1]; ++q) {
        const int64_t p = order[q], cls = p / a.Rmax, i = p % a.Rmax - a.r0;
        if (i < 0 || i >= a.rows) continue;
        const T* sr = src + (cls * a.rows + i) * m;
        for (int64_t f = 0; f < m; ++f) sum[f] += sr[f];
        any = true;
      }
      if (!any) continue;
      T* dr = dst + rows[rb[u]] * m;
      for (int64_t f = 0; f < m; ++f) dr[f] += scale * sum[f];
    }
  });
}

template <typename T, typename src_t>
void row_terms_typed(const RowTermArgs& a) {
  const int64_t R = a.dst.size(0), m = a.dst.size(1);
  const int64_t st0 = a.src.stride(0), st1 = a.src.stride(1);
  const src_t* src = a.src.data_ptr<src_t>();
  const T* w = a.w.data_ptr<T>();
  T* dst = a.dst.data_ptr<T>();
  const T scale = static_cast<T>(a.scale);
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (w[r] == T(0)) continue;
      const T f = scale * w[r];
      const src_t* sr = src + r * st0;
      T* dr = dst + r * m;
      if (st1 == 1) {
#pragma omp simd
        for (int64_t k = 0; k < m; ++k) dr[k] += f * static_cast<T>(sr[k]);
      } else {
        for (int64_t k = 0; k < m; ++k) dr[k] += f * static_cast<T>(sr[k * st1]);
      }
    }
  });
}

void rows_cpu(const RowArgs& a) {
  if (a.sl.count() == 0 || a.k == 0) return;
  AT_DISPATCH_FLOATING_TYPES(a.S.scalar_type(), "ccluster_rows_cpu", [&] { rows_impl<scalar_t>(a); });
}
void cols_cpu(const ColArgs& a) {
  if (a.sl.count() == 0 || a.k == 0) return;
  AT_DISPATCH_FLOATING_TYPES(a.S.scalar_type(), "ccluster_cols_cpu", [&] { cols_impl<scalar_t>(a); });
}
void gather_cpu(const GatherArgs& a) {
  if (a.sl.count() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(a.xx.scalar_type(), "ccluster_gather_cpu", [&] { gather_impl<scalar_t>(a); });
}
void scatter_cpu(const ScatterArgs& a) {
  if (a.rows == 0 || a.run_begin.numel() <= 1) return;
  AT_DISPATCH_FLOATING_TYPES(a.dst.scalar_type(), "ccluster_scatter_cpu", [&] { scatter_impl<scalar_t>(a); });
}
void row_terms_cpu(const RowTermArgs& a) {
  if (a.dst.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(a.dst.scalar_type(), "ccluster_row_terms_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.src.scalar_type(), "ccluster_row_terms_src",
                                    [&] { row_terms_typed<T, scalar_t>(a); });
  });
}
bool capturing_cpu() { return false; }

const Epilogues kCpu{&gather_cpu, &rows_cpu, &cols_cpu, &scatter_cpu, &row_terms_cpu, &capturing_cpu};
std::atomic<const Epilogues*> g_cuda{nullptr};

}  // namespace

const Epilogues& cpu_epilogues() { return kCpu; }

void register_cuda_epilogues(const Epilogues* table) { g_cuda.store(table); }

bool has_cuda_epilogues() { return g_cuda.load() != nullptr; }

const Epilogues& epilogues_for(const at::Device& device, const char* op) {
  if (device.is_cpu()) return kCpu;
  const Epilogues* t = device.is_cuda() ? g_cuda.load() : nullptr;
  TORCH_CHECK(t != nullptr, op, ": the library-GEMM path has no epilogue kernels for device ", device,
              " in this build (CUDA kernels are compiled when torch has CUDA and a toolkit is found)");
  return *t;
}

}  // namespace library
}  // namespace ccluster
