// The numerics every kernel shares, host and device alike: the metric, the score of one distance, and
// the online log-sum-exp. CPU kernels (csrc/cpu), CUDA kernels (csrc/cuda) and the library path's
// epilogues (csrc/library) include this header and no other helper of ours, so a change to how a -inf,
// a NaN or an empty row is treated is made once.
//
// Online log-sum-exp. A state is a running maximum `m` and a sum `l` of exp(s - shift(m)) over the
// values seen so far. shift(m) is 0 while m = -inf (nothing seen yet, or only empty slots), so -inf
// inputs give log(0) = -inf and never (-inf) - (-inf) = NaN. The maximum skips NaN (a NaN never
// becomes the shift); a NaN reaches the sum instead and propagates from there.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define CC_HD __host__ __device__ __forceinline__
#else
#define CC_HD inline
#endif

namespace ccluster {

enum class Metric { SqEuclidean, Euclidean };

template <typename T>
CC_HD T ninf() {
  return -std::numeric_limits<T>::infinity();
}

// The shift of a state whose maximum is m.
template <typename T>
CC_HD T lse_shift(T m) {
  return m == ninf<T>() ? T(0) : m;
}

// log sum exp of a finished state.
template <typename T, typename L>
CC_HD T lse_finish(T m, L l) {
  using std::log;
  return lse_shift(m) + static_cast<T>(log(l));
}

// max that skips NaN (fmax's rule).
template <typename T>
CC_HD T lse_max(T a, T b) {
  return (b > a || a != a) ? b : a;
}

// The factor that moves a sum l kept relative to shift(m_old) to the shift `sh` of a new maximum: 0
// while the sum is empty (nothing to rescale, and exp(-inf - -inf) would be NaN).
template <typename T, typename L>
CC_HD L lse_scale(T m_old, L l, T sh) {
  using std::exp;
  return l != L(0) ? static_cast<L>(exp(m_old - sh)) : L(0);
}

// Adds one value s to the state (m, l): one exp per value.
template <typename T, typename L>
CC_HD void lse_push(T& m, L& l, T s) {
  using std::exp;
  if (s > m) {
    l = l * lse_scale(m, l, s) + L(1);
    m = s;
  } else {
    l += static_cast<L>(exp(s - lse_shift(m)));  // NaN reaches the sum; -inf adds 0
  }
}

// Merges the state (m2, l2) into (m1, l1). Symmetric up to rounding: every lane of a shuffle reduction
// ends with the same state.
template <typename T, typename L>
CC_HD void lse_merge(T& m1, L& l1, T m2, L l2) {
  const T mx = lse_max(m1, m2);
  const T sh = lse_shift(mx);
  const L l = l1 * lse_scale(m1, l1, sh) + l2 * lse_scale(m2, l2, sh);
  m1 = mx;
  l1 = l;
}

// log(exp(a) + exp(b)) of two finished log-sum-exp values; -inf + -inf = -inf, NaN propagates.
template <typename T>
CC_HD T log_add(T a, T b) {
  using std::exp;
  using std::log;
  const T mx = lse_max(a, b);
  if (mx == ninf<T>()) return mx;
  return mx + log(exp(a - mx) + exp(b - mx));
}

// Distance from a dot product: |x|^2 + |y|^2 - 2 x.y clamped at 0 (rounding can make it negative; a NaN
// stays NaN), square-rooted for the euclidean metric.
template <typename T>
CC_HD T distance(T xx, T yy, T dot, bool euclid) {
  using std::sqrt;
  T d2 = xx + yy - T(2) * dot;
  d2 = d2 < T(0) ? T(0) : d2;
  return euclid ? sqrt(d2) : d2;
}

// d(score)/d(x) = -alpha kappa (x - y): kappa = 2 for sqeuclidean, 1/d for euclidean (0 at d = 0).
template <typename T>
CC_HD T kappa(T d, bool euclid) {
  if (!euclid) return T(2);
  return d > T(0) ? T(1) / d : T(0);
}

// The score of one GEMM output value v. Returns s = log q + t with t = -alpha d, and t and kappa through
// the pointers. folded: v = log q - alpha |y|^2 + 2 alpha x.y (sqeuclidean: the bias and the scale went
// into the GEMM) and s = min(v - alpha |x|^2, log q), the same clamp d >= 0; raw: v = x.y.
template <typename T>
CC_HD T score_of(T v, T xx, T yy, T lq, T alpha, bool euclid, bool folded, T* t_out, T* kappa_out) {
  if (folded) {
    T s = v - alpha * xx;
    s = s > lq ? lq : s;  // a NaN stays NaN
    *t_out = s - lq;
    *kappa_out = T(2);
    return s;
  }
  const T d = distance(xx, yy, v, euclid);
  *kappa_out = kappa(d, euclid);
  const T t = -alpha * d;
  *t_out = t;
  return lq + t;
}

}  // namespace ccluster
