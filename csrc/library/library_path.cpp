// The library-GEMM path (library_path.h): rows in chunks, per chunk and class (or group of classes) one
// distance GEMM from the BLAS library into a bounded workspace, then a small fused epilogue (epilogue.h).
//
// Work layout. Two ways to take the rows:
//   shared  every row of x against every class: chunks of consecutive rows, each against a group of
//           consecutive classes at once (one GEMM X [rows, m] . Y [g n, m]^T). Used without pairs, and
//           with pairs when gathering is off or a CUDA graph is being captured (then the pairs only mask
//           the epilogue, and the shapes never depend on the data).
//   packed  only the (row, class) pairs: their row ids sorted by class (ascending rows within a class)
//           are gathered chunk by chunk into the workspace, and each class's run of the chunk is one
//           GEMM against that class's exemplars. Needs the per-class counts on the host (one copy).
// When the exemplars are too many for a chunk (n slots x the rows the workspace holds), the slots are
// taken in column chunks too, and the forward's log-sum-exp is merged across them.
//
// GEMM precision. float64 and float32 run as they are: float32 is exact SGEMM unless torch's own switch
// (torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision) lets cuBLAS use TF32.
// float16/bfloat16 operands go to tensor cores with float32 accumulation and float32 output
// (mm with out_dtype); on CPU, where ATen has no such GEMM, they are computed in float32 from the same
// rounded values. Centring (settings: auto = only when the GEMM rounds its float32 operands to TF32;
// on; off) subtracts each class's exemplar mean from x and from the exemplars before the GEMM: the
// distances are unchanged and the rounding error alpha eps |x| |y| of a reduced-precision GEMM shrinks
// to the spread of the data. Norms, scores, logz and every reduction stay in float32 (float64).
//
// The sqeuclidean score is folded into the GEMM where ATen offers it (float32/float64 addmm):
// S = addmm(log q - alpha |y|^2, X, Y^T, alpha = 2 alpha), so the epilogue only subtracts alpha |x|^2
// and clamps at log q (d >= 0). Otherwise (euclidean, 16-bit operands, the fit) the GEMM gives x.y and
// the epilogue forms d from the norms.
//
// Memory: the workspace bound (settings.workspace_bytes, 256 MiB by default) caps the chunk buffers;
// besides them and the outputs an op holds O(N C + C n + C m) (logz, row sums, column sums, class means).
// Every reduction runs in a fixed order, so results do not depend on scheduling (cuBLAS as configured by
// torch; with torch.use_deterministic_algorithms it asks for CUBLAS_WORKSPACE_CONFIG itself).
#include "library/library_path.h"

#include <ATen/Context.h>

#include <algorithm>
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

struct Seg {
  int64_t a, len, c;
};

// One GEMM output chunk and what its epilogue and the gradient GEMMs need.
struct Piece {
  at::Tensor S;                 // [rows, g k] T
  int64_t rows = 0, g = 1, k = 0, j0 = 0;
  at::Tensor row_ids;           // packed: int64 [rows]; shared: undefined (r0 + i)
  int64_t r0 = 0;
  at::Tensor row_class;         // packed: int64 [rows]; shared: undefined (c0)
  int64_t c0 = 0;
  int64_t p0 = 0;               // packed: position of the first row in the packed list
  at::Tensor X;                 // [rows, m] the GEMM's row operand
  at::Tensor xx;                // [rows] T
  std::vector<Seg> segs;        // runs of one class (shared: one segment, classes c0 .. c0 + g)
  at::Tensor seg_dev;           // packed: segs on the device, int64 [nseg, 3]
  std::vector<at::Tensor> Y;    // per segment: [g k, m] the exemplar operand rows
};

struct Plan {
  int64_t rows = 1, g = 1, k = 1;
};

// Per-piece buffer needs of an op, beyond S, the gathered rows and their norms.
struct Extra {
  int64_t per_ld = 0;    // bytes per row and per column of S (a low-precision copy of W, P)
  int64_t per_row = 0;   // bytes per row (a [rows, m] float buffer)
  int64_t per_col = 0;   // bytes per column of S, once (a [g k, m] float buffer)
};

