// rms_norm: y = weight * (x * rsqrt(mean(x^2) + eps)) over the last dimension, float32, registered
// as torch.ops.moee_fast.rms_norm.
//
// Why: torch's CPU rms_norm runs as separate pow / mean / rsqrt / mul passes (five reads of the
// activations); this is one read and one write per row, rows split across threads. The two
// multiplies keep the order of the families' RMSNorm modules (normalise, then scale).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "vec_math.h"

namespace {

void rms_norm_row(const float* x, const float* w, float* y, int64_t n, float eps) {
  int64_t i = 0;
  float sum_sq = 0.f;
#ifdef MOEE_FAST_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    acc0 = _mm256_fmadd_ps(a, a, acc0);
    acc1 = _mm256_fmadd_ps(b, b, acc1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(acc0, acc1));
  for (float lane : lanes) sum_sq += lane;
#endif
  for (; i < n; ++i) sum_sq += x[i] * x[i];
  const float r = 1.f / std::sqrt(sum_sq / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] = w[j] * (x[j] * r);
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "rms_norm: x and weight must be float32 CPU tensors");
  TORCH_CHECK(x_in.dim() >= 1 && weight_in.dim() == 1 && weight_in.size(0) == x_in.size(-1),
              "rms_norm: weight must be [", x_in.size(-1), "], got ", weight_in.sizes());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_row(xp + r * n, wp, yp + r * n, n, e);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moee_fast, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(moee_fast, CPU, m) {
  m.impl("rms_norm", &rms_norm);
}
