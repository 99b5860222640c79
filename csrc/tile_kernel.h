// The register tile every C++ GEMM-like loop here is built on (AVX2 + FMA builds only).
#pragma once

#include <cstdint>

#include "vec_math.h"

#ifdef MOEE_FAST_AVX2
namespace moee_fast {

// c[r][0:16] = row_scale[r] * sum_{k < kc} a[r][k] * b[k][0:16] (+ c[r][0:16] when accumulate)
// for r < rows <= MR. a rows are `lda` apart and read one element at a time (broadcast), b rows
// `ldb` apart and read sixteen at a time, c rows `ldc` apart; row_scale may be null (1). MR x 2
// accumulators stay in registers (MR <= 6 leaves room for the two b vectors and a broadcast);
// rows past `rows` repeat the last row and are not stored.
template <int MR>
inline void tile_x16(const float* a, int64_t lda, int64_t rows, const float* b, int64_t ldb, int64_t kc, float* c,
                     int64_t ldc, bool accumulate = false, const float* row_scale = nullptr) {
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

}  // namespace moee_fast
#endif
