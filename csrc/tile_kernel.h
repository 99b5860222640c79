// The register tiles every C++ GEMM-like loop here is built on (AVX2 + FMA builds only). Each has an
// AVX-512 twin, chosen at run time on CPUs that have it, that gives bitwise the same results.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "vec_math.h"

#ifdef MOEE_FAST_AVX2
namespace moee_fast {

// c[r][0:16] = row_scale[r] * sum_{k < kc} a[r][k] * b[k][0:16] (+ c[r][0:16] when accumulate)
// for r < rows <= MR. a rows are `lda` apart and read one element at a time (broadcast), b rows
// `ldb` apart and read sixteen at a time, c rows `ldc` apart; row_scale may be null (1). MR x 2
// accumulators stay in registers (MR <= 6 leaves room for the two b vectors and a broadcast);
// rows past `rows` repeat the last row and are not stored.
template <int MR>
inline void tile_x16_avx2(const float* a, int64_t lda, int64_t rows, const float* b, int64_t ldb, int64_t kc, float* c,
                          int64_t ldc, bool accumulate, const float* row_scale) {
  static_assert(MR >= 1 && MR <= 6, "MR x 2 accumulators must fit the 16 vector registers");
  const float* ar[MR];
  __m256 lo[MR], hi[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    ar[r] = a + (r < rows ? r : rows - 1) * lda;
    lo[r] = hi[r] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k, b += ldb) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 x = _mm256_broadcast_ss(ar[r] + k);
      lo[r] = _mm256_fmadd_ps(x, b0, lo[r]);
      hi[r] = _mm256_fmadd_ps(x, b1, hi[r]);
    }
  }
  // Through memory, so lo/hi are only ever indexed by unrolled constants and stay in registers
  // (indexed by the runtime `r` below, GCC would spill them inside the k loop).
  alignas(32) float tile[MR][16];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(tile[r], lo[r]);
    _mm256_store_ps(tile[r] + 8, hi[r]);
  }
  for (int r = 0; r < rows; ++r) {
    __m256 l = _mm256_load_ps(tile[r]), h = _mm256_load_ps(tile[r] + 8);
    if (row_scale) {
      const __m256 s = _mm256_set1_ps(row_scale[r]);
      l = _mm256_mul_ps(l, s), h = _mm256_mul_ps(h, s);
    }
    float* cr = c + r * ldc;
    if (accumulate) l = _mm256_add_ps(l, _mm256_loadu_ps(cr)), h = _mm256_add_ps(h, _mm256_loadu_ps(cr + 8));
    _mm256_storeu_ps(cr, l);
    _mm256_storeu_ps(cr + 8, h);
  }
}

// ---- AVX-512, chosen at run time on CPUs that have it ----------------------------------------
#define MOEE_FAST_AVX512 __attribute__((target("avx512f")))

enum class CpuIsa : int { avx2 = 0, avx512 = 1 };

inline bool cpu_has_avx512() { return __builtin_cpu_supports("avx512f"); }

// The tiles in use: AVX-512 where the CPU (and OS) has it, unless MOEE_FAST_CPU_ISA=avx2.
inline std::atomic<int>& active_isa() {
  static std::atomic<int> isa{[] {
    const char* forced = std::getenv("MOEE_FAST_CPU_ISA");
    const bool avx2_only = forced && std::string(forced) == "avx2";
    return static_cast<int>(cpu_has_avx512() && !avx2_only ? CpuIsa::avx512 : CpuIsa::avx2);
  }()};
  return isa;
}

// GEMMs on panels: y = x W^T with the activations x packed k-major in panels of 16 rows
// ([K][16]: one vector pair per k), so a tile_x16 multiplies 6 rows of W, read in place from the
// [out, in] weight matrix, by one panel. Packing x is a transposing copy (free where x is gathered
// anyway); BLAS would pack W instead, on every call.
constexpr int64_t kNR = 16;   // rows of x per panel
constexpr int64_t kMR = 6;    // rows of W per register tile
constexpr int64_t kKC = 256;  // reduction block: a tile's 6 weight rows stay in L1 across panels

