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

struct Shapes {
  int64_t T, H, E, I, k;  // tokens, hidden size, experts, expert width, experts per token
};

Shapes check_arguments(const at::Tensor& hidden, const at::Tensor& top_k_index, const at::Tensor& top_k_weights,
                       const at::Tensor& gate_up, const at::Tensor& down, const at::Tensor& out) {
  TORCH_CHECK(hidden.device().is_cpu() && hidden.scalar_type() == at::kFloat && hidden.dim() == 2,
              "moe_experts: hidden must be a float32 CPU [T, H] matrix");
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat && down.scalar_type() == at::kFloat && gate_up.dim() == 3 &&
                  down.dim() == 3 && gate_up.device().is_cpu() && down.device().is_cpu(),
              "moe_experts: gate_up_proj [E, 2I, H] and down_proj [E, H, I] must be float32 CPU tensors");
  const int64_t T = hidden.size(0), H = hidden.size(1);
  const int64_t E = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) == 2 * I && gate_up.size(2) == H, "moe_experts: gate_up_proj must be [E, 2I, H]");
  TORCH_CHECK(down.size(0) == E && down.size(1) == H && down.size(2) == I, "moe_experts: down_proj must be [E, H, I]");
  TORCH_CHECK(top_k_index.dim() == 2 && top_k_index.size(0) == T && top_k_weights.sizes() == top_k_index.sizes(),
              "moe_experts: top_k_index and top_k_weights must both be [T, k]");
  TORCH_CHECK(at::isIntegralType(top_k_index.scalar_type(), false) && at::isFloatingType(top_k_weights.scalar_type()),
              "moe_experts: top_k_index must be integer and top_k_weights floating point");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.sizes() == hidden.sizes(),
              "moe_experts: out must be a contiguous float32 CPU tensor shaped like hidden");
  return {T, H, E, I, top_k_index.size(1)};
}

// The (token, slot) pairs counting-sorted by expert (stable: pairs keep token order within an
// expert), so each expert's rows form one contiguous block [start[e], start[e + 1]).
struct SortedPairs {
  std::vector<int64_t> start;        // [E + 1]
  std::vector<int64_t> pair_at;      // row -> pair (token * k + slot)
  std::vector<int64_t> row_of_pair;  // pair -> row
  std::vector<float> weight_at;      // row -> the pair's routing weight
};

SortedPairs sort_pairs_by_expert(const int64_t* expert_of, const float* weight_of, int64_t P, int64_t E) {
  SortedPairs sorted{std::vector<int64_t>(E + 1, 0), std::vector<int64_t>(P), std::vector<int64_t>(P),
                     std::vector<float>(P)};
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = expert_of[p];
    TORCH_CHECK(e >= 0 && e < E, "moe_experts: expert index ", e, " out of range [0, ", E, ")");
    ++sorted.start[e + 1];
  }
  std::partial_sum(sorted.start.begin(), sorted.start.end(), sorted.start.begin());
  std::vector<int64_t> fill(sorted.start.begin(), sorted.start.end() - 1);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t row = fill[expert_of[p]]++;
    sorted.pair_at[row] = p;
    sorted.row_of_pair[p] = row;
    sorted.weight_at[row] = weight_of[p];
  }
  return sorted;
}

struct Item {
  int64_t expert, begin, end;
};

// Each expert's rows in chunks of at most kChunkRows, largest first (for the threads to balance).
std::vector<Item> plan_items(const std::vector<int64_t>& start) {
  std::vector<Item> items;
  for (size_t e = 0; e + 1 < start.size(); ++e) {
    const int64_t n = start[e + 1] - start[e];
    // Equal chunks rather than full ones plus a remainder: fewer tiny GEMMs.
    const int64_t pieces = (n + kChunkRows - 1) / kChunkRows;
    for (int64_t c = 0; c < pieces; ++c)
      items.push_back({static_cast<int64_t>(e), start[e] + n * c / pieces, start[e] + n * (c + 1) / pieces});
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.end - a.begin > b.end - b.begin; });
  return items;
}

// What the threads share while they take work items: the inputs, the sorted pairs, the items, the
// next item to hand out, and the [P, H] rows each item writes its block of.
struct ExpertsJob {
  const at::Tensor &hidden, &gate_up, &down, &rows_out;
  const SortedPairs& pairs;
  const std::vector<Item>& items;
  std::atomic<int64_t>& next;
  Shapes shape;
  int64_t max_rows;

  bool take(Item& item) const {
    const int64_t it = next.fetch_add(1, std::memory_order_relaxed);
    if (it >= static_cast<int64_t>(items.size())) return false;
    item = items[it];
    return true;
  }
};

