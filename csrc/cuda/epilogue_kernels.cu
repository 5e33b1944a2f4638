// CUDA kernels of the library-path epilogues (semantics: csrc/library/epilogue.h; the CPU twin is
// csrc/library/epilogue_cpu.cpp, which the CPU test suite checks against the float64 oracle). The scalar
// numerics (scores, the online log-sum-exp) are csrc/numerics.h, shared with every other kernel.
//
//   gather   one warp per slot: x[row] - mu, rounded to the GEMM dtype, and its squared norm; padding
//            slots and pairs outside the mask are written as zeros without reading x.
//   rows     one warp per (slot, class) of a piece: the scores of the row in one pass with an online
//            log-sum-exp (one exp per value), merged across the warp by shuffles, then the mode's
//            rewrite of S (W = kappa coef exp(s - logz), or the terms of log eta) in a second pass.
//            The sums of the log-sum-exp and of the row sums of W are kept in double, as the CPU twin:
//            grad_x = alpha (W Y - rowsum(W) x) cancels, and float sums over k columns cost several ulps
//            that the cancellation multiplies.
//   cols     one block per (block of slots, 32 columns): 8 warps stride the slots, the 8 partial sums
//            (or log-sum-exp states) of a column are combined in a fixed order: deterministic, no atomics.
//   scatter  one block row per output row of x: the slots of the packed gradient that belong to it,
//            summed in class order and added once: deterministic, no atomics.
//   row terms  one warp per row of x: grad_x += scale rowsum(W) x on the rows with a nonzero rowsum.
// Grids come from the occupancy API (launch.cuh) and loop over the work (grid-stride). Nothing reads a
// value back to the host, so the kernels can be captured in CUDA graphs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launch.cuh"
#include "library/epilogue.h"
#include "numerics.h"

namespace ccluster {
namespace cuda {
namespace {

using library::ColArgs;
using library::GatherArgs;
using library::RowArgs;
using library::RowMode;
using library::ScatterArgs;
using library::SlotsView;
using library::slots_view;

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T, typename L>
__device__ __forceinline__ void warp_lse(T& m, L& l) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const L l2 = __shfl_xor_sync(0xffffffffu, l, off);
    lse_merge(m, l, m2, l2);  // symmetric: every lane ends with the same state
  }
}

// ---------------------------------------------------------------------------------------------------
// gather

template <typename scalar_t, typename T>
struct GatherK {
  const scalar_t* src;
  int64_t st0, st1, m;
  SlotsView sv;
  int64_t slots;
  const T* mu;
  scalar_t* out;
  T* xx;
  const bool* keep;
  const bool* mask;
  int64_t C;
};

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads) gather_kernel(GatherK<scalar_t, T> a) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = int64_t(gridDim.x) * kWarps;
  for (int64_t i = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); i < a.slots; i += stride) {
    const int64_t r = a.sv.row(i);
    if (r < 0 || (a.keep && !a.keep[r]) || (a.mask && !a.mask[r * a.C + a.sv.cls(i)])) {
      // uniform over the warp: zeros, src not read
      if (a.out)
        for (int64_t f = lane; f < a.m; f += 32) a.out[i * a.m + f] = scalar_t(0);
      if (lane == 0) a.xx[i] = T(0);
      continue;
    }
    const scalar_t* sr = a.src + r * a.st0;
    T s = T(0);
    for (int64_t f = lane; f < a.m; f += 32) {
      T v = static_cast<T>(sr[f * a.st1]);
      if (a.mu) v -= a.mu[f];
      const scalar_t o = static_cast<scalar_t>(v);
      const T vr = static_cast<T>(o);
      if (a.out) a.out[i * a.m + f] = o;
      s += vr * vr;
    }
    s = warp_sum(s);
    if (lane == 0) a.xx[i] = s;
  }
}