// The AVX-512 tile: 16 columns of b fill one zmm register, so a tile holds MR rows of a x NP
// column blocks in MR*NP accumulators. For the panel GEMM, 12 x 2 (24 of the 32 registers) ran
// 160-174 GFLOP/s per core on this project's GEMM shapes, against 136-172 for 8 x 3 and 146-151
// for 6 x 4, and took the 2-panel case best: twice the FLOPs per instruction of the AVX2 tile
// (on a core with full-width AVX-512 FMAs, 179 GFLOP/s peak; on one that runs AVX-512 on 256-bit
// units, 116 GFLOP/s peak, the same tile runs 93-102: benchmarks/results/cpu_ceiling_*.md).
// Every c element is the same FMA chain over k as in tile_x16_avx2, then the same scaling and
// accumulation, so the two give bitwise the same result and which one runs never changes an
// embedding.
//
// c[j][r][0:16] = row_scale[r] * sum_{k < kc} a[r][k] * b[j][k][0:16] (+ c[j][r][0:16] when
// accumulate) for r < rows <= MR, j < NP: a rows `lda` apart, b's k rows `ldb` apart and blocks
// `b_block` apart, c rows `ldc` apart and blocks `c_block` apart; row_scale may be null (1). Rows
// past `rows` repeat the last row and are not stored.
template <int MR, int NP>
MOEE_FAST_AVX512 inline void tile_panels_512(const float* a, int64_t lda, int64_t rows, const float* b, int64_t ldb,
                                             int64_t b_block, int64_t kc, float* c, int64_t ldc, int64_t c_block,
                                             bool accumulate, const float* row_scale) {
  const float* ar[MR];
  __m512 acc[MR][NP];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    ar[r] = a + (r < rows ? r : rows - 1) * lda;
#pragma GCC unroll 3
    for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k, b += ldb) {
    __m512 bv[NP];
#pragma GCC unroll 3
    for (int j = 0; j < NP; ++j) bv[j] = _mm512_loadu_ps(b + j * b_block);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(ar[r][k]);
#pragma GCC unroll 3
      for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_fmadd_ps(x, bv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if (r >= rows) break;
#pragma GCC unroll 3
    for (int j = 0; j < NP; ++j) {
      __m512 v = row_scale ? _mm512_mul_ps(acc[r][j], _mm512_set1_ps(row_scale[r])) : acc[r][j];
      float* cr = c + j * c_block + r * ldc;
      if (accumulate) v = _mm512_add_ps(v, _mm512_loadu_ps(cr));
      _mm512_storeu_ps(cr, v);
    }
  }
}

// tile_x16_avx2's contract, on the tiles the CPU runs best.
template <int MR>
inline void tile_x16(const float* a, int64_t lda, int64_t rows, const float* b, int64_t ldb, int64_t kc, float* c,
                     int64_t ldc, bool accumulate = false, const float* row_scale = nullptr) {
  if (active_isa().load(std::memory_order_relaxed) == static_cast<int>(CpuIsa::avx512))
    tile_panels_512<MR, 1>(a, lda, rows, b, ldb, 0, kc, c, ldc, 0, accumulate, row_scale);  // one zmm per row
  else
    tile_x16_avx2<MR>(a, lda, rows, b, ldb, kc, c, ldc, accumulate, row_scale);
}

