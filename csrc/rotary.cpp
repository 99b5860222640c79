// rotary: rotary position embedding of queries and keys in one pass, float32 CPU, registered as
// torch.ops.moee_fast.rotary.
//
// Why: transformers' families write RoPE as q * cos + rotate_half(q) * sin, a slice, a negation, a
// concatenation, two multiplies and an add, each a pass over q and k. Here each (text row, head)
// is read once and written once. The products and the sum are the same IEEE operations in the
// same order (x1*c - x2*s equals x1*c + (-x2)*s exactly), so results are bitwise equal to the
// families' function; the vector path spells out multiply and add so no FMA contracts them.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <tuple>

#include "vec_math.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")  // the scalar tail too: no fused multiply-add
#endif

namespace {

// y[i] = x[i] c[i] - x[h+i] s[i], y[h+i] = x[h+i] c[h+i] + x[i] s[h+i] for i < h (= D / 2).
void rotate_row(const float* x, const float* c, const float* s, float* y, int64_t h) {
  int64_t i = 0;
#ifdef MOEE_FAST_AVX2
  for (; i + 8 <= h; i += 8) {
    const __m256 x1 = _mm256_loadu_ps(x + i), x2 = _mm256_loadu_ps(x + h + i);
    const __m256 lo = _mm256_sub_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(c + i)), _mm256_mul_ps(x2, _mm256_loadu_ps(s + i)));
    const __m256 hi =
        _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(c + h + i)), _mm256_mul_ps(x1, _mm256_loadu_ps(s + h + i)));
    _mm256_storeu_ps(y + i, lo);
    _mm256_storeu_ps(y + h + i, hi);
  }
#endif
  for (; i < h; ++i) {
    const float x1 = x[i], x2 = x[h + i];
    const float lo = x1 * c[i] - x2 * s[i];
    const float hi = x2 * c[h + i] + x1 * s[h + i];
    y[i] = lo;
    y[h + i] = hi;
  }
}

void check_operand(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "rotary: ", name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == dim, "rotary: ", name, " must have ", dim, " dimensions, got ", t.sizes());
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "rotary: ", name, " must be contiguous in its last dimension");
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                          const at::Tensor& sin) {
  check_operand(q, "q [B, heads, N, D]", 4);
  check_operand(k, "k [B, kv_heads, N, D]", 4);
  check_operand(cos, "cos [B or 1, N, D]", 3);
  check_operand(sin, "sin [B or 1, N, D]", 3);
  const int64_t B = q.size(0), N = q.size(2), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(2) == N && k.size(3) == D, "rotary: k ", k.sizes(), " does not match q ", q.sizes());
  TORCH_CHECK(cos.sizes() == sin.sizes() && (cos.size(0) == B || cos.size(0) == 1) && cos.size(1) == N && cos.size(2) == D,
              "rotary: cos and sin must both be [", B, " or 1, ", N, ", ", D, "], got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(D % 2 == 0, "rotary: the head dimension must be even, got ", D);
  // Outputs keep the inputs' memory layout (a transposed [B, N, heads, D] stays one).
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  if (q.numel() == 0 && k.numel() == 0) return {q_out, k_out};
  const int64_t half = D / 2, cos_batch_stride = cos.size(0) == 1 ? 0 : cos.stride(0),
                sin_batch_stride = sin.size(0) == 1 ? 0 : sin.stride(0);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  struct Operand {
    const float* in;
    float* out;
    int64_t heads, in_stride[3], out_stride[3];
  };
  const Operand operands[2] = {
      {q.data_ptr<float>(), q_out.data_ptr<float>(), q.size(1), {q.stride(0), q.stride(1), q.stride(2)},
       {q_out.stride(0), q_out.stride(1), q_out.stride(2)}},
      {k.data_ptr<float>(), k_out.data_ptr<float>(), k.size(1), {k.stride(0), k.stride(1), k.stride(2)},
       {k_out.stride(0), k_out.stride(1), k_out.stride(2)}},
  };
  const int64_t heads = q.size(1) + k.size(1);
  at::parallel_for(0, B * N, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, heads * D)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N, n = row % N;
      const float* c = cp + b * cos_batch_stride + n * cos.stride(1);
      const float* s = sp + b * sin_batch_stride + n * sin.stride(1);
      for (const Operand& t : operands)
        for (int64_t h = 0; h < t.heads; ++h)
          rotate_row(t.in + b * t.in_stride[0] + h * t.in_stride[1] + n * t.in_stride[2], c, s,
                     t.out + b * t.out_stride[0] + h * t.out_stride[1] + n * t.out_stride[2], half);
    }
  });
  return {q_out, k_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moee_fast, m) {
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moee_fast, CPU, m) {
  m.impl("rotary", &rotary);
}
