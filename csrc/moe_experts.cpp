// Fused CPU forward of a MoE layer's routed experts (SiLU-gated, concatenated gate/up weights),
// registered as torch.ops.moee_fast.moe_experts.
//
// (token, slot) pairs are counting-sorted by expert, so each expert's rows form one contiguous block
// of a [T*k, H] buffer. Work items (an expert's rows, split into chunks of at most kChunkRows) are
// handed out largest first to the OpenMP threads; each thread gathers its rows, runs the gate/up GEMM
// single-threaded, applies w * SiLU(g) * u in place, and writes the down GEMM into its block of the
// buffer. Each token then sums its k rows in slot order. On AVX2 the GEMMs are this file's own
// register-tiled kernels (below), where a token's result depends on nothing but its own row; other
// builds call ATen's CPU matmul (BLAS inside a parallel region does not fork again).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "tile_kernel.h"
#include "vec_math.h"

namespace {

// Rows per work item: enough for the BLAS kernel to run near its peak, few enough that one item's
// activations stay in L2 and that the largest-first schedule can balance the threads. 64..512 and
// unsplit experts measured the same within the VM's noise (0.56-0.77 of the matmul peak).
constexpr int64_t kChunkRows = 256;

using moee_fast::exp_clamped;
#ifdef MOEE_FAST_AVX2
using moee_fast::exp_clamped8;
#endif

// act[r, i] = w[r] * SiLU(gu[r, i]) * gu[r, I + i], written over the gate half of gu (row stride 2I):
// g * up / (1 + exp(-g)), where for g < -87 the clamped exp leaves an error below 1e-35.
void gated_silu_rows(float* gu, const float* weight, int64_t rows, int64_t inter) {
  for (int64_t r = 0; r < rows; ++r) {
    float* gate = gu + r * 2 * inter;
    const float* up = gate + inter;
    const float w = weight[r];
    int64_t i = 0;
#ifdef MOEE_FAST_AVX2
    const __m256 one = _mm256_set1_ps(1.f), wv = _mm256_set1_ps(w), sign = _mm256_set1_ps(-0.f);
    for (; i + 8 <= inter; i += 8) {
      const __m256 g = _mm256_loadu_ps(gate + i);
      const __m256 den = _mm256_add_ps(one, exp_clamped8(_mm256_xor_ps(g, sign)));
      const __m256 num = _mm256_mul_ps(_mm256_mul_ps(wv, g), _mm256_loadu_ps(up + i));
      _mm256_storeu_ps(gate + i, _mm256_div_ps(num, den));
    }
#endif
    for (; i < inter; ++i) gate[i] = w * gate[i] * up[i] / (1.f + exp_clamped(-gate[i]));
  }
}

#ifdef MOEE_FAST_AVX2
// Our own GEMMs on AVX2, with the experts' weights read in place. A BLAS call on [rows, H] x
// [H, 2I]^T packs the weight operand on every call (its copies and beta scaling measured ~20% of
// this op); here the activations are packed instead, for free, while they are gathered: each
// panel of 16 tokens is stored k-major ([K][16]), so a 6 x 16 register tile multiplies 6 weight
// rows (broadcast, read straight from the [out, in] weight matrix) by one panel. Each token stays
// in its own vector lane with a fixed summation order, so its result does not depend on which
// tokens share its panel.
using moee_fast::kNR;
using moee_fast::gemm_panels;
using moee_fast::pack_panels;
using moee_fast::unpack_panels;

// act[i][t] = w[t] * SiLU(g[i][t]) * u[i][t] over panels [2I][16] (gate rows, then up rows),
// written over the gate rows.
void gated_silu_panels(float* gu, const float* weight, int64_t n, int64_t inter) {
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  for (int64_t p = 0; p * kNR < n; ++p) {
    float wt[kNR] = {0.f};
    for (int64_t t = 0; t < kNR && p * kNR + t < n; ++t) wt[t] = weight[p * kNR + t];
    const __m256 w0 = _mm256_loadu_ps(wt), w1 = _mm256_loadu_ps(wt + 8);
    float* gate = gu + p * 2 * inter * kNR;
    const float* up = gate + inter * kNR;
    for (int64_t i = 0; i < inter * kNR; i += kNR) {
      for (int h = 0; h < 2; ++h) {
        const __m256 g = _mm256_loadu_ps(gate + i + 8 * h);
        const __m256 den = _mm256_add_ps(one, exp_clamped8(_mm256_xor_ps(g, sign)));
        const __m256 num = _mm256_mul_ps(_mm256_mul_ps(h ? w1 : w0, g), _mm256_loadu_ps(up + i + 8 * h));
        _mm256_storeu_ps(gate + i + 8 * h, _mm256_div_ps(num, den));
      }
    }
  }
}
#endif

at::Tensor& moe_experts_out(const at::Tensor& hidden_in, const at::Tensor& top_k_index_in,
                            const at::Tensor& top_k_weights_in, const at::Tensor& gate_up_in, const at::Tensor& down_in,
                            at::Tensor& out) {
  TORCH_CHECK(hidden_in.device().is_cpu() && hidden_in.scalar_type() == at::kFloat && hidden_in.dim() == 2,
              "moe_experts: hidden must be a float32 CPU [T, H] matrix");
  TORCH_CHECK(gate_up_in.scalar_type() == at::kFloat && down_in.scalar_type() == at::kFloat && gate_up_in.dim() == 3 &&
                  down_in.dim() == 3 && gate_up_in.device().is_cpu() && down_in.device().is_cpu(),
              "moe_experts: gate_up_proj [E, 2I, H] and down_proj [E, H, I] must be float32 CPU tensors");
  const int64_t T = hidden_in.size(0), H = hidden_in.size(1);
  const int64_t E = gate_up_in.size(0), I = gate_up_in.size(1) / 2;
  TORCH_CHECK(gate_up_in.size(1) == 2 * I && gate_up_in.size(2) == H, "moe_experts: gate_up_proj must be [E, 2I, H]");
  TORCH_CHECK(down_in.size(0) == E && down_in.size(1) == H && down_in.size(2) == I, "moe_experts: down_proj must be [E, H, I]");
  TORCH_CHECK(top_k_index_in.dim() == 2 && top_k_index_in.size(0) == T && top_k_weights_in.sizes() == top_k_index_in.sizes(),
              "moe_experts: top_k_index and top_k_weights must both be [T, k]");
  TORCH_CHECK(at::isIntegralType(top_k_index_in.scalar_type(), false) && at::isFloatingType(top_k_weights_in.scalar_type()),
              "moe_experts: top_k_index must be integer and top_k_weights floating point");
  const int64_t k = top_k_index_in.size(1);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.sizes() == hidden_in.sizes(),
              "moe_experts: out must be a contiguous float32 CPU tensor shaped like hidden");
  if (T == 0 || H == 0) return out;
  if (k == 0 || I == 0) return out.zero_();

  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor gate_up = gate_up_in.contiguous();
  const at::Tensor down = down_in.contiguous();
  const at::Tensor index = top_k_index_in.to(at::kLong).contiguous();
  const at::Tensor weights = top_k_weights_in.to(at::kFloat).contiguous();
  const int64_t P = T * k;
  const int64_t* expert_of = index.data_ptr<int64_t>();
  const float* weight_of = weights.data_ptr<float>();

