// The library-GEMM path (library_path.h): rows in chunks, per chunk ONE distance GEMM from the BLAS
// library into a bounded workspace, then a small fused epilogue (epilogue.h).
//
// Work layout (the plans of library/plan.h):
//   dense   chunks of consecutive rows of x, each against every class at once (one GEMM
//           X [rows, m] . Y [C n, m]^T; a smaller group of classes when the workspace does not hold
//           all). Pairs, when given, only mask the epilogue. Shapes never depend on the data.
//   packed  the pairs only, laid out on the host (no device read when the caller's pair mask is on the
//           CPU): each active class's rows, ascending, padded to the largest class's count Rmax. A chunk
//           takes rows r0 .. r0 + rows of every class at once and computes them in ONE batched GEMM
//           (bmm over the active classes: X [Ca, rows, m] . Y [Ca, k, m]^T).
// When the exemplars are too many for a chunk (n slots x the rows the workspace holds), the slots are
// taken in column chunks too, and the forward's log-sum-exp is merged across them.
//
// GEMM precision. float64 and float32 run as they are: float32 is exact SGEMM unless torch's own switch
// (torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision) lets cuBLAS use TF32.
// float16/bfloat16 operands go to tensor cores with float32 accumulation and float32 output
// (mm/bmm with out_dtype); on CPU, where ATen has no such GEMM, they are computed in float32 from the same
// rounded values. Centring (settings: auto = only when the GEMM rounds its float32 operands to TF32;
// on; off) subtracts one mean mu, of the database's filled exemplars, from x and from the exemplars
// before the GEMM: the distances are unchanged, the rounding error alpha eps |x| |y| of a
// reduced-precision GEMM shrinks to alpha eps |x - mu| |y - mu|, and the GEMM still takes every class
// at once. Norms, scores, logz and every reduction stay in float32 (float64).
//
// The sqeuclidean score is folded into the GEMM where ATen offers it (float32/float64 addmm/baddbmm):
// S = addmm(log q - alpha |y|^2, X, Y^T, alpha = 2 alpha), so the epilogue only subtracts alpha |x|^2
// and clamps at log q (d >= 0). Otherwise (euclidean, 16-bit operands, the fit) the GEMM gives x.y and
// the epilogue forms d from the norms.
//
// Memory: the workspace bound (settings.workspace_bytes, 256 MiB by default) caps the chunk buffers;
// besides them and the outputs an op holds O(N C + C n + C m) (logz, row sums, column sums) and, packed,
// the layout (Ca Rmax + 3 P integers). Every reduction runs in a fixed order, so results do not depend
// on scheduling (cuBLAS as configured by torch; with torch.use_deterministic_algorithms it asks for
// CUBLAS_WORKSPACE_CONFIG itself). No step reads device data on the host.
#include "library/library_path.h"

#include <ATen/Context.h>

#include <algorithm>
#include <array>
#include <limits>
#include <vector>

#include "library/epilogue.h"
#include "library/settings.h"

