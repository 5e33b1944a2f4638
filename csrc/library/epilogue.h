// The small fused kernels of the library-GEMM path (csrc/library/library_path.cpp): everything between
// and after the GEMMs that plain PyTorch would do in several passes over memory. Each has a CPU
// implementation (epilogue_cpu.cpp), so the whole path runs and is tested on CPU, and a CUDA one
// (csrc/cuda/epilogue_kernels.cu) that registers itself at load time.
//
// Vocabulary. The GEMM of a piece of work writes S [rows, g * k] (accumulation type T, float or double):
// row i is the x row row_id(i) (= row_ids[i], or r0 + i) against the classes class_of(i) + h (h < g;
// class_of(i) = row_class[i], or c0) and their exemplar slots j0 .. j0 + k. S holds either
//   folded: log q - alpha |y|^2 + 2 alpha x.y   (sqeuclidean only; the bias and scale went into the GEMM)
//   raw:    x.y
// and the epilogue adds the rest: with xx = |x|^2, yy = |y|^2 (norms of the values the GEMM saw),
//   t = -alpha d,  d = max(xx + yy - 2 x.y, 0) (sqeuclidean) or its square root (euclidean),
//   s = log q + t  (folded: s = min(S - alpha xx, log q), the same clamp d >= 0).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ccluster {
namespace library {

enum class RowMode : int {
  Lse = 0,   // logz[s, c] = logsumexp_j s_j over this piece, merged with the earlier pieces (first: overwrite)
  LseW = 1,  // complete rows: logz as Lse, then S <- W = kappa * coef * exp(s - logz), rowsum += sum_j W
  W = 2,     // logz given: S <- W = kappa * coef * exp(s - logz), rowsum += sum_j W (and P when P defined)
  Fit = 3,   // complete rows: logz as Lse, then S <- t + log coef - logz (the terms of log eta)
  Eta = 4,   // logz given: S <- t + log coef - logz
};

struct RowArgs {
  at::Tensor S;           // [rows, g * k] T, rewritten in place by every mode but Lse
  at::Tensor xx;          // [rows] T
  at::Tensor row_ids;     // int64 [rows] or undefined: r0 + i
  int64_t r0 = 0;
  at::Tensor row_class;   // int64 [rows] or undefined: c0
  int64_t c0 = 0, g = 1, k = 0, j0 = 0, rows = 0;
  at::Tensor yy, lq;      // [C, n] T, contiguous
  int64_t C = 0, n = 0;
  double alpha = 1.0;
  bool euclid = false, folded = false;
  RowMode mode = RowMode::Lse;
  at::Tensor mask;        // [N, C] bool (contiguous) or undefined: every (row, class) of the piece is active
  at::Tensor logz;        // [N, C] T: written (Lse, LseW, Fit) or read (W, Eta)
  bool first = true;      // Lse: the first piece of these (row, class) pairs
  at::Tensor coef;        // [N, C] T: the gradient weight (W, LseW) or the fit weight w (Fit, Eta)
  at::Tensor rowsum;      // [N, C] T: += sum_j W (W, LseW)
  at::Tensor P;           // [rows, g * k] T or undefined: W mode also writes P = coef * exp(s - logz)
};

// Column reduction over the segments of a piece: segment (a, len, c) is rows [a, a + len) of S, whose
// column h * k + j belongs to class c + h, slot j0 + j. Sum: acc[c, j] += sum over the rows. Lse: the
// column log-sum-exp state (acc = running max, acc2 = sum relative to it) absorbs the rows. Each
// (class, slot) is reduced by one thread block in a fixed order: deterministic.
struct ColArgs {
  at::Tensor S;         // [rows, g * k] T
  int64_t g = 1, k = 0, j0 = 0, n = 0;
  at::Tensor seg;       // int64 [nseg, 3] (a, len, c) on S's device, or undefined: one segment (0, rows, c0)
  int64_t nseg = 1, rows = 0, c0 = 0;
  bool lse = false;
  at::Tensor acc, acc2;  // [C, n] T
};

// out[i] = src[row(i)] - mu[class(i)], rounded to out's dtype; xx[i] = |out[i]|^2 in T (of the rounded
// values). row(i) = row_ids[i] or r0 + i; class(i) = row_class[i], or (r0 + i) / class_div when
// class_div > 0, or c0; without mu nothing is subtracted. Without out only the norms are computed.
// With keep, a row whose keep[row(i)] is false is written as zeros (norm 0) without reading src.
struct GatherArgs {
  at::Tensor src;        // [R, m], any floating dtype and strides
  at::Tensor row_ids;    // int64 [rows] or undefined
  int64_t r0 = 0, rows = 0;
  at::Tensor row_class;  // int64 [rows] or undefined
  int64_t c0 = 0, class_div = 0;
  at::Tensor mu;         // [C, m] T or undefined
  at::Tensor out;        // [rows, m] contiguous, or undefined
  at::ScalarType round_to = at::kFloat;  // without out: the dtype the norms' values are rounded to
  at::Tensor xx;         // [rows] T
  at::Tensor keep;       // [R] bool (indexed by row(i)) or undefined: every row is read
};

// dst[r] += scale * w[r] * src[r] for every row r whose weight w[r] is nonzero. A row whose weight is 0
// is left as it is, whatever src holds there (0 * NaN would be NaN).
struct RowTermArgs {
  at::Tensor dst;        // [R, m] T, contiguous
  at::Tensor src;        // [R, m], any floating dtype and strides
  at::Tensor w;          // [R] T, contiguous
  double scale = 1.0;
};

// dst[row] += scale * sum of the src rows of this piece that belong to row, in packed order (= class
// order), with no atomics: the packed positions are listed in row-major order by (sorted_rows, order), a
// stable sort of the packed row ids, whose runs of equal rows start at run_begin (U + 1 entries). Only
// the positions p0 .. p0 + rows (this piece's rows of src) are taken.
struct ScatterArgs {
  at::Tensor dst;                             // [N, m] T
  at::Tensor src;                             // [rows, m] T
  int64_t p0 = 0, rows = 0;
  at::Tensor sorted_rows, order, run_begin;   // int64 [P], [P], [U + 1]
  double scale = 1.0;
};

struct Epilogues {
  void (*gather)(const GatherArgs&);
  void (*rows)(const RowArgs&);
  void (*cols)(const ColArgs&);
  void (*scatter)(const ScatterArgs&);
  void (*row_terms)(const RowTermArgs&);
  bool (*capturing)();  // true while the current stream is being captured into a CUDA graph
};

const Epilogues& cpu_epilogues();
// Called once by the CUDA translation unit's static initialiser.
void register_cuda_epilogues(const Epilogues* table);
// The table for a device; a clear error when the library was built without CUDA epilogues.
const Epilogues& epilogues_for(const at::Device& device, const char* op);

}  // namespace library
}  // namespace ccluster