  // Counting sort of the pairs by expert (stable: pairs keep token order within an expert).
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = expert_of[p];
    TORCH_CHECK(e >= 0 && e < E, "moe_experts: expert index ", e, " out of range [0, ", E, ")");
    ++start[e + 1];
  }
  std::partial_sum(start.begin(), start.end(), start.begin());
  std::vector<int64_t> pair_at(P), row_of_pair(P);
  std::vector<float> weight_at(P);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < P; ++p) {
      const int64_t row = fill[expert_of[p]]++;
      pair_at[row] = p;
      row_of_pair[p] = row;
      weight_at[row] = weight_of[p];
    }
  }

  struct Item {
    int64_t expert, begin, end;
  };
  std::vector<Item> items;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = start[e + 1] - start[e];
    // Equal chunks rather than full ones plus a remainder: fewer tiny GEMMs.
    const int64_t pieces = (n + kChunkRows - 1) / kChunkRows;
    for (int64_t c = 0; c < pieces; ++c)
      items.push_back({e, start[e] + n * c / pieces, start[e] + n * (c + 1) / pieces});
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.end - a.begin > b.end - b.begin; });

  // Every row of `rows_out` belongs to exactly one expert's block, so no initialisation is needed.
  at::Tensor rows_out = at::empty({P, H}, hidden.options());
  float* rows_ptr = rows_out.data_ptr<float>();
  const float* hidden_ptr = hidden.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const float* gate_up_ptr = gate_up.data_ptr<float>();
  const float* down_ptr = down.data_ptr<float>();
  const int64_t max_rows = std::min(kChunkRows, P);
  const int n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items.size())));
  std::atomic<int64_t> next{0};

  std::exception_ptr error;
  const at::ThreadLocalState caller_state;  // inference mode and friends, for the worker threads