namespace ccluster {
namespace library {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kMinChunkRows = 16;  // fewer rows than this per chunk: take the slots in column chunks

inline bool is16(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }
inline at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A host tensor on `device`: itself on the CPU, else one asynchronous copy from pinned memory (the
// caching host allocator keeps the pinned block until the copy has run).
at::Tensor to_device(const at::Tensor& host, const at::Device& device) {
  if (device.is_cpu()) return host;
  return host.pin_memory().to(device, /*non_blocking=*/true);
}

// One GEMM output chunk and what its epilogue and the gradient GEMMs need.
struct Piece {
  at::Tensor S;                 // [slots, g k] T
  Slots sl;
  int64_t g = 1, k = 0, j0 = 0;
  at::Tensor X;                 // [slots, m] the GEMM's row operand
  at::Tensor xx;                // [slots] T
  at::Tensor Y;                 // dense: [g k, m]; packed: [Ca, k, m] the exemplar operand
};

struct ChunkPlan {
  int64_t rows = 1, g = 1, k = 1;
};

// Per-piece buffer needs of an op, beyond S, the gathered rows and their norms.
struct Extra {
  int64_t per_ld = 0;    // bytes per slot and per column of S (a low-precision copy of W, P)
  int64_t per_row = 0;   // bytes per slot (a [slots, m] buffer)
  int64_t per_col = 0;   // bytes per column of S and per block, once (a [k, m] buffer per block)
};

class Engine {
 public:
  // layout: the pairs that are laid out (packed; a superset of mask is allowed); mask: the pairs the
  // epilogues treat as active (undefined: all).
  Engine(const char* op, const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q, double alpha,
         Metric metric, const PairMask& layout, const at::Tensor& mask_, Plan plan, bool allow_fold,
         bool need_scatter)
      : op_(op), x_(x), db_(db), alpha_(alpha), euclid_(metric == Metric::Euclidean), mask(mask_) {
    N = x.size(0), C = db.size(0), n = db.size(1), m = db.size(2);
    G = x.scalar_type();
    T = acc_of(G);
    ep_ = &epilogues_for(x.device(), op);
    ws_ = settings().workspace_bytes.load();
    const auto cmode = static_cast<Centring>(settings().centring.load());
    centre = cmode == Centring::On ||
             (cmode == Centring::Auto && G == at::kFloat && x.is_cuda() && at::globalContext().allowTF32CuBLAS());
    fold = allow_fold && !euclid_ && !is16(G);
    lq = log_q.to(T).contiguous();
    direct_x_ = !centre && x.is_contiguous();
    direct_y_ = !centre && db.is_contiguous();
    Yall_ = db.reshape({C * n, m});
    if (mask.defined()) mask = mask.contiguous();
    if (centre && C * n > 0) {
      // one mean for the whole database, of its filled exemplars (finite values only: a NaN in one
      // exemplar reaches its own distances, not every class's through mu)
      const at::Tensor Y = Yall_.to(T);
      const at::Tensor filled = at::isfinite(lq).reshape({C * n}).to(T);
      mu = at::mv(at::where(at::isfinite(Y), Y, at::zeros({}, Y.options())).t(), filled)
               .div_(filled.sum().clamp_min(1.0));
    }
    yy = at::empty({C, n}, x.options().dtype(T));
    if (C * n > 0) {
      GatherArgs ga;
      ga.src = Yall_;
      ga.sl.rows = C * n;
      if (centre) ga.mu = mu;
      ga.round_to = G;
      ga.xx = yy.view({C * n});
      ep_->gather(ga);
    }
    if (fold) bias = lq - alpha * yy;
    packed = plan == Plan::Packed && layout.defined();
    if (packed) build_layout(layout, need_scatter);
  }

  // ----------------------------------------------------------------------------------------------
  // Planning

  int64_t blocks() const { return packed ? Ca : 1; }
  int64_t total_rows() const { return packed ? Rmax : N; }
  bool direct_y_plan() const { return direct_y_ && (!packed || Ca == C); }

  ChunkPlan plan(const Extra& ex) const {
    const int64_t tsz = at::elementSize(T), gsz = at::elementSize(G);
    const int64_t nb = blocks();
    const int64_t total = std::max<int64_t>(total_rows(), 1);
    const bool copy_x = packed || !direct_x_;
    auto row_bytes = [&](int64_t ld) {
      return nb * (ld * (tsz + ex.per_ld) + (copy_x ? m * gsz : 0) + tsz + ex.per_row);
    };
    auto fixed_bytes = [&](int64_t ld) { return nb * ((direct_y_plan() ? 0 : ld * m * gsz) + ld * ex.per_col); };
    auto fit = [&](int64_t ld) {
      const int64_t avail = ws_ - fixed_bytes(ld);
      return avail > 0 ? avail / std::max<int64_t>(row_bytes(ld), 1) : 0;
    };
    const int64_t want = std::min(total, kMinChunkRows);
    const int64_t max_g = packed ? 1 : std::max<int64_t>(C, 1);
    ChunkPlan p;
    const int64_t nn = std::max<int64_t>(n, 1);
    for (int64_t g = max_g;; g /= 2) {  // whole classes: as many per GEMM as the workspace holds
      const int64_t r = fit(g * nn);
      if (r >= want) {
        p.g = g, p.k = nn, p.rows = std::min(total, r);
        return p;
      }
      if (g == 1) break;
    }
    for (int64_t k = (nn + 1) / 2;; k = (k + 1) / 2) {  // one class, its slots in column chunks
      const int64_t r = fit(k);
      if (r >= want || k == 1) {
        p.g = 1, p.k = k, p.rows = std::min(total, std::max<int64_t>(r, 1));
        return p;
      }
    }
    return p;
  }

  // ----------------------------------------------------------------------------------------------
  // GEMMs

  // out (T) = A . B for operands of one dtype (2-D, or 3-D batched): 16-bit operands with float32
  // accumulation and output.
  void mm_into(at::Tensor out, const at::Tensor& A, const at::Tensor& B) const {
    const bool batched = A.dim() == 3;
    if (is16(A.scalar_type())) {
      if (A.is_cuda()) {
        batched ? at::bmm_out(out, A, B, T) : at::mm_out(out, A, B, T);
      } else {  // no mixed-precision GEMM on CPU: the same rounded values, computed in float32
        batched ? at::bmm_out(out, A.to(T), B.to(T)) : at::mm_out(out, A.to(T), B.to(T));
      }
    } else {
      batched ? at::bmm_out(out, A, B) : at::mm_out(out, A, B);
    }
  }

  // The distance GEMM of a piece: S = X . Y^T, or the folded scores bias + 2 alpha X . Y^T.
  void distance_gemm(const Piece& pc) const {
    if (!packed) {
      if (fold) {
        const at::Tensor b = pc.g > 1 ? bias.narrow(0, pc.sl.c0, pc.g).reshape({pc.g * n})
                                      : bias[pc.sl.c0].narrow(0, pc.j0, pc.k);
        at::Tensor S = pc.S;
        at::addmm_out(S, b.unsqueeze(0), pc.X, pc.Y.t(), 1.0, 2.0 * alpha_);
      } else {
        mm_into(pc.S, pc.X, pc.Y.t());
      }
      return;
    }
    const int64_t rows = pc.sl.rows;
    at::Tensor S3 = pc.S.view({Ca, rows, pc.k});
    const at::Tensor X3 = pc.X.view({Ca, rows, m});
    if (fold) {
      at::baddbmm_out(S3, biasA.narrow(1, pc.j0, pc.k).unsqueeze(1), X3,
                      pc.Y.transpose(1, 2), 1.0, 2.0 * alpha_);
    } else {
      mm_into(S3, X3, pc.Y.transpose(1, 2));
    }
  }

  // ----------------------------------------------------------------------------------------------
  // Iteration over the pieces of work

  template <typename F>
  void for_each_piece(const ChunkPlan& pl, const F& fn) {
    if (total_rows() == 0 || C == 0 || n == 0 || blocks() == 0) return;
    const auto topt = x_.options().dtype(T), gopt = x_.options().dtype(G);
    const int64_t nb = blocks();
    at::Tensor Sbuf = at::empty({nb * pl.rows * pl.g * pl.k}, topt);
    at::Tensor xxbuf = at::empty({nb * pl.rows}, topt);
    at::Tensor Xbuf = (packed || !direct_x_) ? at::empty({nb * pl.rows, m}, gopt) : at::Tensor();
    at::Tensor Ybuf = direct_y_plan() ? at::Tensor() : at::empty({nb * pl.g * pl.k, m}, gopt);
    y_key_ = {-1, -1, -1, -1};
    if (packed) {
      packed_pieces(pl, Sbuf, xxbuf, Xbuf, Ybuf, fn);
    } else {
      dense_pieces(pl, Sbuf, xxbuf, Xbuf, Ybuf, fn);
    }
  }

  // ----------------------------------------------------------------------------------------------
  // Helpers for the ops

  RowArgs row_args(const Piece& pc, RowMode mode) const {
    RowArgs a;
    a.S = pc.S;
    a.xx = pc.xx;
    a.sl = pc.sl;
    a.g = pc.g, a.k = pc.k, a.j0 = pc.j0;
    a.yy = yy, a.lq = lq;
    a.C = C, a.n = n;
    a.alpha = alpha_;
    a.euclid = euclid_;
    a.folded = fold;
    a.mode = mode;
    a.mask = mask;
    return a;
  }

  ColArgs col_args(const Piece& pc, const at::Tensor& S) const {
    ColArgs a;
    a.S = S;
    a.sl = pc.sl;
    a.g = pc.g, a.k = pc.k, a.j0 = pc.j0, a.n = n;
    return a;
  }

  // The exemplar rows of class c as the GEMM saw them (centred), in T: for the colsum(W) y terms.
  at::Tensor y_centred(int64_t c) const {
    const at::Tensor y = db_[c].to(T);  // may be db itself: never modified in place
    return centre ? y.sub(mu) : y;
  }

  // gx += alpha (acc - rowsum (x - mu)) given acc already in gx: the row terms. x is read only on rows
  // with a nonzero rowsum: a row outside the active pairs has none and keeps exactly 0 gradient,
  // whatever it holds (0 * NaN would be NaN).
  void finish_rows(at::Tensor& gx, const at::Tensor& RW, double scale) const {
    RowTermArgs ra;
    ra.dst = gx;
    ra.src = x_;
    ra.w = RW.sum(1);
    ra.scale = -scale;
    ep_->row_terms(ra);
    if (centre) gx.addr_(ra.w, mu, 1.0, scale);
  }

  // Dense plan with pairs: the gradient GEMM W^T X reads every row of a chunk, and 0 * NaN is NaN, so
  // the rows without an active pair are gathered as zeros (into the workspace: a copy of the chunk
  // instead of a view of x). The packed plan gathers only the active pairs anyway.
  void zero_inactive_rows() {
    if (packed || !mask.defined()) return;
    keep_rows_ = mask.any(1);
    direct_x_ = false;
  }

  const char* op_;
  at::Tensor x_, db_, Yall_;
  double alpha_;
  bool euclid_;
  int64_t N = 0, C = 0, n = 0, m = 0;
  at::ScalarType T, G;
  bool centre = false, fold = false;
  at::Tensor lq, mu, yy, bias;
  const Epilogues* ep_;
  int64_t ws_ = 0;
  bool direct_x_ = false, direct_y_ = false;
  at::Tensor mask;                       // active pairs [N, C] bool, or undefined (all)
  at::Tensor keep_rows_;                 // dense: [N] bool, rows gathered (the others as zeros)
  bool packed = false;
  // packed layout (on x's device)
  int64_t Ca = 0, Rmax = 0, P = 0;
  at::Tensor cls;                        // [Ca] active classes
  at::Tensor prow;                       // [Ca, Rmax] their rows, -1 padding
  at::Tensor yrow;                       // [Ca, n] rows of Yall of their exemplars
  at::Tensor biasA;                      // [Ca, n] fold bias of the active classes
  at::Tensor sorted_rows, order, run_begin;  // the scatter lists of dL/dx (need_scatter)

 private:
  void build_layout(const PairMask& layout, bool need_scatter) {
    at::Tensor host = layout.host;
    if (!host.defined()) {  // a packed plan forced with the mask on the device: one synchronisation
      settings().host_syncs.fetch_add(1);
      host = layout.dev.to(at::kCPU);
    }
    host = host.contiguous();
    const PairCounts pc = layout.counts.known ? layout.counts : count_pairs(host);
    Ca = static_cast<int64_t>(pc.cls.size());
    Rmax = pc.Rmax;
    P = pc.P;
    std::vector<int64_t> index(C, -1), fill(Ca, 0);
    for (int64_t a = 0; a < Ca; ++a) index[pc.cls[a]] = a;
    std::vector<int64_t> buf(Ca + Ca * Rmax, -1);
    std::copy(pc.cls.begin(), pc.cls.end(), buf.begin());
    int64_t* pr = buf.data() + Ca;
    std::vector<int64_t> srows, ord, rbeg;
    if (need_scatter) {
      srows.reserve(P);
      ord.reserve(P);
    }
    const bool* mp = host.data_ptr<bool>();
    for (int64_t s = 0; s < N; ++s) {
      bool first = true;
      for (int64_t c = 0; c < C; ++c) {
        if (!mp[s * C + c]) continue;
        const int64_t a = index[c];
        const int64_t i = fill[a]++;
        pr[a * Rmax + i] = s;
        if (!need_scatter) continue;
        if (first) rbeg.push_back(static_cast<int64_t>(srows.size()));
        first = false;
        srows.push_back(s);
        ord.push_back(a * Rmax + i);  // the row's positions, in class order
      }
    }
    if (need_scatter) {
      rbeg.push_back(static_cast<int64_t>(srows.size()));
      buf.insert(buf.end(), srows.begin(), srows.end());
      buf.insert(buf.end(), ord.begin(), ord.end());
      buf.insert(buf.end(), rbeg.begin(), rbeg.end());
    }
    const at::Tensor all = to_device(at::tensor(buf, at::TensorOptions().dtype(at::kLong)), x_.device());
    cls = all.narrow(0, 0, Ca);
    prow = all.narrow(0, Ca, Ca * Rmax).view({Ca, Rmax});
    if (need_scatter) {
      int64_t o = Ca + Ca * Rmax;
      sorted_rows = all.narrow(0, o, P);
      order = all.narrow(0, o + P, P);
      run_begin = all.narrow(0, o + 2 * P, static_cast<int64_t>(rbeg.size()));
    }
    const auto lopt = x_.options().dtype(at::kLong);
    yrow = cls.unsqueeze(1).mul(n).add(at::arange(n, lopt).unsqueeze(0));
    if (fold) biasA = Ca == C ? bias : bias.index_select(0, cls);
  }

  // Exemplar operand of a piece; rebuilt only when the piece's (classes, slots) change.
  at::Tensor y_operand(int64_t c0, int64_t g, int64_t j0, int64_t k, at::Tensor& Ybuf) {
    if (direct_y_plan()) {
      if (packed) return db_.narrow(1, j0, k);
      return g > 1 ? Yall_.narrow(0, c0 * n, g * n) : db_[c0].narrow(0, j0, k);
    }
    const int64_t nb = blocks();
    at::Tensor Y = Ybuf.narrow(0, 0, nb * g * k);
    const std::array<int64_t, 4> key{c0, g, j0, k};
    if (key != y_key_) {
      GatherArgs ga;
      ga.src = Yall_;
      if (packed) {
        ga.sl.nb = Ca, ga.sl.rows = k, ga.sl.row_ids = yrow, ga.sl.ld = n, ga.sl.r0 = j0;
      } else {
        ga.sl.rows = g * k, ga.sl.r0 = c0 * n + j0;
      }
      if (centre) ga.mu = mu;
      ga.out = Y;
      ga.xx = at::empty({nb * g * k}, x_.options().dtype(T));
      ep_->gather(ga);
      y_key_ = key;
    }
    return packed ? Y.view({Ca, k, m}) : Y;
  }

  template <typename F>
  void dense_pieces(const ChunkPlan& pl, at::Tensor& Sbuf, at::Tensor& xxbuf, at::Tensor& Xbuf, at::Tensor& Ybuf,
                    const F& fn) {
    for (int64_t r0 = 0; r0 < N; r0 += pl.rows) {
      const int64_t rows = std::min(pl.rows, N - r0);
      Piece pc;
      pc.sl.rows = rows;
      pc.sl.r0 = r0;
      pc.xx = xxbuf.narrow(0, 0, rows);
      GatherArgs ga;
      ga.src = x_;
      ga.sl = pc.sl;
      ga.xx = pc.xx;
      ga.round_to = G;
      ga.keep = keep_rows_;
      if (centre) ga.mu = mu;
      if (direct_x_) {
        pc.X = x_.narrow(0, r0, rows);
      } else {
        pc.X = Xbuf.narrow(0, 0, rows);
        ga.out = pc.X;
      }
      ep_->gather(ga);
      for (int64_t c0 = 0; c0 < C; c0 += pl.g) {
        const int64_t g = std::min(pl.g, C - c0);
        for (int64_t j0 = 0; j0 < n; j0 += pl.k) {
          const int64_t k = std::min(pl.k, n - j0);
          pc.g = g, pc.k = k, pc.j0 = j0, pc.sl.c0 = c0;
          pc.S = Sbuf.narrow(0, 0, rows * g * k).view({rows, g * k});
          pc.Y = y_operand(c0, g, j0, k, Ybuf);
          distance_gemm(pc);
          settings().pieces.fetch_add(1);
          fn(pc);
        }
      }
    }
  }

  template <typename F>
  void packed_pieces(const ChunkPlan& pl, at::Tensor& Sbuf, at::Tensor& xxbuf, at::Tensor& Xbuf, at::Tensor& Ybuf,
                     const F& fn) {
    for (int64_t r0 = 0; r0 < Rmax; r0 += pl.rows) {
      const int64_t rows = std::min(pl.rows, Rmax - r0);
      Piece pc;
      pc.sl.nb = Ca, pc.sl.rows = rows, pc.sl.row_ids = prow, pc.sl.ld = Rmax, pc.sl.r0 = r0;
      pc.sl.block_class = cls;
      const int64_t slots = Ca * rows;
      pc.X = Xbuf.narrow(0, 0, slots);
      pc.xx = xxbuf.narrow(0, 0, slots);
      GatherArgs ga;
      ga.src = x_;
      ga.sl = pc.sl;
      if (centre) ga.mu = mu;
      ga.out = pc.X;
      ga.xx = pc.xx;
      ga.mask = mask;
      ga.C = C;
      ep_->gather(ga);
      for (int64_t j0 = 0; j0 < n; j0 += pl.k) {
        const int64_t k = std::min(pl.k, n - j0);
        pc.g = 1, pc.k = k, pc.j0 = j0;
        pc.S = Sbuf.narrow(0, 0, slots * k).view({slots, k});
        pc.Y = y_operand(0, 1, j0, k, Ybuf);
        distance_gemm(pc);
        settings().pieces.fetch_add(1);
        fn(pc);
      }
    }
  }

  std::array<int64_t, 4> y_key_{-1, -1, -1, -1};
};

// The gradient GEMMs of one piece whose S now holds W (T): gx += alpha W Y (rows of x),
// gdb += alpha W^T X. Packed: gdb is accumulated per active class (gdbA) and copied into place at the end.
struct GradGemms {
  Engine& E;
  at::Tensor gx, gdb, gdbA;  // T, or undefined
  at::Tensor Wbuf;           // G copy of W when G != T
  at::Tensor dXbuf;          // [slots, m] T: packed rows of W Y, or the 16-bit product
  at::Tensor dYbuf;          // [nb g k, m] T: the 16-bit W^T X product

  GradGemms(Engine& e, const ChunkPlan& pl, at::Tensor gx_, at::Tensor gdb_)
      : E(e), gx(std::move(gx_)), gdb(std::move(gdb_)) {
    const auto topt = E.x_.options().dtype(E.T);
    const int64_t nb = E.blocks();
    if (E.G != E.T) Wbuf = at::empty({nb * pl.rows * pl.g * pl.k}, E.x_.options().dtype(E.G));
    if (gx.defined() && (E.packed || E.G != E.T)) dXbuf = at::empty({nb * pl.rows, E.m}, topt);
    if (gdb.defined() && E.G != E.T) dYbuf = at::empty({nb * pl.g * pl.k, E.m}, topt);
    if (gdb.defined()) gdbA = (!E.packed || E.Ca == E.C) ? gdb : at::zeros({E.Ca, E.n, E.m}, topt);
  }

  static Extra extra(const Engine& E, bool need_x, bool need_db) {
    Extra ex;
    const int64_t tsz = at::elementSize(E.T);
    if (E.G != E.T) ex.per_ld += at::elementSize(E.G);
    if (need_x && (E.packed || E.G != E.T)) ex.per_row += E.m * tsz;
    if (need_db && E.G != E.T) ex.per_col += E.m * tsz;
    return ex;
  }

  void run(const Piece& pc) {
    if (!gx.defined() && !gdb.defined()) return;
    at::Tensor W = pc.S;
    if (E.G != E.T) {
      W = Wbuf.narrow(0, 0, pc.S.numel()).view(pc.S.sizes());
      W.copy_(pc.S);
    }
    const double a = E.alpha_;
    const int64_t rows = pc.sl.rows, slots = pc.sl.count();
    if (E.packed) {
      const at::Tensor W3 = W.view({E.Ca, rows, pc.k});
      const at::Tensor X3 = pc.X.view({E.Ca, rows, E.m});
      if (gx.defined()) {
        at::Tensor dX = dXbuf.narrow(0, 0, slots);
        E.mm_into(dX.view({E.Ca, rows, E.m}), W3, pc.Y);
        ScatterArgs sa;
        sa.dst = gx;
        sa.src = dX;
        sa.Rmax = E.Rmax, sa.r0 = pc.sl.r0, sa.rows = rows;
        sa.sorted_rows = E.sorted_rows, sa.order = E.order, sa.run_begin = E.run_begin;
        sa.scale = a;
        E.ep_->scatter(sa);
      }
      if (gdb.defined()) {
        at::Tensor dst = gdbA.narrow(1, pc.j0, pc.k);
        if (E.G == E.T) {
          dst.baddbmm_(W3.transpose(1, 2), X3, 1.0, a);
        } else {
          at::Tensor dY = dYbuf.narrow(0, 0, E.Ca * pc.k).view({E.Ca, pc.k, E.m});
          E.mm_into(dY, W3.transpose(1, 2), X3);
          dst.add_(dY, a);
        }
      }
      return;
    }
    if (gx.defined()) {
      if (E.G == E.T) {
        gx.narrow(0, pc.sl.r0, rows).addmm_(W, pc.Y, 1.0, a);
      } else {
        at::Tensor dX = dXbuf.narrow(0, 0, rows);
        E.mm_into(dX, W, pc.Y);
        gx.narrow(0, pc.sl.r0, rows).add_(dX, a);
      }
    }
    if (gdb.defined()) {
      at::Tensor dst = gdb.view({E.C * E.n, E.m}).narrow(0, pc.sl.c0 * E.n + pc.j0, pc.g * pc.k);
      if (E.G == E.T) {
        dst.addmm_(W.t(), pc.X, 1.0, a);
      } else {
        at::Tensor dY = dYbuf.narrow(0, 0, pc.g * pc.k);
        E.mm_into(dY, W.t(), pc.X);
        dst.add_(dY, a);
      }
    }
  }

  // packed: the per-active-class accumulator into gdb
  void finish() {
    if (gdb.defined() && !gdbA.is_same(gdb)) gdb.index_copy_(0, E.cls, gdbA);
  }
};

// the plan a call runs (a statistic for tests and benchmarks): without pairs, the dense one
void note_plan(Plan plan, const PairMask& pairs) {
  settings().last_plan = static_cast<int>(pairs.defined() ? plan : Plan::Dense);
}

}  // namespace

// -------------------------------------------------------------------------------------------------
// exemplar_logsumexp

at::Tensor exemplar_logsumexp(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q, double alpha,
                              Metric metric, const PairMask& pairs, Plan plan) {
  const char* op = "exemplar_logsumexp";
  const auto T = acc_of(x.scalar_type());
  at::Tensor out = at::zeros({x.size(0), db.size(0)}, x.options().dtype(T));
  note_plan(plan, pairs);
  if (out.numel() == 0) return out;
  if (db.size(1) == 0) {  // no slot: log 0 = -inf on the computed entries
    return pairs.defined() ? out.masked_fill_(pairs.dev, -kInf) : out.fill_(-kInf);
  }
  Engine E(op, x, db, log_q, alpha, metric, pairs, pairs.dev, plan, /*allow_fold=*/true, /*need_scatter=*/false);
  const ChunkPlan pl = E.plan(Extra{});
  E.for_each_piece(pl, [&](const Piece& pc) {
    RowArgs a = E.row_args(pc, RowMode::Lse);
    a.logz = out;
    a.first = pc.j0 == 0;
    E.ep_->rows(a);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> exemplar_logsumexp_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
    const at::Tensor& logz, double alpha, Metric metric, const PairMask& pairs, Plan plan,
    std::array<bool, 3> output_mask) {
  const char* op = "exemplar_logsumexp_backward";
  const auto T = acc_of(x.scalar_type());
  const auto topt = x.options().dtype(T);
  const bool need_x = output_mask[0], need_db = output_mask[1], need_lq = output_mask[2];
  at::Tensor gx = need_x ? at::zeros(x.sizes(), topt) : at::Tensor();
  at::Tensor gdb = need_db ? at::zeros(db.sizes(), topt) : at::Tensor();
  at::Tensor glq = need_lq ? at::zeros(log_q.sizes(), topt) : at::Tensor();
  auto finish = [&](const at::Tensor& g, const at::Tensor& like) {
    return g.defined() ? g.to(like.scalar_type()) : at::empty({0}, like.options());
  };
  note_plan(plan, pairs);
  if (x.size(0) > 0 && db.size(0) > 0 && db.size(1) > 0 && (need_x || need_db || need_lq)) {
    const at::Tensor coef = grad.to(T).contiguous();
    const at::Tensor lz = logz.to(T).contiguous();
    // only the pairs with a gradient take part
    at::Tensor active;
    if (pairs.defined()) active = at::logical_and(pairs.dev, coef.ne(0));
    Engine E(op, x, db, log_q, alpha, metric, pairs, active, plan, /*allow_fold=*/true, /*need_scatter=*/need_x);
    if (need_db) E.zero_inactive_rows();  // rows outside the pairs must not reach W^T X (before planning)
    const bool euclid = metric == Metric::Euclidean;
    const bool need_colw = need_db || need_lq;
    const bool need_p = need_lq && euclid;
    Extra ex = GradGemms::extra(E, need_x, need_db);
    if (need_p) ex.per_ld += at::elementSize(T);
    const ChunkPlan pl = E.plan(ex);
    GradGemms gg(E, pl, gx, gdb);
    at::Tensor RW = need_x ? at::zeros({E.N, E.C}, topt) : at::Tensor();
    at::Tensor colw = need_colw ? at::zeros({E.C, E.n}, topt) : at::Tensor();
    at::Tensor colp = need_p ? at::zeros({E.C, E.n}, topt) : at::Tensor();
    at::Tensor Pbuf = need_p ? at::empty({E.blocks() * pl.rows * pl.g * pl.k}, topt) : at::Tensor();
    E.for_each_piece(pl, [&](const Piece& pc) {
      RowArgs a = E.row_args(pc, RowMode::W);
      a.logz = lz;
      a.coef = coef;
      a.rowsum = RW;
      if (need_p) a.P = Pbuf.narrow(0, 0, pc.S.numel()).view(pc.S.sizes());
      E.ep_->rows(a);
      if (need_colw) {
        ColArgs ca = E.col_args(pc, pc.S);
        ca.acc = colw;
        E.ep_->cols(ca);
      }
      if (need_p) {
        ColArgs ca = E.col_args(pc, a.P);
        ca.acc = colp;
        E.ep_->cols(ca);
      }
      gg.run(pc);
    });
    gg.finish();
    if (need_x) E.finish_rows(gx, RW, alpha);
    if (need_db) {
      for (int64_t c = 0; c < E.C; ++c) gdb[c].addcmul_(E.y_centred(c), colw[c].unsqueeze(1), -alpha);
    }
    if (need_lq) glq.copy_(euclid ? colp : colw.mul(0.5));
  }
  return {finish(gx, x), finish(gdb, db), finish(glq, log_q)};
}

// -------------------------------------------------------------------------------------------------
// cc_loss

std::tuple<at::Tensor, at::Tensor, at::Tensor> cc_loss(const at::Tensor& x, const at::Tensor& weight,
                                                       const PairMask& pairs, const at::Tensor& db,
                                                       const at::Tensor& log_q, double alpha, Metric metric,
                                                       bool grad_x, Plan plan) {
  const char* op = "convex_clustering_loss";
  const auto T = acc_of(x.scalar_type());
  const auto topt = x.options().dtype(T);
  at::Tensor logz = at::zeros({x.size(0), db.size(0)}, topt);
  at::Tensor dx = grad_x ? at::zeros(x.sizes(), topt) : at::Tensor();
  at::Tensor loss = at::zeros({}, topt);
  note_plan(plan, pairs);
  if (x.size(0) > 0 && db.size(0) > 0 && db.size(1) > 0) {
    // classes with no filled slot are left out of the loss
    const at::Tensor nonempty = log_q.ne(-kInf).any(1);
    const at::Tensor active = at::logical_and(pairs.dev, nonempty.unsqueeze(0));
    const at::Tensor w = weight.to(T).contiguous();
    const at::Tensor coef = w.neg();  // dL/dlogz on the pairs
    Engine E(op, x, db, log_q, alpha, metric, pairs, active, plan, /*allow_fold=*/true, /*need_scatter=*/grad_x);
    const ChunkPlan pl = E.plan(GradGemms::extra(E, grad_x, false));
    if (!grad_x) {
      E.for_each_piece(pl, [&](const Piece& pc) {
        RowArgs a = E.row_args(pc, RowMode::Lse);
        a.logz = logz;
        a.first = pc.j0 == 0;
        E.ep_->rows(a);
      });
    } else {
      GradGemms gg(E, pl, dx, at::Tensor());
      at::Tensor RW = at::zeros({E.N, E.C}, topt);
      if (pl.k == E.n) {  // complete rows: logz and W from one GEMM, then W Y (two GEMMs in all)
        E.for_each_piece(pl, [&](const Piece& pc) {
          RowArgs a = E.row_args(pc, RowMode::LseW);
          a.logz = logz;
          a.coef = coef;
          a.rowsum = RW;
          E.ep_->rows(a);
          gg.run(pc);
        });
      } else {  // the slots come in column chunks: logz first, then recompute for W
        E.for_each_piece(pl, [&](const Piece& pc) {
          RowArgs a = E.row_args(pc, RowMode::Lse);
          a.logz = logz;
          a.first = pc.j0 == 0;
          E.ep_->rows(a);
        });
        E.for_each_piece(pl, [&](const Piece& pc) {
          RowArgs a = E.row_args(pc, RowMode::W);
          a.logz = logz;
          a.coef = coef;
          a.rowsum = RW;
          E.ep_->rows(a);
          gg.run(pc);
        });
      }
      E.finish_rows(dx, RW, alpha);
    }
    const at::Tensor take = at::logical_and(active, w.ne(0));
    loss = at::where(take, w * logz, at::zeros({}, topt)).sum().neg();
  }
  return {loss.to(x.scalar_type()), logz, grad_x ? dx.to(x.scalar_type()) : at::empty({0}, x.options())};
}

// -------------------------------------------------------------------------------------------------
// fit_step

std::tuple<at::Tensor, at::Tensor> fit_step(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q,
                                            const at::Tensor& weight, const PairMask& pairs, double alpha,
                                            Metric metric, Plan plan) {
  const char* op = "fit_step";
  const auto T = acc_of(x.scalar_type());
  const auto topt = x.options().dtype(T);
  at::Tensor logz = at::zeros({x.size(0), db.size(0)}, topt);
  at::Tensor log_eta = at::full(log_q.sizes(), -kInf, topt);
  note_plan(plan, pairs);
  if (x.size(0) > 0 && db.size(0) > 0) {
    const at::Tensor w = weight.to(T).contiguous();
    const at::Tensor active = pairs.dev;  // w > 0
    if (db.size(1) == 0) {
      logz.masked_fill_(active, -kInf);  // log 0 on the weighted pairs
    } else {
      // no fold: log eta needs t = -alpha d itself, not log q + t
      Engine E(op, x, db, log_q, alpha, metric, pairs, active, plan, /*allow_fold=*/false, /*need_scatter=*/false);
      const ChunkPlan pl = E.plan(Extra{});
      at::Tensor M = at::full({E.C, E.n}, -kInf, topt), L = at::zeros({E.C, E.n}, topt);
      auto eta_cols = [&](const Piece& pc) {
        ColArgs ca = E.col_args(pc, pc.S);
        ca.lse = true;
        ca.acc = M;
        ca.acc2 = L;
        E.ep_->cols(ca);
      };
      if (pl.k == E.n) {
        E.for_each_piece(pl, [&](const Piece& pc) {
          RowArgs a = E.row_args(pc, RowMode::Fit);
          a.logz = logz;
          a.coef = w;
          E.ep_->rows(a);
          eta_cols(pc);
        });
      } else {
        E.for_each_piece(pl, [&](const Piece& pc) {
          RowArgs a = E.row_args(pc, RowMode::Lse);
          a.logz = logz;
          a.first = pc.j0 == 0;
          E.ep_->rows(a);
        });
        E.for_each_piece(pl, [&](const Piece& pc) {
          RowArgs a = E.row_args(pc, RowMode::Eta);
          a.logz = logz;
          a.coef = w;
          E.ep_->rows(a);
          eta_cols(pc);
        });
      }
      // log eta = shift(M) + log L; -inf on empty slots
      const at::Tensor shift = at::where(M.eq(-kInf), at::zeros({}, topt), M);
      log_eta = (shift + L.log()).masked_fill_(E.lq.eq(-kInf), -kInf);
    }
  }
  return {logz.to(x.scalar_type()), log_eta.to(x.scalar_type())};
}

}  // namespace library
}  // namespace ccluster