void gather_cuda(const GatherArgs& g) {
  const int64_t slots = g.sl.count();
  if (slots == 0) return;
  const c10::cuda::CUDAGuard guard(g.src.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TORCH_INTERNAL_ASSERT(!g.out.defined() || g.out.scalar_type() == g.src.scalar_type());
  TORCH_INTERNAL_ASSERT(g.out.defined() || g.round_to == g.src.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.src.scalar_type(), "ccluster_gather_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    GatherK<scalar_t, T> k{g.src.data_ptr<scalar_t>(), g.src.stride(0), g.src.stride(1), g.src.size(1),
                           slots_view(g.sl), slots, g.mu.defined() ? g.mu.data_ptr<T>() : nullptr,
                           g.out.defined() ? g.out.data_ptr<scalar_t>() : nullptr, g.xx.data_ptr<T>(),
                           g.keep.defined() ? g.keep.data_ptr<bool>() : nullptr,
                           g.mask.defined() ? g.mask.data_ptr<bool>() : nullptr, g.C};
    const int grid = occupancy_grid(gather_kernel<scalar_t, T>, kThreads, 0, (slots + kWarps - 1) / kWarps);
    gather_kernel<scalar_t, T><<<grid, kThreads, 0, stream>>>(k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------------
// rows

template <typename T>
struct RowK {
  T* S;
  T* P;
  const T* xx;
  SlotsView sv;
  int64_t slots, g, k, j0;
  const T* yy;
  const T* lq;
  int64_t C, n;
  T alpha;
  bool euclid, folded, first;
  int mode;
  const bool* mask;
  T* logz;
  const T* coef;
  T* rowsum;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) rows_kernel(RowK<T> a) {
  const int lane = threadIdx.x & 31;
  const int64_t ld = a.g * a.k;
  const RowMode mode = static_cast<RowMode>(a.mode);
  const int64_t items = a.slots * a.g;
  const int64_t stride = int64_t(gridDim.x) * kWarps;
  for (int64_t item = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); item < items; item += stride) {
    const int64_t i = item / a.g, h = item % a.g;
    const int64_t s = a.sv.row(i);
    const int64_t c = a.sv.cls(i) + h;
    T* row = a.S + i * ld + h * a.k;
    T* prow = a.P ? a.P + i * ld + h * a.k : nullptr;
    if (s < 0 || (a.mask && !a.mask[s * a.C + c])) {  // inactive; uniform over the warp
      if (mode == RowMode::Lse) continue;
      const T fill = (mode == RowMode::Fit || mode == RowMode::Eta) ? ninf<T>() : T(0);
      for (int64_t j = lane; j < a.k; j += 32) {
        row[j] = fill;
        if (prow) prow[j] = T(0);
      }
      continue;
    }
    const int64_t pc = s * a.C + c;
    const T* lqc = a.lq + c * a.n + a.j0;
    const T* yyc = a.yy + c * a.n + a.j0;
    const T xi = a.xx[i];
    T t, kap;
    T z;
    if (mode == RowMode::Lse || mode == RowMode::LseW || mode == RowMode::Fit) {
      // online log-sum-exp over this lane's columns, one exp per value, the sum in double
      T mx = ninf<T>();
      double l = 0.0;
      for (int64_t j = lane; j < a.k; j += 32)
        lse_push(mx, l, score_of(row[j], xi, yyc[j], lqc[j], a.alpha, a.euclid, a.folded, &t, &kap));
      warp_lse(mx, l);
      z = lse_finish(mx, l);
      if (mode == RowMode::Lse) {
        if (lane == 0) a.logz[pc] = a.first ? z : log_add(a.logz[pc], z);
        continue;
      }
      if (lane == 0) a.logz[pc] = z;
    } else {
      z = a.logz[pc];
    }
    const T cf = a.coef[pc];
    if (mode == RowMode::Fit || mode == RowMode::Eta) {
      const T v = z == ninf<T>() ? ninf<T>() : ::log(cf) - z;
      for (int64_t j = lane; j < a.k; j += 32) {
        score_of(row[j], xi, yyc[j], lqc[j], a.alpha, a.euclid, a.folded, &t, &kap);
        row[j] = t + v;
      }
      continue;
    }
    if (cf == T(0) || z == ninf<T>()) {
      for (int64_t j = lane; j < a.k; j += 32) {
        row[j] = T(0);
        if (prow) prow[j] = T(0);
      }
      continue;
    }
    double rs = 0.0;  // in double: see the header
    for (int64_t j = lane; j < a.k; j += 32) {
      const T sc = score_of(row[j], xi, yyc[j], lqc[j], a.alpha, a.euclid, a.folded, &t, &kap);
      const T p = cf * ::exp(sc - z);
      const T w = kap * p;
      if (prow) prow[j] = p;
      row[j] = w;
      rs += double(w);
    }
    rs = warp_sum(rs);
    if (lane == 0 && a.rowsum) a.rowsum[pc] += static_cast<T>(rs);
  }
}

void rows_cuda(const RowArgs& r) {
  const int64_t slots = r.sl.count();
  if (slots == 0 || r.k == 0) return;
  const c10::cuda::CUDAGuard guard(r.S.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(r.S.scalar_type(), "ccluster_rows_cuda", [&] {
    using T = scalar_t;
    RowK<T> k{r.S.data_ptr<T>(), r.P.defined() ? r.P.data_ptr<T>() : nullptr, r.xx.data_ptr<T>(),
              slots_view(r.sl), slots, r.g, r.k, r.j0, r.yy.data_ptr<T>(), r.lq.data_ptr<T>(), r.C, r.n,
              static_cast<T>(r.alpha), r.euclid, r.folded, r.first, static_cast<int>(r.mode),
              r.mask.defined() ? r.mask.data_ptr<bool>() : nullptr, r.logz.data_ptr<T>(),
              r.coef.defined() ? r.coef.data_ptr<T>() : nullptr,
              r.rowsum.defined() ? r.rowsum.data_ptr<T>() : nullptr};
    const int grid = occupancy_grid(rows_kernel<T>, kThreads, 0, (slots * r.g + kWarps - 1) / kWarps);
    rows_kernel<T><<<grid, kThreads, 0, stream>>>(k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------------
// cols

template <typename T>
struct ColK {
  const T* S;
  SlotsView sv;
  int64_t nb, rows, g, k, j0, n;
  bool lse;
  T* acc;
  T* acc2;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) cols_kernel(ColK<T> a) {
  __shared__ T sm[kWarps][33];
  __shared__ T sl[kWarps][33];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t ld = a.g * a.k;
  const int64_t tiles = (ld + 31) / 32;
  for (int64_t b = blockIdx.x; b < a.nb * tiles; b += gridDim.x) {
    const int64_t blk = b / tiles, q = (b % tiles) * 32 + lane;
    const T* Sb = a.S + blk * a.rows * ld;
    T m = a.lse ? ninf<T>() : T(0), l = T(0);
    if (q < ld) {
      for (int64_t r = w; r < a.rows; r += kWarps) {
        const T v = Sb[r * ld + q];
        if (!a.lse) m += v;
        else lse_push(m, l, v);
      }
    }
    sm[w][lane] = m;
    sl[w][lane] = l;
    __syncthreads();
    if (w == 0 && q < ld) {
      T tm = sm[0][lane], tl = sl[0][lane];
      for (int x = 1; x < kWarps; ++x) {
        if (a.lse) lse_merge(tm, tl, sm[x][lane], sl[x][lane]);
        else tm += sm[x][lane];
      }
      const int64_t o = (a.sv.block_cls(blk) + q / a.k) * a.n + a.j0 + q % a.k;
      if (a.lse) lse_merge(a.acc[o], a.acc2[o], tm, tl);
      else a.acc[o] += tm;
    }
    __syncthreads();  // sm / sl are rewritten by the next tile
  }
}

void cols_cuda(const ColArgs& c) {
  if (c.sl.count() == 0 || c.k == 0) return;
  const c10::cuda::CUDAGuard guard(c.S.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(c.S.scalar_type(), "ccluster_cols_cuda", [&] {
    using T = scalar_t;
    ColK<T> k{c.S.data_ptr<T>(), slots_view(c.sl), c.sl.nb, c.sl.rows, c.g, c.k, c.j0, c.n, c.lse,
              c.acc.data_ptr<T>(), c.acc2.defined() ? c.acc2.data_ptr<T>() : nullptr};
    const int64_t units = k.nb * ((c.g * c.k + 31) / 32);
    const int grid = occupancy_grid(cols_kernel<T>, kThreads, 0, units);
    cols_kernel<T><<<grid, kThreads, 0, stream>>>(k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------------
// scatter

template <typename T>
struct ScK {
  T* dst;
  const T* src;
  int64_t m, Rmax, r0, rows, runs;
  const int64_t* sorted_rows;
  const int64_t* order;
  const int64_t* run_begin;
  T scale;
};

constexpr int kScatterThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kScatterThreads) scatter_kernel(ScK<T> a) {
  for (int64_t u = blockIdx.x; u < a.runs; u += gridDim.x) {
    const int64_t e0 = a.run_begin[u], e1 = a.run_begin[u + 1];
    T* dr = a.dst + a.sorted_rows[e0] * a.m;
    for (int64_t f = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; f < a.m; f += int64_t(gridDim.y) * blockDim.x) {
      T sum = T(0);
      bool any = false;
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t p = a.order[e], cls = p / a.Rmax, i = p % a.Rmax - a.r0;
        if (i < 0 || i >= a.rows) continue;
        sum += a.src[(cls * a.rows + i) * a.m + f];
        any = true;
      }
      if (any) dr[f] += a.scale * sum;
    }
  }
}

void scatter_cuda(const ScatterArgs& s) {
  const int64_t runs = s.run_begin.numel() - 1;
  if (s.rows == 0 || runs <= 0 || s.dst.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(s.dst.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(s.dst.scalar_type(), "ccluster_scatter_cuda", [&] {
    using T = scalar_t;
    ScK<T> k{s.dst.data_ptr<T>(), s.src.data_ptr<T>(), s.dst.size(1), s.Rmax, s.r0, s.rows, runs,
             s.sorted_rows.data_ptr<int64_t>(), s.order.data_ptr<int64_t>(), s.run_begin.data_ptr<int64_t>(),
             static_cast<T>(s.scale)};
    const int64_t ftiles = std::min<int64_t>((k.m + kScatterThreads - 1) / kScatterThreads, 65535);
    const int gx = occupancy_grid(scatter_kernel<T>, kScatterThreads, 0, runs);
    scatter_kernel<T><<<dim3(gx, static_cast<unsigned>(ftiles)), kScatterThreads, 0, stream>>>(k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------------
// row terms

template <typename scalar_t, typename T>
struct RowTermK {
  T* dst;
  const scalar_t* src;
  int64_t st0, st1, m, rows;
  const T* w;
  T scale;
};

template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads) row_terms_kernel(RowTermK<scalar_t, T> a) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = int64_t(gridDim.x) * kWarps;
  for (int64_t r = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); r < a.rows; r += stride) {
    const T wr = a.w[r];
    if (wr == T(0)) continue;  // uniform over the warp: the row is left as it is, src not read
    const T f = a.scale * wr;
    const scalar_t* sr = a.src + r * a.st0;
    T* dr = a.dst + r * a.m;
    for (int64_t k = lane; k < a.m; k += 32) dr[k] += f * static_cast<T>(sr[k * a.st1]);
  }
}

void row_terms_cuda(const library::RowTermArgs& t) {
  if (t.dst.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(t.dst.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.src.scalar_type(), "ccluster_row_terms_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    TORCH_INTERNAL_ASSERT(t.dst.scalar_type() == c10::CppTypeToScalarType<T>::value &&
                          t.w.scalar_type() == t.dst.scalar_type() && t.dst.is_contiguous() && t.w.is_contiguous());
    RowTermK<scalar_t, T> k{t.dst.data_ptr<T>(), t.src.data_ptr<scalar_t>(), t.src.stride(0), t.src.stride(1),
                            t.dst.size(1), t.dst.size(0), t.w.data_ptr<T>(), static_cast<T>(t.scale)};
    const int grid = occupancy_grid(row_terms_kernel<scalar_t, T>, kThreads, 0, (k.rows + kWarps - 1) / kWarps);
    row_terms_kernel<scalar_t, T><<<grid, kThreads, 0, stream>>>(k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

bool capturing_cuda() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

const library::Epilogues kCuda{&gather_cuda, &rows_cuda, &cols_cuda, &scatter_cuda, &row_terms_cuda,
                               &capturing_cuda};

struct Registrar {
  Registrar() { library::register_cuda_epilogues(&kCuda); }
} registrar;

}  // namespace
}  // namespace cuda
}  // namespace ccluster
