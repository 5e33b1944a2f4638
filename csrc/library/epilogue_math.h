// Scalar numerics of the library-path epilogues, shared by the CPU implementation and the CUDA kernels
// (host and device). See epilogue.h for the meaning of S, folded and raw.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define CC_HD __host__ __device__ __forceinline__
#else
#define CC_HD inline
#endif

namespace ccluster {
namespace library {

template <typename T>
CC_HD T ninf() {
  return -std::numeric_limits<T>::infinity();
}

// Running-max shift of the online log-sum-exp: 0 while the maximum is -inf, so that empty slots give
// log 0 = -inf and never -inf - (-inf) = NaN.
template <typename T>
CC_HD T shift_of(T mx) {
  return mx == ninf<T>() ? T(0) : mx;
}

// max that ignores NaN (a NaN never becomes the shift; it reaches the sum and propagates from there)
template <typename T>
CC_HD T max_nan_skip(T a, T b) {
  return (b > a || a != a) ? b : a;
}

// log(exp(a) + exp(b)) of two log-sum-exp values; -inf + -inf = -inf, NaN propagates.
template <typename T>
CC_HD T log_add(T a, T b) {
  const T mx = max_nan_skip(a, b);
  if (mx == ninf<T>()) return mx;
  using std::exp;
  using std::log;
  return mx + log(exp(a - mx) + exp(b - mx));
}

// Merge the column state (m2, l2) into (m1, l1), both relative to their own shift.
template <typename T>
CC_HD void lse_state_merge(T& m1, T& l1, T m2, T l2) {
  using std::exp;
  const T mx = max_nan_skip(m1, m2);
  const T sh = shift_of(mx);
  T l = T(0);
  if (l1 != T(0)) l += l1 * exp(m1 - sh);
  if (l2 != T(0)) l += l2 * exp(m2 - sh);
  m1 = mx;
  l1 = l;
}

// The score of one GEMM output value. Returns s = log q + t; t = -alpha d and kappa (d(s)/d(x) =
// -alpha kappa (x - y): 2 for sqeuclidean, 1/d for euclidean and 0 at d = 0) through the pointers.
template <typename T>
CC_HD T score_of(T v, T xx, T yy, T lq, T alpha, bool euclid, bool folded, T* t_out, T* kappa_out) {
  if (folded) {  // v = lq - alpha yy + 2 alpha x.y (sqeuclidean)
    T s = v - alpha * xx;
    s = s > lq ? lq : s;  // d >= 0; a NaN stays NaN
    *t_out = s - lq;
    *kappa_out = T(2);
    return s;
  }
  T d2 = xx + yy - T(2) * v;
  d2 = d2 < T(0) ? T(0) : d2;  // rounding can make it negative; NaN stays NaN
  T d = d2;
  if (euclid) {
    using std::sqrt;
    d = sqrt(d2);
    *kappa_out = d > T(0) ? T(1) / d : T(0);
  } else {
    *kappa_out = T(2);
  }
  const T t = -alpha * d;
  *t_out = t;
  return lq + t;
}

}  // namespace library
}  // namespace ccluster
