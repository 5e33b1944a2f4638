// The small fused kernels of the library-GEMM path (csrc/library/library_path.cpp): everything between
// and after the GEMMs that plain PyTorch would do in several passes over memory. Each has a CPU
// implementation (epilogue_cpu.cpp), so the whole path runs and is tested on CPU, and a CUDA one
// (csrc/cuda/epilogue_kernels.cu) that registers itself at load time. Their scalar numerics are those of
// csrc/numerics.h, shared with every other kernel.
//
// Vocabulary. The GEMM of a piece of work writes S [nb * rows, g * k] (accumulation type T, float or
// double): nb blocks of `rows` slots each. Slot i = b * rows + r of block b holds the x row
//   row(i) = row_ids[b * ld + r0 + r]   (packed plan: the class's rows, -1 for padding), or
//   row(i) = r0 + i                      (dense plan: consecutive rows; nb = 1)
// and its columns h * k + j are the class class(b) + h (h < g; class(b) = block_class[b], or c0) and its
// exemplar slots j0 .. j0 + k. A slot whose row is -1 (padding) or whose (row, class) is outside `mask`
// is inactive. S holds either
//   folded: log q - alpha |y|^2 + 2 alpha x.y   (sqeuclidean only; the bias and scale went into the GEMM)
//   raw:    x.y
// and the epilogue adds the rest: with xx = |x|^2, yy = |y|^2 (norms of the values the GEMM saw),
//   t = -alpha d,  d = max(xx + yy - 2 x.y, 0) (sqeuclidean) or its square root (euclidean),
//   s = log q + t  (folded: s = min(S - alpha xx, log q), the same clamp d >= 0).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "library/slots.h"

namespace ccluster {
namespace library {

enum class RowMode : int {
  Lse = 0,   // logz[s, c] = logsumexp_j s_j over this piece, merged with the earlier pieces (first: overwrite)
  LseW = 1,  // complete rows: logz as Lse, then S <- W = kappa * coef * exp(s - logz), rowsum += sum_j W
  W = 2,     // logz given: S <- W = kappa * coef * exp(s - logz), rowsum += sum_j W (and P when P defined)
  Fit = 3,   // complete rows: logz as Lse, then S <- t + log coef - logz (the terms of log eta)
  Eta = 4,   // logz given: S <- t + log coef - logz
};

// Where the slots of a piece come from (see the vocabulary above).
struct Slots {
  int64_t nb = 1, rows = 0;   // blocks, slots per block
  at::Tensor row_ids;         // int64 [nb, ld] (packed) or undefined (dense: r0 + i)
  int64_t ld = 0, r0 = 0;
  at::Tensor block_class;     // int64 [nb] (packed) or undefined (c0)
  int64_t c0 = 0;
  int64_t count() const { return nb * rows; }
};

struct RowArgs {
  at::Tensor S;           // [slots, g * k] T, rewritten in place by every mode but Lse
  at::Tensor xx;          // [slots] T
  Slots sl;
  int64_t g = 1, k = 0, j0 = 0;
  at::Tensor yy, lq;      // [C, n] T, contiguous
  int64_t C = 0, n = 0;
  double alpha = 1.0;
  bool euclid = false, folded = false;
  RowMode mode = RowMode::Lse;
  at::Tensor mask;        // [N, C] bool (contiguous) or undefined: every (row, class) of an active slot
  at::Tensor logz;        // [N, C] T: written (Lse, LseW, Fit) or read (W, Eta)
  bool first = true;      // Lse: the first piece of these (row, class) pairs
  at::Tensor coef;        // [N, C] T: the gradient weight (W, LseW) or the fit weight w (Fit, Eta)
  at::Tensor rowsum;      // [N, C] T: += sum_j W (W, LseW)
  at::Tensor P;           // [slots, g * k] T or undefined: W mode also writes P = coef * exp(s - logz)
};

// Column reduction over the slots of each block: acc[class(b) + h, j0 + j] += sum over the block's slots
// of S[., h * k + j] (Sum), or the column log-sum-exp state (acc = running max, acc2 = sum relative to
// it) absorbs them (Lse). Inactive slots must hold 0 (Sum) or -inf (Lse) in S: the row epilogue writes
// them so. Each (block, column) is reduced by one worker in a fixed order: deterministic.
struct ColArgs {
  at::Tensor S;         // [slots, g * k] T
  Slots sl;
  int64_t g = 1, k = 0, j0 = 0, n = 0;
  bool lse = false;
  at::Tensor acc, acc2;  // [C, n] T
};

// out[i] = src[row(i)] - mu, rounded to out's dtype; xx[i] = |out[i]|^2 in T (of the rounded values).
// Without mu nothing is subtracted; without out only the norms are computed. A slot whose row is -1, or
// whose row's keep[row] is false (dense), or whose pair (row, class(b)) is outside mask (packed), is
// written as zeros (norm 0) without reading src.
struct GatherArgs {
  at::Tensor src;        // [R, m], any floating dtype and strides
  Slots sl;              // rows of src (here row(i) indexes src's rows)
  at::Tensor mu;         // [m] T or undefined
  at::Tensor out;        // [slots, m] contiguous, or undefined
  at::ScalarType round_to = at::kFloat;  // without out: the dtype the norms' values are rounded to
  at::Tensor xx;         // [slots] T
  at::Tensor keep;       // [R] bool or undefined
  at::Tensor mask;       // [R, C] bool (contiguous) or undefined
  int64_t C = 0;
};

// dst[r] += scale * w[r] * src[r] for every row r whose weight w[r] is nonzero. A row whose weight is 0
// is left as it is, whatever src holds there (0 * NaN would be NaN).
struct RowTermArgs {
  at::Tensor dst;        // [R, m] T, contiguous
  at::Tensor src;        // [R, m], any floating dtype and strides
  at::Tensor w;          // [R] T, contiguous
  double scale = 1.0;
};

// dst[row] += scale * sum of the src slots of this piece that belong to row, in class order, with no
// atomics. The packed layout lists, for each x row, its positions p = a * Rmax + i (class a, i-th row of
// that class) in class order: run u of equal rows is entries run_begin[u] .. run_begin[u + 1] of
// (sorted_rows, order). Position p is in this piece when r0 <= i < r0 + rows; its slot is
// a * rows + i - r0.
struct ScatterArgs {
  at::Tensor dst;                             // [N, m] T
  at::Tensor src;                             // [nb * rows, m] T
  int64_t Rmax = 0, r0 = 0, rows = 0;
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

inline SlotsView slots_view(const Slots& s) {
  return SlotsView{std::max<int64_t>(s.rows, 1), s.ld, s.r0, s.c0,
                   s.row_ids.defined() ? s.row_ids.data_ptr<int64_t>() : nullptr,
                   s.block_class.defined() ? s.block_class.data_ptr<int64_t>() : nullptr};
}

const Epilogues& cpu_epilogues();
// Called once by the CUDA translation unit's static initialiser.
void register_cuda_epilogues(const Epilogues* table);
// The table for a device; a clear error when the library was built without CUDA epilogues.
const Epilogues& epilogues_for(const at::Device& device, const char* op);
bool has_cuda_epilogues();

}  // namespace library
}  // namespace ccluster
