// rms_norm: y = weight * (x * rsqrt(mean(x^2) + eps)) over the last dimension, float32, registered
// as torch.ops.moee_fast.rms_norm.
//
// Why: torch's CPU rms_norm runs as separate pow / mean / rsqrt / mul passes (five reads of the
// activations); this is one read and one write per row, rows split across threads. The two
// multiplies keep the order of the families' RMSNorm modules (normalise, then scale).
//
// add_rms_norm: a decoder layer's residual add and the norm after it in one pass, as
// torch.ops.moee_fast.add_rms_norm(x, residual, weight, eps): x becomes residual + x in place and
// the result is rms_norm(x). Each row is added, then normalised while it is still in L1, so the
// sum is written once and never re-read from memory, in one parallel region instead of two, with
// no new [N, H] tensor for the sum. Both results are bitwise those of `residual + x` followed by
// rms_norm: the add is one IEEE addition per element and the norm is the same row function.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <algorithm>
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

void check_norm_arguments(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.device().is_cpu() &&
                  weight.device().is_cpu(),
              op, ": x and weight must be float32 CPU tensors");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must be [", x.size(-1),
              "], got ", weight.sizes());
}

int64_t rows_per_task(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  check_norm_arguments("rms_norm", x_in, weight_in);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, rows_per_task(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_row(xp + r * n, wp, yp + r * n, n, e);
  });
  return y;
}

at::Tensor add_rms_norm(at::Tensor& x, const at::Tensor& residual_in, const at::Tensor& weight_in, double eps) {
  check_norm_arguments("add_rms_norm", x, weight_in);
  TORCH_CHECK(residual_in.scalar_type() == at::kFloat && residual_in.device().is_cpu() && residual_in.sizes() == x.sizes(),
              "add_rms_norm: residual must be a float32 CPU tensor of x's shape ", x.sizes(), ", got ",
              residual_in.scalar_type(), " ", residual_in.sizes());
  TORCH_CHECK(x.is_contiguous(), "add_rms_norm: x is written in place and must be contiguous");
  at::assert_no_partial_overlap(x, residual_in);  // the same tensor is fine: each element is read before written
  const at::Tensor residual = residual_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
  float* xp = x.data_ptr<float>();
  const float* rp = residual.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, rows_per_task(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = xp + r * n;
      const float* res = rp + r * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) row[j] = res[j] + row[j];
      rms_norm_row(row, wp, yp + r * n, n, e);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moee_fast, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) x, Tensor residual, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(moee_fast, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
}
