// The CPU tile engine shared by every op: inputs in the accumulation type, the rows that take part in
// each class, row blocks, and the distance epilogue applied to a BLAS GEMM tile.
//
// Tiling: a (row block x exemplar chunk) tile of x.y products comes from one GEMM (at::mm_out, MKL/
// OpenBLAS), the epilogue turns it into scores s = log q - alpha d in place while it is still in cache
// (kRowBlock x kColBlock values: 512 KB in float32, half the L2 of a typical core), and exp is applied to the whole tile at once with
// ATen's vectorised kernel. Nothing of size N x C x n is ever allocated.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "numerics.h"
#include "ops/kernels.h"

namespace ccluster {
namespace cpu {

constexpr int64_t kRowBlock = 256;   // rows per tile
constexpr int64_t kColBlock = 512;   // exemplars per tile

// float for float/half/bfloat16 inputs, double for double.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename T>
void row_sqnorms(const T* a, int64_t rows, int64_t m, T* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* r = a + i * m;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < m; ++k) s += r[k] * r[k];
    out[i] = s;
  }
}

// The inputs cast to the accumulation type and made contiguous (no copy when they already are), with
// the squared norms of every exemplar and, unless row_norms is false, of every feature row. Without
// them RowBlock computes the norms of each block it loads: cheaper where most rows are loaded once
// (label-sparse pairs), since it saves a pass over x.
struct Inputs {
  at::Tensor x, db, log_q, xx, yy;  // xx [N] (or undefined), yy [C, n]
  int64_t N, C, n, m;
};

template <typename T>
Inputs prepare(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q, bool row_norms = true) {
  Inputs in;
  const auto t = acc_type(x.scalar_type());
  in.x = x.to(t).contiguous();
  in.db = db.to(t).contiguous();
  in.log_q = log_q.to(t).contiguous();
  in.N = x.size(0), in.C = db.size(0), in.n = db.size(1), in.m = db.size(2);
  if (row_norms) {
    in.xx = at::empty({in.N}, in.x.options());
    row_sqnorms(in.x.data_ptr<T>(), in.N, in.m, in.xx.data_ptr<T>());
  }
  in.yy = at::empty({in.C, in.n}, in.x.options());
  row_sqnorms(in.db.data_ptr<T>(), in.C * in.n, in.m, in.yy.data_ptr<T>());
  return in;
}

// An uninitialised tensor for a large output ([N, m] gradients). glibc serves blocks of 32 MiB and more
// (its largest mmap threshold) from a fresh mmap, and on first touch every 4 KB page faults: for a 60 MB
// gradient that costs several times the pass that writes it. For those blocks we ask for transparent
// huge pages (Linux, THP in "madvise" or "always" mode) on the 2 MB-aligned interior, which cuts the
// faults 512-fold. Smaller blocks may come from the reused heap, where the hint was measured to slow
// things down (huge pages split when the heap is trimmed), so they are left alone.
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kMinBytes = size_t(32) << 20;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (t.nbytes() >= kMinBytes) {
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t hi = (begin + t.nbytes()) & ~(kHuge - 1);
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // a hint: failure is harmless
  }
#endif
  return t;
}

inline at::Tensor zeros_large(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return empty_large(sizes, opts).zero_();
}

// The rows of x that take part in each class: all of them, or those selected by an [N, C] mask (CSR).
struct ClassRows {
  bool dense = true;
  int64_t N = 0;
  std::vector<int64_t> offset;  // [C + 1] when sparse
  std::vector<int64_t> rows;    // concatenated row ids, ascending within a class

  int64_t count(int64_t c) const { return dense ? N : offset[c + 1] - offset[c]; }
  int64_t row(int64_t c, int64_t i) const { return dense ? i : rows[offset[c] + i]; }
};

inline ClassRows all_rows(int64_t N) {
  ClassRows cr;
  cr.N = N;
  return cr;
}

inline ClassRows rows_from_mask(const at::Tensor& mask) {  // mask: [N, C] bool
  const at::Tensor mk = mask.contiguous();
  const bool* p = mk.data_ptr<bool>();
  const int64_t N = mk.size(0), C = mk.size(1);
  ClassRows cr;
  cr.dense = false;
  cr.N = N;
  cr.offset.assign(C + 1, 0);
  for (int64_t s = 0; s < N; ++s)
    for (int64_t c = 0; c < C; ++c) cr.offset[c + 1] += p[s * C + c];
  for (int64_t c = 0; c < C; ++c) cr.offset[c + 1] += cr.offset[c];
  cr.rows.resize(cr.offset[C]);
  std::vector<int64_t> fill(cr.offset.begin(), cr.offset.end() - 1);
  for (int64_t s = 0; s < N; ++s)
    for (int64_t c = 0; c < C; ++c)
      if (p[s * C + c]) cr.rows[fill[c]++] = s;
  return cr;
}