MOEE_FAST_AVX512 inline void gemm_panels_512(const float* W, int64_t M, int64_t K, const float* B, int64_t b_stride,
                                             int64_t panels, float* C) {
  constexpr int64_t MR = 12;
  const int64_t c_panel = M * kNR;
  for (int64_t kb = 0; kb < K; kb += kKC) {
    const int64_t kc = std::min(kKC, K - kb);
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const float* a = W + m0 * K + kb;
      const int64_t rows = std::min(MR, M - m0);
      int64_t p = 0;
      for (; p + 2 <= panels; p += 2)
        tile_panels_512<MR, 2>(a, K, rows, B + p * b_stride + kb * kNR, kNR, b_stride, kc, C + p * c_panel + m0 * kNR, kNR,
                               c_panel, kb > 0, nullptr);
      if (p < panels)
        tile_panels_512<MR, 1>(a, K, rows, B + p * b_stride + kb * kNR, kNR, b_stride, kc, C + p * c_panel + m0 * kNR, kNR,
                               c_panel, kb > 0, nullptr);
    }
  }
}

// C[p][m][0:16] = sum_k W[m][k] * B[p][k][0:16] for p < panels, m < M; W is [M, K] row-major,
// B panels `b_stride` floats apart, C panels M * 16 floats apart.
inline void gemm_panels(const float* W, int64_t M, int64_t K, const float* B, int64_t b_stride, int64_t panels, float* C) {
  if (active_isa().load(std::memory_order_relaxed) == static_cast<int>(CpuIsa::avx512))
    return gemm_panels_512(W, M, K, B, b_stride, panels, C);
  for (int64_t kb = 0; kb < K; kb += kKC) {
    const int64_t kc = std::min(kKC, K - kb);
    for (int64_t m0 = 0; m0 < M; m0 += kMR)
      for (int64_t p = 0; p < panels; ++p)
        tile_x16_avx2<kMR>(W + m0 * K + kb, K, std::min(kMR, M - m0), B + p * b_stride + kb * kNR, kNR, kc,
                           C + p * M * kNR + m0 * kNR, kNR, kb > 0, nullptr);
  }
}

// B[p][k][t] = src[p * 16 + t][k] for k < K, zero for tokens past n (the panel's padding lanes).
inline void pack_panels(const float* const* src, int64_t n, int64_t K, float* B) {
  for (int64_t p = 0; p * kNR < n; ++p) {
    float* panel = B + p * K * kNR;
    for (int64_t t0 = 0; t0 < kNR; t0 += 8) {
      const float* rows[8];
      for (int i = 0; i < 8; ++i) rows[i] = p * kNR + t0 + i < n ? src[p * kNR + t0 + i] : nullptr;
      int64_t k0 = 0;
      for (; k0 + 8 <= K; k0 += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = rows[i] ? _mm256_loadu_ps(rows[i] + k0) : _mm256_setzero_ps();
        transpose8x8(r);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(panel + (k0 + i) * kNR + t0, r[i]);
      }
      for (; k0 < K; ++k0)
        for (int i = 0; i < 8; ++i) panel[k0 * kNR + t0 + i] = rows[i] ? rows[i][k0] : 0.f;
    }
  }
}

// dst[p * 16 + t][m] = C[p][m][t] for the n real tokens; dst rows `ld` apart.
inline void unpack_panels(const float* C, int64_t M, int64_t n, float* dst, int64_t ld) {
  for (int64_t p = 0; p * kNR < n; ++p) {
    const float* panel = C + p * M * kNR;
    for (int64_t t0 = 0; t0 < kNR && p * kNR + t0 < n; t0 += 8) {
      const int64_t valid = std::min<int64_t>(8, n - p * kNR - t0);
      float* out = dst + (p * kNR + t0) * ld;
      int64_t m0 = 0;
      for (; m0 + 8 <= M; m0 += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(panel + (m0 + i) * kNR + t0);
        transpose8x8(r);
        for (int64_t i = 0; i < valid; ++i) _mm256_storeu_ps(out + i * ld + m0, r[i]);
      }
      for (; m0 < M; ++m0)
        for (int64_t i = 0; i < valid; ++i) out[i * ld + m0] = panel[m0 * kNR + t0 + i];
    }
  }
}

}  // namespace moee_fast
#endif
