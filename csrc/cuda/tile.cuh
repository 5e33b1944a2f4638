// The CUDA tile engine shared by every op: per-class row lists built on the device, squared norms, and
// one SIMT distance-tile routine that every kernel runs in its K-loop.
//
// Tiling. A thread block of 256 threads (16 x 16) owns a 64 x 64 tile of (rows of x) x (exemplars of one
// class). The K-loop over the feature dimension m stages a [BK x 64] slice of each side in shared memory
// (converted to the accumulation type while it is loaded, so half/bfloat16 inputs are read once and never
// copied in global memory) and every thread accumulates a 4 x 4 register micro-tile of dot products:
// rows ty + 16 i and exemplars tx + 16 j (strided ownership: the shared reads are broadcasts or 16
// consecutive words, free of bank conflicts). Distances come from |x|^2 + |y|^2 - 2 x.y, clamped at 0,
// exactly as the CPU kernels (csrc/cpu/tile.h) compute them, in float32 (float64 for double inputs).
//
// Label sparsity. The rows of x that take part in class c are listed on the device (build_class_rows:
// a [C, N] int32 buffer, ascending within a class, and a count per class), so the work is proportional
// to the number of (row, class) pairs. Nothing depends on a count read back to the host: grids are sized
// from N and C and blocks skip the (class, row block) units that are empty, so every op can be captured
// in a CUDA graph.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "cuda/launch.cuh"
#include "numerics.h"
#include "ops/kernels.h"