// A unit of parallel work: rows [r0, r0 + rows) of class c's row list.
struct Unit {
  int64_t c, r0, rows;
};

// Row blocks of every class with at least one row; classes for which skip(c) holds are left out.
template <typename Skip>
std::vector<Unit> row_units(const ClassRows& cr, int64_t C, int64_t block, Skip skip) {
  std::vector<Unit> units;
  for (int64_t c = 0; c < C; ++c) {
    if (skip(c)) continue;
    for (int64_t r0 = 0; r0 < cr.count(c); r0 += block)
      units.push_back({c, r0, std::min(block, cr.count(c) - r0)});
  }
  return units;
}

// A block of rows of x: a view of x when the rows are consecutive (all rows, or a run of one video's
// segments), else gathered into `buf`.
template <typename T>
struct RowBlock {
  at::Tensor X;              // [rows, m]
  std::vector<int64_t> ids;  // row ids in x
  std::vector<T> xx;         // squared norms

  void load(const Inputs& in, const ClassRows& cr, const Unit& u, at::Tensor& buf) {
    ids.resize(u.rows);
    xx.resize(u.rows);
    for (int64_t r = 0; r < u.rows; ++r) ids[r] = cr.row(u.c, u.r0 + r);
    if (cr.dense || ids.back() - ids.front() == u.rows - 1) {  // ascending ids: consecutive rows
      X = in.x.narrow(0, ids.front(), u.rows);
    } else {
      if (!buf.defined()) buf = at::empty({std::max<int64_t>(u.rows, kRowBlock), in.m}, in.x.options());
      const T* xp = in.x.data_ptr<T>();
      T* bp = buf.data_ptr<T>();
      for (int64_t r = 0; r < u.rows; ++r) std::memcpy(bp + r * in.m, xp + ids[r] * in.m, in.m * sizeof(T));
      X = buf.narrow(0, 0, u.rows);
    }
    if (in.xx.defined()) {
      const T* xxp = in.xx.data_ptr<T>();
      for (int64_t r = 0; r < u.rows; ++r) xx[r] = xxp[ids[r]];
    } else {
      row_sqnorms(X.data_ptr<T>(), u.rows, in.m, xx.data());
    }
  }
};

// dots = X @ Y^T for a [rows, cols] tile, written into the front of a flat buffer.
inline at::Tensor gemm_tile(at::Tensor& buf, const at::Tensor& X, const at::Tensor& Y) {
  const int64_t need = X.size(0) * Y.size(0);
  if (!buf.defined() || buf.numel() < need) buf = at::empty({std::max<int64_t>(need, kRowBlock * kColBlock)}, X.options());
  at::Tensor g = buf.narrow(0, 0, need).view({X.size(0), Y.size(0)});
  at::mm_out(g, X, Y.t());
  return g;
}

// In place over a [rows, cols] tile of dots: g <- log_q_j - alpha d (the score), and rmax[r] = max_j.
// With `dist`, also stores d (needed for the euclidean gradient).
template <typename T>
void scores_tile(T* g, int64_t rows, int64_t cols, const T* xx, const T* yy, const T* lq, T alpha,
                 Metric metric, T* rmax, T* dist = nullptr) {
  const bool euclid = metric == Metric::Euclidean;
  for (int64_t r = 0; r < rows; ++r) {
    T* gr = g + r * cols;
    const T xr = xx[r];
    T mx = -std::numeric_limits<T>::infinity();
    if (dist) {
      T* dr = dist + r * cols;
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < cols; ++j) {
        const T d = ccluster::distance(xr, yy[j], gr[j], euclid);
        dr[j] = d;
        gr[j] = lq[j] - alpha * d;
        mx = std::max(mx, gr[j]);
      }
    } else {
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < cols; ++j) {
        gr[j] = lq[j] - alpha * ccluster::distance(xr, yy[j], gr[j], euclid);
        mx = std::max(mx, gr[j]);
      }
    }
    rmax[r] = mx;
  }
}

// d(score)/d(x) = -alpha * kappa * (x - y) (csrc/numerics.h)
template <typename T>
inline T kappa(T d, Metric metric) {
  return ccluster::kappa(d, metric == Metric::Euclidean);
}

// Runs fn over [0, count) in parallel; fn(begin, end) is called once per worker with its range.
template <typename F>
void parallel_units(int64_t count, const F& fn) {
  if (count == 0) return;
  at::parallel_for(0, count, 1, fn);
}

}  // namespace cpu
}  // namespace ccluster