#ifdef MOEE_FAST_AVX2
// One thread's share of the items: gather, gate/up GEMM, gated SiLU, down GEMM, on panels.
void run_items(const ExpertsJob& job) {
  const int64_t H = job.shape.H, I = job.shape.I, k = job.shape.k;
  const float* hidden_ptr = job.hidden.data_ptr<float>();
  const float* gate_up_ptr = job.gate_up.data_ptr<float>();
  const float* down_ptr = job.down.data_ptr<float>();
  float* rows_ptr = job.rows_out.data_ptr<float>();
  // Thread-local panels: gathered activations, then [g | u], then the down projection.
  const int64_t max_panels = (job.max_rows + kNR - 1) / kNR;
  std::vector<float> x_panels(max_panels * H * kNR), gu_panels(max_panels * 2 * I * kNR), y_panels(max_panels * H * kNR);
  std::vector<const float*> src(job.max_rows);
  for (Item item; job.take(item);) {
    const int64_t n = item.end - item.begin, panels = (n + kNR - 1) / kNR;
    for (int64_t r = 0; r < n; ++r) src[r] = hidden_ptr + (job.pairs.pair_at[item.begin + r] / k) * H;
    pack_panels(src.data(), n, H, x_panels.data());
    gemm_panels(gate_up_ptr + item.expert * 2 * I * H, 2 * I, H, x_panels.data(), H * kNR, panels, gu_panels.data());
    gated_silu_panels(gu_panels.data(), job.pairs.weight_at.data() + item.begin, n, I);
    gemm_panels(down_ptr + item.expert * H * I, H, I, gu_panels.data(), 2 * I * kNR, panels, y_panels.data());
    unpack_panels(y_panels.data(), H, n, rows_ptr + item.begin * H, H);
  }
}
#else
// One thread's share of the items through ATen's CPU matmul kernel, called directly (no
// dispatcher, no autograd: this op has no backward).
void run_items(const ExpertsJob& job) {
  const int64_t H = job.shape.H, I = job.shape.I, k = job.shape.k;
  const float* hidden_ptr = job.hidden.data_ptr<float>();
  // Thread-local scratch: gathered rows, then [g | u].
  at::Tensor x = at::empty({job.max_rows, H}, job.hidden.options());
  at::Tensor gu = at::empty({job.max_rows, 2 * I}, job.hidden.options());
  float* x_ptr = x.data_ptr<float>();
  for (Item item; job.take(item);) {
    const int64_t n = item.end - item.begin;
    for (int64_t r = 0; r < n; ++r)
      std::memcpy(x_ptr + r * H, hidden_ptr + (job.pairs.pair_at[item.begin + r] / k) * H, H * sizeof(float));
    at::Tensor gu_rows = gu.narrow(0, 0, n);
    at::cpu::mm_out(gu_rows, x.narrow(0, 0, n), job.gate_up[item.expert].t());
    gated_silu_rows(gu_rows.data_ptr<float>(), job.pairs.weight_at.data() + item.begin, n, I);
    at::Tensor y = job.rows_out.narrow(0, item.begin, n);
    at::cpu::mm_out(y, gu_rows.narrow(1, 0, I), job.down[item.expert].t());
  }
}
#endif

// out[t] = the sum of token t's k rows, in slot order. Called inside the parallel region: its
// loop is shared among the threads already running.
void sum_slots(const float* rows, const std::vector<int64_t>& row_of_pair, float* out, const Shapes& shape) {
  const int64_t H = shape.H, k = shape.k;
#pragma omp for schedule(static)
  for (int64_t t = 0; t < shape.T; ++t) {
    float* dst = out + t * H;
    std::memcpy(dst, rows + row_of_pair[t * k] * H, H * sizeof(float));
    for (int64_t s = 1; s < k; ++s) {
      const float* src = rows + row_of_pair[t * k + s] * H;
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) dst[h] += src[h];
    }
  }
}

at::Tensor& moe_experts_out(const at::Tensor& hidden_in, const at::Tensor& top_k_index_in,
                            const at::Tensor& top_k_weights_in, const at::Tensor& gate_up_in, const at::Tensor& down_in,
                            at::Tensor& out) {
  const Shapes shape = check_arguments(hidden_in, top_k_index_in, top_k_weights_in, gate_up_in, down_in, out);
  if (shape.T == 0 || shape.H == 0) return out;
  if (shape.k == 0 || shape.I == 0) return out.zero_();

  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor gate_up = gate_up_in.contiguous();
  const at::Tensor down = down_in.contiguous();
  const at::Tensor index = top_k_index_in.to(at::kLong).contiguous();
  const at::Tensor weights = top_k_weights_in.to(at::kFloat).contiguous();
  const int64_t P = shape.T * shape.k;
  const SortedPairs pairs = sort_pairs_by_expert(index.data_ptr<int64_t>(), weights.data_ptr<float>(), P, shape.E);
  const std::vector<Item> items = plan_items(pairs.start);

  // Every row of `rows_out` belongs to exactly one expert's block, so no initialisation is needed.
  const at::Tensor rows_out = at::empty({P, shape.H}, hidden.options());
  std::atomic<int64_t> next{0};
  const ExpertsJob job{hidden, gate_up, down, rows_out, pairs, items, next, shape, std::min(kChunkRows, P)};
  const int n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items.size())));
  std::exception_ptr error;
  const at::ThreadLocalState caller_state;  // inference mode and friends, for the worker threads

#pragma omp parallel num_threads(n_threads)
  {
    try {
      const at::ThreadLocalStateGuard state_guard(caller_state);
      run_items(job);
    } catch (...) {  // an exception must not leave an OpenMP region: keep the first, stop handing out work
#pragma omp critical(moe_experts_error)
      if (!error) error = std::current_exception();
      next.store(static_cast<int64_t>(items.size()));
    }
#pragma omp barrier
    sum_slots(rows_out.data_ptr<float>(), pairs.row_of_pair, out.data_ptr<float>(), shape);
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