namespace ccluster {
namespace cuda {

constexpr int kTile = 64;      // rows x exemplars per block tile (both sides)
constexpr int kThreads = 256;  // 16 x 16 threads, each a 4 x 4 micro-tile
constexpr int kPad = kTile + 1;

// K-slice depth: 16 for float; 8 for double so that the largest kernel stays within 48 KB of static
// shared memory.
template <typename T>
struct Cfg {
  static constexpr int BK = 16;
};
template <>
struct Cfg<double> {
  static constexpr int BK = 8;
};

// ---------------------------------------------------------------------------------------------------
// Device math: exp / log / sqrt of the accumulation type, accurate (no fast math): exp(-inf) = 0, NaN
// stays NaN. The online log-sum-exp, distances and kappa are those of csrc/numerics.h.

__device__ __forceinline__ float dexp(float v) { return ::expf(v); }
__device__ __forceinline__ double dexp(double v) { return ::exp(v); }

// ---------------------------------------------------------------------------------------------------
// Per-class row lists.

struct RowsView {
  const int* rows;   // [C, N]: class c's rows at c * N, ascending; nullptr = every row (dense)
  const int* count;  // [C]
  int N;
  __device__ __forceinline__ int cnt(int c) const { return rows ? count[c] : N; }
  __device__ __forceinline__ int row(int c, int i) const { return rows ? rows[int64_t(c) * N + i] : i; }
};

struct ClassRows {
  at::Tensor rows, count;  // undefined when dense
  int N = 0;
  RowsView view() const {
    return RowsView{rows.defined() ? rows.data_ptr<int>() : nullptr,
                    count.defined() ? count.data_ptr<int>() : nullptr, N};
  }
};

// From a [C, N] contiguous bool mask (the transposed pairs): the rows of every class, on the current
// stream, without a host sync. Defined in rows.cu.
ClassRows build_class_rows(const at::Tensor& mask_t);
inline ClassRows dense_rows(int64_t N) {
  ClassRows cr;
  cr.N = static_cast<int>(N);
  return cr;
}

// Squared norms of the rows of a contiguous [R, m] tensor, in the accumulation type. Defined in rows.cu.
at::Tensor row_sqnorms(const at::Tensor& a2d, at::ScalarType acc);

// Inputs as the kernels read them: x and db contiguous in their own dtype (converted tile by tile), log_q
// and the squared norms in the accumulation type.
struct Inputs {
  at::Tensor x, db, log_q, xx, yy;
  int N, C, n, m;
};

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline Inputs prepare(const char* op, const at::Tensor& x, const at::Tensor& db, const at::Tensor& log_q) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(x.size(0) < kMax && x.size(1) < kMax && db.size(0) < kMax && db.size(1) < kMax, op,
              ": sizes beyond 2^31 are not supported by the CUDA kernels, got x ", x.sizes(), ", db ",
              db.sizes());
  TORCH_CHECK_VALUE(x.size(0) * db.size(0) < kMax, op, ": N * C must be < 2^31 for the CUDA kernels, got N=",
              x.size(0), ", C=", db.size(0));
  Inputs in;
  const auto t = acc_type(x.scalar_type());
  in.x = x.contiguous();
  in.db = db.contiguous();
  in.log_q = log_q.to(t).contiguous();
  in.N = static_cast<int>(x.size(0));
  in.C = static_cast<int>(db.size(0));
  in.n = static_cast<int>(db.size(1));
  in.m = static_cast<int>(db.size(2));
  in.xx = row_sqnorms(in.x, t);
  in.yy = row_sqnorms(in.db.view({int64_t(in.C) * in.n, in.m}), t).view({in.C, in.n});
  return in;
}

// Persistent grids are sized with the occupancy API (occupancy_grid, launch.cuh): as many blocks as stay
// resident for the kernel's registers and shared memory, never more than the units of work.

// ---------------------------------------------------------------------------------------------------
// The distance-tile K-loop.
//
// acc[i][j] = x[s_row[ty + 16 i]] . y[tx + 16 j] over the m features; rows with s_row = -1 and exemplars
// >= cols read as 0. `y` points at the tile's first exemplar (row-major [cols, m]). Starts and ends with
// every thread past a barrier on the shared slices, so callers may reuse as/bs right after.
//
// float16/bfloat16 inputs on sm_80+ take the tensor-core path (dot_tile_tc below); every other case the
// SIMT loop. Both accumulate in float32 and hand back the same per-thread layout, so the epilogues of the
// kernels do not know which one ran.

// The 16-bit element types as the WMMA API spells them.
template <typename scalar_t>
struct WmmaType {
  using type = void;
};
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Tensor-core tile: the 8 warps each compute a 16 x 32 part of the 64 x 64 tile with 16 x 16 x 16 WMMA
// products (float32 accumulators), over K-slices of 64 features staged in shared memory in the input
// dtype. The products of two 16-bit values are exact in float32, so the result equals the SIMT loop's up
// to the order of the float32 additions. The accumulators go through shared memory (the same bytes as
// the staged slices) to the SIMT layout.
constexpr int kTcK = 64;            // features per staged K-slice
constexpr int kTcLd = kTcK + 8;     // staged row stride in elements (16-byte multiple, skews the banks)
constexpr int kTcLdC = kTile + 4;   // accumulator row stride in floats
constexpr int kTcBytes = 2 * kTile * kTcLd * 2 > kTile * kTcLdC * 4 ? 2 * kTile * kTcLd * 2 : kTile * kTcLdC * 4;

template <typename scalar_t>
__device__ __forceinline__ void dot_tile_tc(const scalar_t* __restrict__ x, const int* s_row,
                                            const scalar_t* __restrict__ y, int cols, int m, float (&acc)[4][4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using E = typename WmmaType<scalar_t>::type;
  __shared__ __align__(128) unsigned char smem[kTcBytes];
  E* as = reinterpret_cast<E*>(smem);                // [kTile rows][kTcLd]: x rows, row-major
  E* bs = as + kTile * kTcLd;                          // [kTile cols][kTcLd]: exemplars = B column-major
  float* cs = reinterpret_cast<float*>(smem);          // [kTile][kTcLdC], after the K-loop
  const unsigned short* xb = reinterpret_cast<const unsigned short*>(x);  // raw 16-bit copies
  const unsigned short* yb = reinterpret_cast<const unsigned short*>(y);
  unsigned short* ab = reinterpret_cast<unsigned short*>(as);
  unsigned short* bb = reinterpret_cast<unsigned short*>(bs);
  const int tid = threadIdx.x, warp = tid >> 5, wr = warp >> 1, wc = warp & 1;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2];
  wmma::fill_fragment(c[0], 0.0f);
  wmma::fill_fragment(c[1], 0.0f);
  // 16-byte loads when every row starts 16-byte aligned (m % 8 == 0 and aligned bases)
  const bool vec = (m % 8 == 0) && (reinterpret_cast<uintptr_t>(x) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(y) % 16 == 0);
  __syncthreads();  // a previous call's readers of cs are done
  for (int k0 = 0; k0 < m; k0 += kTcK) {
    if (vec) {
      // 64 rows x 8 vectors of 8 elements per side: 2 vectors per thread per side
#pragma unroll
      for (int idx = tid; idx < kTile * (kTcK / 8); idx += kThreads) {
        const int r = idx / (kTcK / 8), k = (idx % (kTcK / 8)) * 8, kg = k0 + k;
        const int s = s_row[r];
        uint4 va = make_uint4(0, 0, 0, 0), vb = make_uint4(0, 0, 0, 0);
        if (s >= 0 && kg < m) va = *reinterpret_cast<const uint4*>(xb + int64_t(s) * m + kg);
        if (r < cols && kg < m) vb = *reinterpret_cast<const uint4*>(yb + int64_t(r) * m + kg);
        *reinterpret_cast<uint4*>(ab + r * kTcLd + k) = va;
        *reinterpret_cast<uint4*>(bb + r * kTcLd + k) = vb;
      }
    } else {
      for (int idx = tid; idx < kTile * kTcK; idx += kThreads) {
        const int r = idx / kTcK, k = idx % kTcK, kg = k0 + k;
        const int s = s_row[r];
        ab[r * kTcLd + k] = (s >= 0 && kg < m) ? xb[int64_t(s) * m + kg] : 0;  // 0 bits = +0.0
        bb[r * kTcLd + k] = (r < cols && kg < m) ? yb[int64_t(r) * m + kg] : 0;
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTcK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
      wmma::load_matrix_sync(a, as + (16 * wr) * kTcLd + kk, kTcLd);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> b;
        wmma::load_matrix_sync(b, bs + (32 * wc + 16 * f) * kTcLd + kk, kTcLd);
        wmma::mma_sync(c[f], a, b, c[f]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < 2; ++f)
    wmma::store_matrix_sync(cs + (16 * wr) * kTcLdC + 32 * wc + 16 * f, c[f], kTcLdC, wmma::mem_row_major);
  __syncthreads();
  const int tx = tid & 15, ty = tid >> 4;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = cs[(ty + 16 * i) * kTcLdC + tx + 16 * j];
  __syncthreads();  // cs aliases the staged slices of the next call
#endif
}

template <typename scalar_t, typename T, int BK>
__device__ __forceinline__ void dot_tile(const scalar_t* __restrict__ x, const int* s_row,
                                         const scalar_t* __restrict__ y, int cols, int m, T (&as)[BK][kPad],
                                         T (&bs)[BK][kPad], T (&acc)[4][4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (!std::is_void<typename WmmaType<scalar_t>::type>::value && std::is_same<T, float>::value) {
    dot_tile_tc<scalar_t>(x, s_row, y, cols, m, acc);
    return;
  }
#endif
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = T(0);
  for (int k0 = 0; k0 < m; k0 += BK) {
    // Each side is kTile x BK elements; consecutive threads read consecutive features of one row.
#pragma unroll
    for (int idx = tid; idx < kTile * BK; idx += kThreads) {
      const int r = idx / BK, k = idx % BK, kg = k0 + k;
      const int s = s_row[r];
      as[k][r] = (s >= 0 && kg < m) ? static_cast<T>(x[int64_t(s) * m + kg]) : T(0);
      bs[k][r] = (r < cols && kg < m) ? static_cast<T>(y[int64_t(r) * m + kg]) : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      T a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = as[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = bs[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
}

// Reductions over the 16 threads (tx = 0..15, one half-warp) that share a row of the tile.
template <typename T>
__device__ __forceinline__ T row_sum16(T v) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
template <typename T>
__device__ __forceinline__ T row_max16(T v) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) v = lse_max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
template <typename T>
__device__ __forceinline__ void row_lse16(T& mx, T& l) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) {
    const T m2 = __shfl_xor_sync(0xffffffffu, mx, off);
    const T l2 = __shfl_xor_sync(0xffffffffu, l, off);
    lse_merge(mx, l, m2, l2);
  }
}

}  // namespace cuda
}  // namespace ccluster