#pragma omp parallel num_threads(n_threads)
  {
    try {
      const at::ThreadLocalStateGuard state_guard(caller_state);
#ifdef MOEE_FAST_AVX2
      // Thread-local panels: gathered activations, then [g | u], then the down projection.
      const int64_t max_panels = (max_rows + kNR - 1) / kNR;
      std::vector<float> x_panels(max_panels * H * kNR), gu_panels(max_panels * 2 * I * kNR),
          y_panels(max_panels * H * kNR);
      std::vector<const float*> src(max_rows);
      for (int64_t it; (it = next.fetch_add(1, std::memory_order_relaxed)) < static_cast<int64_t>(items.size());) {
        const Item item = items[it];
        const int64_t n = item.end - item.begin, panels = (n + kNR - 1) / kNR;
        for (int64_t r = 0; r < n; ++r) src[r] = hidden_ptr + (pair_at[item.begin + r] / k) * H;
        pack_panels(src.data(), n, H, x_panels.data());
        gemm_panels(gate_up_ptr + item.expert * 2 * I * H, 2 * I, H, x_panels.data(), H * kNR, panels, gu_panels.data());
        gated_silu_panels(gu_panels.data(), weight_at.data() + item.begin, n, I);
        gemm_panels(down_ptr + item.expert * H * I, H, I, gu_panels.data(), 2 * I * kNR, panels, y_panels.data());
        unpack_panels(y_panels.data(), H, n, rows_ptr + item.begin * H, H);
      }
#else
      // Thread-local scratch: gathered rows, then [g | u]. The GEMMs call the CPU kernel directly
      // (no dispatcher, no autograd: this op has no backward).
      at::Tensor x = at::empty({max_rows, H}, hidden.options());
      at::Tensor gu = at::empty({max_rows, 2 * I}, hidden.options());
      float* x_ptr = x.data_ptr<float>();
      for (int64_t it; (it = next.fetch_add(1, std::memory_order_relaxed)) < static_cast<int64_t>(items.size());) {
        const Item item = items[it];
        const int64_t n = item.end - item.begin;
        for (int64_t r = 0; r < n; ++r)
          std::memcpy(x_ptr + r * H, hidden_ptr + (pair_at[item.begin + r] / k) * H, H * sizeof(float));
        at::Tensor gu_rows = gu.narrow(0, 0, n);
        at::cpu::mm_out(gu_rows, x.narrow(0, 0, n), gate_up[item.expert].t());
        gated_silu_rows(gu_rows.data_ptr<float>(), weight_at.data() + item.begin, n, I);
        at::Tensor y = rows_out.narrow(0, item.begin, n);
        at::cpu::mm_out(y, gu_rows.narrow(1, 0, I), down[item.expert].t());
      }
#endif
    } catch (...) {  // an exception must not leave an OpenMP region: keep the first, stop handing out work
#pragma omp critical(moe_experts_error)
      if (!error) error = std::current_exception();
      next.store(static_cast<int64_t>(items.size()));
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      float* dst = out_ptr + t * H;
      std::memcpy(dst, rows_ptr + row_of_pair[t * k] * H, H * sizeof(float));
      for (int64_t s = 1; s < k; ++s) {
        const float* src = rows_ptr + row_of_pair[t * k + s] * H;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) dst[h] += src[h];
      }
    }
  }
  if (error) std::rethrow_exception(error);
  return out;
}

at::Tensor moe_experts(const at::Tensor& hidden, const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                       const at::Tensor& gate_up, const at::Tensor& down) {
  at::Tensor out = at::empty(hidden.sizes(), hidden.options().dtype(at::kFloat));
  return moe_experts_out(hidden, top_k_index, top_k_weights, gate_up, down, out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moee_fast, m) {
  m.def("moe_experts(Tensor hidden, Tensor top_k_index, Tensor top_k_weights, Tensor gate_up_proj, Tensor down_proj) -> Tensor");
  m.def(
      "moe_experts.out(Tensor hidden, Tensor top_k_index, Tensor top_k_weights, Tensor gate_up_proj, Tensor down_proj, *,"
      " Tensor(a!) out) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(moee_fast, CPU, m) {
  m.impl("moe_experts", &moe_experts);
  m.impl("moe_experts.out", &moe_experts_out);
}