class Engine {
 public:
  Engine(const char* op, const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q, double alpha,
         Metric metric, const at::Tensor& active, bool allow_fold)
      : op_(op), x_(x), db_(db), alpha_(alpha), euclid_(metric == Metric::Euclidean) {
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
    if (centre) {
      mu = n > 0 ? at::sum(db, {1}, false, T).div_(static_cast<double>(n)) : at::zeros({C, m}, x.options().dtype(T));
    }
    yy = at::empty({C, n}, x.options().dtype(T));
    if (C * n > 0) {
      GatherArgs ga;
      ga.src = Yall_;
      ga.rows = C * n;
      ga.class_div = n;
      if (centre) ga.mu = mu;
      ga.round_to = G;
      ga.xx = yy.view({C * n});
      ep_->gather(ga);
    }
    if (fold) bias = lq - alpha * yy;
    plan_rows(active);
  }

  // ----------------------------------------------------------------------------------------------
  // Planning

  int64_t total_rows() const { return packed ? P : N; }

  Plan plan(const Extra& ex) const {
    const int64_t tsz = at::elementSize(T), gsz = at::elementSize(G);
    const int64_t total = std::max<int64_t>(total_rows(), 1);
    const bool copy_x = packed || !direct_x_;
    auto row_bytes = [&](int64_t ld) {
      return ld * (tsz + ex.per_ld) + (copy_x ? m * gsz : 0) + tsz + ex.per_row;
    };
    auto fixed_bytes = [&](int64_t ld) { return (direct_y_ ? 0 : ld * m * gsz) + ld * ex.per_col; };
    auto fit = [&](int64_t ld) {
      const int64_t avail = ws_ - fixed_bytes(ld);
      return avail > 0 ? avail / std::max<int64_t>(row_bytes(ld), 1) : 0;
    };
    const int64_t want = std::min(total, kMinChunkRows);
    const int64_t max_g = (packed || centre) ? 1 : std::max<int64_t>(C, 1);
    Plan p;
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

  // out [r, c] (T) = A [r, m] . B [c, m]^T (A, B in G); with bias: folded scores (bias + 2 alpha A.B^T).
  void gemm_nt(at::Tensor out, const at::Tensor& A, const at::Tensor& B, const at::Tensor& bias_row) const {
    if (bias_row.defined()) {
      at::addmm_out(out, bias_row.unsqueeze(0), A, B.t(), 1.0, 2.0 * alpha_);
    } else {
      mm_into(out, A, B.t());
    }
  }

  // out (T) = A . B for operands of one dtype: 16-bit operands with float32 accumulation and output.
  void mm_into(at::Tensor out, const at::Tensor& A, const at::Tensor& B) const {
    if (is16(A.scalar_type())) {
      if (A.is_cuda()) {
        at::mm_out(out, A, B, T);
      } else {  // no mixed-precision GEMM on CPU: the same rounded values, computed in float32
        at::mm_out(out, A.to(T), B.to(T));
      }
    } else {
      at::mm_out(out, A, B);
    }
  }

  // ----------------------------------------------------------------------------------------------
  // Iteration over the pieces of work

  template <typename F>
  void for_each_piece(const Plan& pl, const F& fn) {
    if (total_rows() == 0 || C == 0 || n == 0) return;
    const auto topt = x_.options().dtype(T), gopt = x_.options().dtype(G);
    at::Tensor Sbuf = at::empty({pl.rows * pl.g * pl.k}, topt);
    at::Tensor xxbuf = at::empty({pl.rows}, topt);
    at::Tensor Xbuf = (packed || !direct_x_) ? at::empty({pl.rows, m}, gopt) : at::Tensor();
    at::Tensor Ybuf = direct_y_ ? at::Tensor() : at::empty({pl.g * pl.k, m}, gopt);
    if (packed) {
      packed_pieces(pl, Sbuf, xxbuf, Xbuf, Ybuf, fn);
    } else {
      shared_pieces(pl, Sbuf, xxbuf, Xbuf, Ybuf, fn);
    }
  }

  // ----------------------------------------------------------------------------------------------
  // Helpers for the ops

  RowArgs row_args(const Piece& pc, RowMode mode) const {
    RowArgs a;
    a.S = pc.S;
    a.xx = pc.xx;
    a.row_ids = pc.row_ids;
    a.r0 = pc.r0;
    a.row_class = pc.row_class;
    a.c0 = pc.c0, a.g = pc.g, a.k = pc.k, a.j0 = pc.j0, a.rows = pc.rows;
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
    a.g = pc.g, a.k = pc.k, a.j0 = pc.j0, a.n = n, a.rows = pc.rows, a.c0 = pc.c0;
    if (packed) {
      a.seg = pc.seg_dev;
      a.nseg = static_cast<int64_t>(pc.segs.size());
    }
    return a;
  }

  // The exemplar rows of class c as the GEMM saw them (centred), in T: for the colsum(W) y terms.
  at::Tensor y_centred(int64_t c) const {
    const at::Tensor y = db_[c].to(T);  // may be db itself: never modified in place
    return centre ? y.sub(mu[c]) : y;
  }

  // gx += alpha (acc - sum_c rowsum_c (x - mu_c)) given acc already in gx: the row terms. x is read only
  // on rows with a nonzero rowsum: a row outside the active pairs has none and keeps exactly 0 gradient,
  // whatever it holds (0 * NaN would be NaN). The centring term RW mu is 0 on such rows.
  void finish_rows(at::Tensor& gx, const at::Tensor& RW, double scale) const {
    RowTermArgs ra;
    ra.dst = gx;
    ra.src = x_;
    ra.w = RW.sum(1);
    ra.scale = -scale;
    ep_->row_terms(ra);
    if (centre) gx.addmm_(RW, mu, 1.0, scale);
  }

  // Shared mode with pairs: the gradient GEMM W^T X reads every row of a chunk, and 0 * NaN is NaN, so
  // the rows without an active pair are gathered as zeros (into the workspace: a copy of the chunk instead
  // of a view of x). Packed mode gathers only the active rows anyway.
  void zero_inactive_rows() {
    if (packed || !mask.defined()) return;
    keep_rows_ = mask.any(1);
    direct_x_ = false;
  }

  const char* op_;
  at::Tensor x_, db_, Yall_;
  double alpha_;
  bool euclid_;
  int64_t N = 0, C = 0, n = 0, m = 0, P = 0;
  at::ScalarType T, G;
  bool centre = false, fold = false;
  at::Tensor lq, mu, yy, bias;
  const Epilogues* ep_;
  int64_t ws_ = 0;
  bool direct_x_ = false, direct_y_ = false;
  at::Tensor keep_rows_;                 // shared mode: [N] bool, rows gathered (the others as zeros)
  bool packed = false;
  at::Tensor mask;                       // shared mode: active pairs, or undefined (all)
  at::Tensor prow, pclass;               // packed mode
  std::vector<int64_t> off;              // packed mode: [C + 1] on the host
  at::Tensor sorted_rows, order;         // packed mode: the packed list in row-major order
  at::Tensor run_begin;                  // packed mode: where each row's run starts in sorted_rows

 private:
  void plan_rows(const at::Tensor& active) {
    if (!active.defined()) return;
    const bool gather = settings().gather.load() != 0 && !ep_->capturing();
    if (!gather) {
      mask = active.contiguous();
      return;
    }
    packed = true;
    const at::Tensor nz = active.t().nonzero();  // (class, row), sorted by class then row
    pclass = nz.select(1, 0).contiguous();
    prow = nz.select(1, 1).contiguous();
    P = prow.numel();
    const at::Tensor counts = active.sum(0, false, at::kLong).cpu();
    off.assign(C + 1, 0);
    const int64_t* cp = counts.data_ptr<int64_t>();
    for (int64_t c = 0; c < C; ++c) off[c + 1] = off[c] + cp[c];
    TORCH_INTERNAL_ASSERT(off[C] == P);
  }

  void ensure_row_order() {
    if (sorted_rows.defined() || !packed || P == 0) return;
    auto sorted = at::sort(prow, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    sorted_rows = std::get<0>(sorted).contiguous();
    order = std::get<1>(sorted).contiguous();
    // runs of equal rows: [0, starts of new rows..., P]
    const at::Tensor starts = sorted_rows.narrow(0, 1, P - 1).ne(sorted_rows.narrow(0, 0, P - 1)).nonzero();
    const auto lopt = prow.options();
    run_begin = at::cat({at::zeros({1}, lopt), starts.view({-1}).add(1), at::full({1}, P, lopt)}).contiguous();
  }

 public:
  // the packed list in row-major order, for the deterministic scatter of gradient rows
  void need_row_order() { ensure_row_order(); }

 private:
  at::Tensor y_operand(int64_t c0, int64_t g, int64_t j0, int64_t k, at::Tensor& Ybuf) const {
    if (direct_y_) {
      return g > 1 ? Yall_.narrow(0, c0 * n, g * n) : db_[c0].narrow(0, j0, k);
    }
    GatherArgs ga;
    ga.src = Yall_;
    ga.r0 = c0 * n + j0;
    ga.rows = g * k;
    ga.class_div = n;
    if (centre) ga.mu = mu;
    at::Tensor Y = Ybuf.narrow(0, 0, g * k);
    ga.out = Y;
    ga.xx = at::empty({g * k}, x_.options().dtype(T));
    ep_->gather(ga);
    return Y;
  }

  at::Tensor bias_row(int64_t c0, int64_t g, int64_t j0, int64_t k) const {
    if (!fold) return at::Tensor();
    return g > 1 ? bias.narrow(0, c0, g).reshape({g * n}) : bias[c0].narrow(0, j0, k);
  }

  template <typename F>
  void shared_pieces(const Plan& pl, at::Tensor& Sbuf, at::Tensor& xxbuf, at::Tensor& Xbuf, at::Tensor& Ybuf,
                     const F& fn) {
    for (int64_t r0 = 0; r0 < N; r0 += pl.rows) {
      const int64_t rows = std::min(pl.rows, N - r0);
      Piece pc;
      pc.rows = rows;
      pc.r0 = r0;
      pc.xx = xxbuf.narrow(0, 0, rows);
      GatherArgs ga;
      ga.src = x_;
      ga.r0 = r0;
      ga.rows = rows;
      ga.xx = pc.xx;
      ga.round_to = G;
      ga.keep = keep_rows_;
      if (!centre) {
        if (direct_x_) {
          pc.X = x_.narrow(0, r0, rows);
        } else {
          pc.X = Xbuf.narrow(0, 0, rows);
          ga.out = pc.X;
        }
        ep_->gather(ga);
      }
      for (int64_t c0 = 0; c0 < C; c0 += pl.g) {
        const int64_t g = std::min(pl.g, C - c0);
        if (centre) {
          pc.X = Xbuf.narrow(0, 0, rows);
          ga.out = pc.X;
          ga.c0 = c0;
          ga.mu = mu;
          ep_->gather(ga);
        }
        for (int64_t j0 = 0; j0 < n; j0 += pl.k) {
          const int64_t k = std::min(pl.k, n - j0);
          pc.g = g, pc.k = k, pc.j0 = j0, pc.c0 = c0;
          pc.S = Sbuf.narrow(0, 0, rows * g * k).view({rows, g * k});
          pc.segs = {Seg{0, rows, c0}};
          pc.Y = {y_operand(c0, g, j0, k, Ybuf)};
          gemm_nt(pc.S, pc.X, pc.Y[0], bias_row(c0, g, j0, k));
          settings().pieces.fetch_add(1);
          fn(pc);
        }
      }
    }
  }

  template <typename F>
  void packed_pieces(const Plan& pl, at::Tensor& Sbuf, at::Tensor& xxbuf, at::Tensor& Xbuf, at::Tensor& Ybuf,
                     const F& fn) {
    int64_t p = 0;
    while (p < P) {
      // the class of packed position p, and the chunk's end (one class per chunk when the exemplars
      // must be rebuilt per class)
      const int64_t cfirst = std::upper_bound(off.begin(), off.end(), p) - off.begin() - 1;
      int64_t pend = std::min(P, p + pl.rows);
      if (!direct_y_) pend = std::min(pend, off[cfirst + 1]);
      const int64_t rows = pend - p;
      Piece pc;
      pc.rows = rows;
      pc.p0 = p;
      pc.row_ids = prow.narrow(0, p, rows);
      pc.row_class = pclass.narrow(0, p, rows);
      pc.c0 = cfirst;
      pc.X = Xbuf.narrow(0, 0, rows);
      pc.xx = xxbuf.narrow(0, 0, rows);
      GatherArgs ga;
      ga.src = x_;
      ga.row_ids = pc.row_ids;
      ga.row_class = pc.row_class;
      ga.rows = rows;
      if (centre) ga.mu = mu;
      ga.out = pc.X;
      ga.xx = pc.xx;
      ep_->gather(ga);
      std::vector<int64_t> flat;
      for (int64_t c = cfirst; c < C && off[c] < pend; ++c) {
        const int64_t a = std::max(off[c], p), b = std::min(off[c + 1], pend);
        if (b <= a) continue;
        pc.segs.push_back(Seg{a - p, b - a, c});
        flat.insert(flat.end(), {a - p, b - a, c});
      }
      pc.seg_dev = at::tensor(flat, at::TensorOptions().dtype(at::kLong))
                       .view({static_cast<int64_t>(pc.segs.size()), 3})
                       .to(x_.device());
      for (int64_t j0 = 0; j0 < n; j0 += pl.k) {
        const int64_t k = std::min(pl.k, n - j0);
        pc.g = 1, pc.k = k, pc.j0 = j0;
        pc.S = Sbuf.narrow(0, 0, rows * k).view({rows, k});
        pc.Y.clear();
        for (const Seg& sg : pc.segs) {
          pc.Y.push_back(y_operand(sg.c, 1, j0, k, Ybuf));
          gemm_nt(pc.S.narrow(0, sg.a, sg.len), pc.X.narrow(0, sg.a, sg.len), pc.Y.back(),
                  bias_row(sg.c, 1, j0, k));
        }
        settings().pieces.fetch_add(1);
        fn(pc);
      }
      p = pend;
    }
  }
};

// The gradient GEMMs of one piece whose S now holds W (T): gx += alpha W Y (rows of x), gdb += alpha W^T X.
struct GradGemms {
  Engine& E;
  at::Tensor gx, gdb;   // T, or undefined
  at::Tensor Wbuf;      // G copy of W when G != T
  at::Tensor dXbuf;     // [rows, m] T: packed rows of W Y, or the 16-bit product
  at::Tensor dYbuf;     // [g k, m] T: the 16-bit W^T X product

  GradGemms(Engine& e, const Plan& pl, at::Tensor gx_, at::Tensor gdb_) : E(e), gx(std::move(gx_)), gdb(std::move(gdb_)) {
    const auto topt = E.x_.options().dtype(E.T);
    if (E.G != E.T) Wbuf = at::empty({pl.rows * pl.g * pl.k}, E.x_.options().dtype(E.G));
    if (gx.defined() && (E.packed || E.G != E.T)) dXbuf = at::empty({pl.rows, E.m}, topt);
    if (gdb.defined() && E.G != E.T) dYbuf = at::empty({pl.g * pl.k, E.m}, topt);
    if (gx.defined()) E.need_row_order();
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
    if (gx.defined()) {
      if (E.packed) {
        at::Tensor dX = dXbuf.narrow(0, 0, pc.rows);
        for (size_t i = 0; i < pc.segs.size(); ++i) {
          const Seg& sg = pc.segs[i];
          E.mm_into(dX.narrow(0, sg.a, sg.len), W.narrow(0, sg.a, sg.len), pc.Y[i]);
        }
        ScatterArgs sa;
        sa.dst = gx;
        sa.src = dX;
        sa.p0 = pc.p0;
        sa.rows = pc.rows;
        sa.sorted_rows = E.sorted_rows;
        sa.order = E.order;
        sa.run_begin = E.run_begin;
        sa.scale = a;
        E.ep_->scatter(sa);
      } else if (E.G == E.T) {
        gx.narrow(0, pc.r0, pc.rows).addmm_(W, pc.Y[0], 1.0, a);
      } else {
        at::Tensor dX = dXbuf.narrow(0, 0, pc.rows);
        E.mm_into(dX, W, pc.Y[0]);
        gx.narrow(0, pc.r0, pc.rows).add_(dX, a);
      }
    }
    if (gdb.defined()) {
      at::Tensor gflat = gdb.view({E.C * E.n, E.m});
      for (const Seg& sg : pc.segs) {
        at::Tensor dst = gflat.narrow(0, sg.c * E.n + pc.j0, pc.g * pc.k);
        const at::Tensor Wt = W.narrow(0, sg.a, sg.len).t();
        const at::Tensor Xs = pc.X.narrow(0, sg.a, sg.len);
        if (E.G == E.T) {
          dst.addmm_(Wt, Xs, 1.0, a);
        } else {
          at::Tensor dY = dYbuf.narrow(0, 0, pc.g * pc.k);
          E.mm_into(dY, Wt, Xs);
          dst.add_(dY, a);
        }
      }
    }
  }
};

}  // namespace

// -------------------------------------------------------------------------------------------------
// exemplar_logsumexp

at::Tensor exemplar_logsumexp(const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q, double alpha,
                              Metric metric, const c10::optional<at::Tensor>& pairs) {
  const char* op = "exemplar_logsumexp";
  const auto T = acc_of(x.scalar_type());
  at::Tensor out = at::zeros({x.size(0), db.size(0)}, x.options().dtype(T));
  if (out.numel() == 0) return out;
  if (db.size(1) == 0) {  // no slot: log 0 = -inf on the computed entries
    return pairs.has_value() ? out.masked_fill_(*pairs, -kInf) : out.fill_(-kInf);
  }
  Engine E(op, x, db, log_q, alpha, metric, pairs.has_value() ? *pairs : at::Tensor(), /*allow_fold=*/true);
  const Plan pl = E.plan(Extra{});
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
    const at::Tensor& logz, double alpha, Metric metric, const c10::optional<at::Tensor>& pairs,
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
  if (x.size(0) > 0 && db.size(0) > 0 && db.size(1) > 0 && (need_x || need_db || need_lq)) {
    const at::Tensor coef = grad.to(T).contiguous();
    const at::Tensor lz = logz.to(T).contiguous();
    // only the pairs with a gradient take part
    at::Tensor active;
    if (pairs.has_value()) active = at::logical_and(*pairs, coef.ne(0));
    Engine E(op, x, db, log_q, alpha, metric, active, /*allow_fold=*/true);
    if (need_db) E.zero_inactive_rows();  // rows outside the pairs must not reach W^T X (before planning)
    const bool euclid = metric == Metric::Euclidean;
    const bool need_colw = need_db || need_lq;
    const bool need_p = need_lq && euclid;
    Extra ex = GradGemms::extra(E, need_x, need_db);
    if (need_p) ex.per_ld += at::elementSize(T);
    const Plan pl = E.plan(ex);
    GradGemms gg(E, pl, gx, gdb);
    at::Tensor RW = need_x ? at::zeros({E.N, E.C}, topt) : at::Tensor();
    at::Tensor colw = need_colw ? at::zeros({E.C, E.n}, topt) : at::Tensor();
    at::Tensor colp = need_p ? at::zeros({E.C, E.n}, topt) : at::Tensor();
    at::Tensor Pbuf = need_p ? at::empty({pl.rows * pl.g * pl.k}, topt) : at::Tensor();
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
                                                       const at::Tensor& pairs, const at::Tensor& db,
                                                       const at::Tensor& log_q, double alpha, Metric metric,
                                                       bool grad_x) {
  const char* op = "convex_clustering_loss";
  const auto T = acc_of(x.scalar_type());
  const auto topt = x.options().dtype(T);
  at::Tensor logz = at::zeros({x.size(0), db.size(0)}, topt);
  at::Tensor dx = grad_x ? at::zeros(x.sizes(), topt) : at::Tensor();
  at::Tensor loss = at::zeros({}, topt);
  if (x.size(0) > 0 && db.size(0) > 0 && db.size(1) > 0) {
    // classes with no filled slot are left out of the loss
    const at::Tensor nonempty = log_q.ne(-kInf).any(1);
    const at::Tensor active = at::logical_and(pairs, nonempty.unsqueeze(0));
    const at::Tensor w = weight.to(T).contiguous();
    const at::Tensor coef = w.neg();  // dL/dlogz on the pairs
    Engine E(op, x, db, log_q, alpha, metric, active, /*allow_fold=*/true);
    const Plan pl = E.plan(GradGemms::extra(E, grad_x, false));
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
                                            const at::Tensor& weight, double alpha, Metric metric) {
  const char* op = "fit_step";
  const auto T = acc_of(x.scalar_type());
  const auto topt = x.options().dtype(T);
  at::Tensor logz = at::zeros({x.size(0), db.size(0)}, topt);
  at::Tensor log_eta = at::full(log_q.sizes(), -kInf, topt);
  if (x.size(0) > 0 && db.size(0) > 0) {
    const at::Tensor w = weight.to(T).contiguous();
    const at::Tensor active = w.gt(0);
    if (db.size(1) == 0) {
      logz.masked_fill_(active, -kInf);  // log 0 on the weighted pairs
    } else {
      // no fold: log eta needs t = -alpha d itself, not log q + t
      Engine E(op, x, db, log_q, alpha, metric, active, /*allow_fold=*/false);
      const Plan pl = E.plan(Extra{});
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
