// Vector math shared by the C++ ops: a clamped exp and the exp-and-sum pass of a softmax.
//
// exp is written out (x = n*ln2 + r, |r| <= ln2/2, degree-6 Taylor polynomial for exp(r) with
// relative error < 2e-7, 2^n built in the exponent bits) because std::exp is a scalar libm call,
// and with intrinsics because GCC's default -ftrapping-math keeps it from vectorising the clamp.
// Inputs are clamped to [-87, 88]: results stay finite and never 0.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MOEE_FAST_AVX2 1
#endif

namespace moee_fast {

constexpr float kLog2e = 1.44269504f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[7] = {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f};

inline float exp_clamped(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::nearbyint(x * kLog2e);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;  // n * kLn2Hi is exact
  float p = kExpPoly[0];
  for (int j = 1; j < 7; ++j) p = p * r + kExpPoly[j];
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#ifdef MOEE_FAST_AVX2
inline __m256 exp_clamped8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x));
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int j = 1; j < 7; ++j) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[j]));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// In place: r[i] becomes column i of the 8x8 block whose rows were r[0..7].
inline void transpose8x8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  // r[c] (c < 4) now holds column c of rows 0-3 in its low half and column c + 4 in its high half;
  // r[c + 4] the same for rows 4-7.
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm256_permute2f128_ps(r[c], r[c + 4], 0x20);
    t[c + 4] = _mm256_permute2f128_ps(r[c], r[c + 4], 0x31);
  }
  for (int c = 0; c < 8; ++c) r[c] = t[c];
}
#endif

// max over x[0:n] of x[j] * scale, for scale > 0.
inline float scaled_max(const float* x, int64_t n, float scale) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
#ifdef MOEE_FAST_AVX2
  __m256 acc = _mm256_set1_ps(m);
  for (; j + 8 <= n; j += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(x + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (float lane : lanes) m = std::max(m, lane);
  m *= scale;
#endif
  for (; j < n; ++j) m = std::max(m, x[j] * scale);
  return m;
}

// x[j] = exp(x[j] * scale - shift) for j in [0, n); returns their sum.
inline float exp_sum_inplace(float* x, int64_t n, float scale, float shift) {
  int64_t j = 0;
  float total = 0.f;
#ifdef MOEE_FAST_AVX2
  const __m256 s = _mm256_set1_ps(scale), b = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_clamped8(_mm256_fmsub_ps(_mm256_loadu_ps(x + j), s, b));
    _mm256_storeu_ps(x + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (float lane : lanes) total += lane;
#endif
  for (; j < n; ++j) {
    x[j] = exp_clamped(x[j] * scale - shift);
    total += x[j];
  }
  return total;
}

}  // namespace moee_fast
