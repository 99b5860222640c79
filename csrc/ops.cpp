// CPU implementations of the fused MoEE ops, registered as torch.ops.moee_fast.*.
//
// gather_router_softmax: one pass per (sequence, layer) row, reading only the rows it needs.
// mean_router_softmax: per (sequence, layer), each packed row's softmax added into the mean as it
//   is computed, so no all-token probability tensor exists.
// combined_cosine: each operand is normalised once into [hs / |hs|, scale * rw / |rw|] (fp32),
//   so both cosines come out of a single GEMM (ATen/BLAS) with no extra pass over the output.
// topk_combined_cosine: the same GEMM one corpus tile at a time, each tile merged into per-query
//   min-heaps of size k, so memory is Nq*k + one tile instead of Nq*Nc.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace {


// Same guard as torch.nn.functional.cosine_similarity: a zero vector gets cosine 0, never NaN.
constexpr float kNormEps = 1e-8f;  // moee_fast.checks.NORM_EPS

template <typename scalar_t>
void softmax_row(const scalar_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) dst[e] = static_cast<float>(src[e]);
  const float total = moee_fast::exp_sum_inplace(dst, n, 1.f, moee_fast::scaled_max(dst, n, 1.f));
  const float inv_total = 1.f / total;
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) dst[e] *= inv_total;
}

// The router logits as [rows, E] CPU matrices read in place when inner-contiguous, after checking
// `out` is the contiguous float32 [B, L, E] result; `n_rows` gets the fewest rows of any layer.
std::vector<at::Tensor> router_layers(at::TensorList router_logits, int64_t batch, const at::Tensor& out,
                                      int64_t& n_rows) {
  const int64_t n_layers = static_cast<int64_t>(router_logits.size());
  TORCH_CHECK(n_layers > 0, "router_logits must hold at least one layer");
  const int64_t n_experts = router_logits[0].size(1);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.sizes() == at::IntArrayRef({batch, n_layers, n_experts}),
              "out must be a contiguous float32 CPU tensor of shape [B, L, E]");
  std::vector<at::Tensor> layers;
  layers.reserve(n_layers);
  n_rows = std::numeric_limits<int64_t>::max();
  for (const auto& logits : router_logits) {
    TORCH_CHECK(logits.dim() == 2 && logits.size(1) == n_experts && logits.device().is_cpu(),
                "every router_logits tensor must be a CPU [rows, E] matrix with the same E");
    layers.push_back(logits.stride(1) == 1 ? logits : logits.contiguous());
    n_rows = std::min(n_rows, logits.size(0));
  }
  return layers;
}

at::Tensor& gather_router_softmax_out(at::TensorList router_logits, const at::Tensor& rows, at::Tensor& out) {
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "rows must be an int64 vector");
  const int64_t batch = rows.size(0);
  // Only the rows named by `rows` are ever read.
  int64_t n_rows = 0;
  const std::vector<at::Tensor> layers = router_layers(router_logits, batch, out, n_rows);
  const int64_t n_layers = static_cast<int64_t>(layers.size()), n_experts = layers[0].size(1);
  const at::Tensor rows_c = rows.contiguous();
  const int64_t* row_index = rows_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(row_index[b] >= 0 && row_index[b] < n_rows, "rows[", b, "] = ", row_index[b],
                " is out of range for router logits with ", n_rows, " rows");
  }

  float* out_data = out.data_ptr<float>();
  // ~16k probabilities per task: the per-layer call during a forward (B rows) stays on one thread,
  // where waking the pool would cost more than the work.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n_experts, 1));
  at::parallel_for(0, batch * n_layers, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n_layers, l = item % n_layers;
      const at::Tensor& logits = layers[l];
      float* dst = out_data + item * n_experts;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "gather_router_softmax", [&] {
        softmax_row(static_cast<const scalar_t*>(logits.const_data_ptr()) + row_index[b] * logits.stride(0), dst,
                    n_experts);
      });
    }
  });
  return out;
}

at::Tensor gather_router_softmax(at::TensorList router_logits, const at::Tensor& rows) {
  TORCH_CHECK(!router_logits.empty(), "router_logits must hold at least one layer");
  at::Tensor out = at::empty({rows.size(0), static_cast<int64_t>(router_logits.size()), router_logits[0].size(1)},
                             router_logits[0].options().dtype(at::kFloat));
  return gather_router_softmax_out(router_logits, rows, out);
}

// Adds the softmax of rows [begin, end) of `logits` (row stride `stride`) into dst; row: scratch [n].
template <typename scalar_t>
void add_softmax_rows(const scalar_t* logits, int64_t stride, int64_t begin, int64_t end, float* row, float* dst,
                      int64_t n) {
  for (int64_t t = begin; t < end; ++t) {
    softmax_row(logits + t * stride, row, n);
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) dst[e] += row[e];
  }
}

at::Tensor& mean_router_softmax_out(at::TensorList router_logits, const at::Tensor& cu_seqlens, at::Tensor& out) {
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1 && cu_seqlens.scalar_type() == at::kLong &&
                  cu_seqlens.device().is_cpu(),
              "cu_seqlens must be an int64 CPU vector [B + 1]");
  const int64_t batch = cu_seqlens.size(0) - 1;
  int64_t n_rows = 0;
  const std::vector<at::Tensor> layers = router_layers(router_logits, batch, out, n_rows);
  const int64_t n_layers = static_cast<int64_t>(layers.size()), n_experts = layers[0].size(1);
  const at::Tensor bounds_c = cu_seqlens.contiguous();
  const int64_t* bounds = bounds_c.data_ptr<int64_t>();
  TORCH_CHECK(bounds[0] == 0, "cu_seqlens[0] must be 0, got ", bounds[0]);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(bounds[b + 1] > bounds[b], "cu_seqlens must increase: sequence ", b, " has no rows");
  }
  TORCH_CHECK(bounds[batch] <= n_rows, "cu_seqlens ends at ", bounds[batch], ", past router logits with ", n_rows, " rows");

  float* out_data = out.data_ptr<float>();
  // ~16k probabilities per task, as in gather_router_softmax: a short batch stays on one thread.
  const int64_t rows_per_item = std::max<int64_t>(1, bounds[batch] / std::max<int64_t>(batch, 1));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n_experts * rows_per_item, 1));
  at::parallel_for(0, batch * n_layers, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> row(n_experts);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n_layers, l = item % n_layers;
      const at::Tensor& logits = layers[l];
      float* dst = out_data + item * n_experts;
      std::fill(dst, dst + n_experts, 0.f);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mean_router_softmax", [&] {
        add_softmax_rows(static_cast<const scalar_t*>(logits.const_data_ptr()), logits.stride(0), bounds[b], bounds[b + 1],
                         row.data(), dst, n_experts);
      });
      const float inv_count = 1.f / static_cast<float>(bounds[b + 1] - bounds[b]);
#pragma omp simd
      for (int64_t e = 0; e < n_experts; ++e) dst[e] *= inv_count;
    }
  });
  return out;
}

template <typename scalar_t>
void write_scaled_unit_row(const scalar_t* src, int64_t n, float scale, float* dst) {
  float sum_sq = 0.f;
#pragma omp simd reduction(+ : sum_sq)
  for (int64_t j = 0; j < n; ++j) {
    const float v = static_cast<float>(src[j]);
    sum_sq += v * v;
  }
  const float factor = scale / std::max(std::sqrt(sum_sq), kNormEps);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]) * factor;
}

// Writes rows [begin, end) of [hs / |hs|, rw_scale * rw / |rw|] into `dst` ([end - begin, H + R], fp32).
void normalise_concat(const at::Tensor& hs, const at::Tensor& rw, float rw_scale, int64_t begin, int64_t end,
                      at::Tensor& dst) {
  const int64_t hs_width = hs.size(1), rw_width = rw.size(1), width = hs_width + rw_width;
  float* dst_data = dst.data_ptr<float>();
  at::parallel_for(begin, end, 16, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t i = row_begin; i < row_end; ++i) {
      float* dst_row = dst_data + (i - begin) * width;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hs.scalar_type(), "normalise_hs", [&] {
        write_scaled_unit_row(hs.data_ptr<scalar_t>() + i * hs.stride(0), hs_width, 1.f, dst_row);
      });
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rw.scalar_type(), "normalise_rw", [&] {
        write_scaled_unit_row(rw.data_ptr<scalar_t>() + i * rw.stride(0), rw_width, rw_scale, dst_row + hs_width);
      });
    }
  });
}

at::Tensor unit_concat(const at::Tensor& hs, const at::Tensor& rw, float rw_scale, int64_t begin, int64_t end) {
  at::Tensor dst = at::empty({end - begin, hs.size(1) + rw.size(1)}, hs.options().dtype(at::kFloat));
  normalise_concat(hs, rw, rw_scale, begin, end, dst);
  return dst;
}

void check_pair(const at::Tensor& hs, const at::Tensor& rw, const char* name) {
  TORCH_CHECK(hs.device().is_cpu() && rw.device().is_cpu(), name, " tensors must be on the CPU");
  TORCH_CHECK(hs.dim() == 2 && rw.dim() == 2 && hs.size(0) == rw.size(0), name,
              "_hs and ", name, "_rw must be [N, H] and [N, R] with the same N");
  TORCH_CHECK((hs.stride(1) == 1 || hs.size(1) <= 1) && (rw.stride(1) == 1 || rw.size(1) <= 1), name,
              " tensors must be contiguous along their rows");
}

at::Tensor& combined_cosine_out(const at::Tensor& a_hs, const at::Tensor& a_rw, const at::Tensor& b_hs,
                                const at::Tensor& b_rw, double alpha, at::Tensor& out) {
  check_pair(a_hs, a_rw, "a");
  check_pair(b_hs, b_rw, "b");
  TORCH_CHECK(a_hs.size(1) == b_hs.size(1) && a_rw.size(1) == b_rw.size(1), "a and b widths differ");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.sizes() == at::IntArrayRef({a_hs.size(0), b_hs.size(0)}),
              "out must be float32 [Na, Nb]");
  // alpha rides on the query side, so one dot product yields cos_hs + alpha * cos_rw.
  const at::Tensor a_unit = unit_concat(a_hs, a_rw, static_cast<float>(alpha), 0, a_hs.size(0));
  const at::Tensor b_unit = unit_concat(b_hs, b_rw, 1.f, 0, b_hs.size(0));
  at::mm_out(out, a_unit, b_unit.t());
  return out;
}

at::Tensor combined_cosine(const at::Tensor& a_hs, const at::Tensor& a_rw, const at::Tensor& b_hs,
                           const at::Tensor& b_rw, double alpha) {
  at::Tensor out = at::empty({a_hs.size(0), b_hs.size(0)}, a_hs.options().dtype(at::kFloat));
  return combined_cosine_out(a_hs, a_rw, b_hs, b_rw, alpha, out);
}

// Top-k order: higher value first, then lower index. A NaN score enters as -inf (no real score is:
// cosines are bounded), so it ranks below every number; an empty slot (-inf, kEmptySlot) ranks
// below everything, so every slot is filled by a real corpus row.
constexpr int64_t kEmptySlot = std::numeric_limits<int64_t>::max();

inline bool ranks_below(float value, int64_t index, float other_value, int64_t other_index) {
  return value < other_value || (value == other_value && index > other_index);
}

// Per-query min-heap (in top-k order) of (value, index) pairs stored in two parallel arrays, lowest at [0].
void heap_replace_top(float* values, int64_t* indices, int64_t k, float value, int64_t index) {
  int64_t parent = 0;
  while (true) {
    int64_t child = 2 * parent + 1;
    if (child >= k) break;
    if (child + 1 < k && ranks_below(values[child + 1], indices[child + 1], values[child], indices[child])) ++child;
    if (!ranks_below(values[child], indices[child], value, index)) break;
    values[parent] = values[child];
    indices[parent] = indices[child];
    parent = child;
  }
  values[parent] = value;
  indices[parent] = index;
}

std::tuple<at::Tensor&, at::Tensor&> topk_combined_cosine_out(const at::Tensor& q_hs, const at::Tensor& q_rw,
                                                              const at::Tensor& c_hs, const at::Tensor& c_rw,
                                                              int64_t k, double alpha, int64_t corpus_tile,
                                                              at::Tensor& values, at::Tensor& indices) {
  check_pair(q_hs, q_rw, "q");
  check_pair(c_hs, c_rw, "c");
  TORCH_CHECK(q_hs.size(1) == c_hs.size(1) && q_rw.size(1) == c_rw.size(1), "q and c widths differ");
  const int64_t n_queries = q_hs.size(0), n_corpus = c_hs.size(0);
  TORCH_CHECK(k >= 1 && k <= n_corpus, "k must be in [1, Nc]");
  TORCH_CHECK(corpus_tile >= 1, "corpus_tile must be positive");
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.is_contiguous() &&
                  values.sizes() == at::IntArrayRef({n_queries, k}),
              "values must be a contiguous float32 [Nq, k] tensor");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.is_contiguous() &&
                  indices.sizes() == at::IntArrayRef({n_queries, k}),
              "indices must be a contiguous int64 [Nq, k] tensor");

  float* heap_values = values.data_ptr<float>();
  int64_t* heap_indices = indices.data_ptr<int64_t>();
  std::fill(heap_values, heap_values + n_queries * k, -std::numeric_limits<float>::infinity());
  std::fill(heap_indices, heap_indices + n_queries * k, kEmptySlot);

  const at::Tensor q_unit = unit_concat(q_hs, q_rw, static_cast<float>(alpha), 0, n_queries);
  const int64_t tile = std::min(corpus_tile, n_corpus);
  at::Tensor c_unit_buffer = at::empty({tile * q_unit.size(1)}, q_unit.options());
  at::Tensor score_buffer = at::empty({n_queries * tile}, q_unit.options());

  for (int64_t start = 0; start < n_corpus; start += tile) {
    const int64_t len = std::min(tile, n_corpus - start);
    at::Tensor c_unit = c_unit_buffer.narrow(0, 0, len * q_unit.size(1)).view({len, q_unit.size(1)});
    normalise_concat(c_hs, c_rw, 1.f, start, start + len, c_unit);
    at::Tensor scores = score_buffer.narrow(0, 0, n_queries * len).view({n_queries, len});
    at::mm_out(scores, q_unit, c_unit.t());
    const float* score_data = scores.data_ptr<float>();
    at::parallel_for(0, n_queries, 1, [&](int64_t row_begin, int64_t row_end) {
      for (int64_t q = row_begin; q < row_end; ++q) {
        float* row_values = heap_values + q * k;
        int64_t* row_indices = heap_indices + q * k;
        const float* row_scores = score_data + q * len;
        for (int64_t j = 0; j < len; ++j) {
          const float score = std::isnan(row_scores[j]) ? -std::numeric_limits<float>::infinity() : row_scores[j];
          if (ranks_below(row_values[0], row_indices[0], score, start + j)) {
            heap_replace_top(row_values, row_indices, k, score, start + j);
          }
        }
      }
    });
  }

  // Heaps -> rows in top-k order; NaN scores, held as -inf, come back as NaN.
  at::parallel_for(0, n_queries, 16, [&](int64_t row_begin, int64_t row_end) {
    std::vector<std::pair<float, int64_t>> row(k);
    for (int64_t q = row_begin; q < row_end; ++q) {
      for (int64_t j = 0; j < k; ++j) row[j] = {heap_values[q * k + j], heap_indices[q * k + j]};
      std::sort(row.begin(), row.end(),
                [](const auto& x, const auto& y) { return ranks_below(y.first, y.second, x.first, x.second); });
      for (int64_t j = 0; j < k; ++j) {
        const bool was_nan = row[j].first == -std::numeric_limits<float>::infinity();
        heap_values[q * k + j] = was_nan ? std::numeric_limits<float>::quiet_NaN() : row[j].first;
        heap_indices[q * k + j] = row[j].second;
      }
    }
  });
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> topk_combined_cosine(const at::Tensor& q_hs, const at::Tensor& q_rw,
                                                        const at::Tensor& c_hs, const at::Tensor& c_rw, int64_t k,
                                                        double alpha, int64_t corpus_tile) {
  at::Tensor values = at::empty({q_hs.size(0), k}, q_hs.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({q_hs.size(0), k}, q_hs.options().dtype(at::kLong));
  topk_combined_cosine_out(q_hs, q_rw, c_hs, c_rw, k, alpha, corpus_tile, values, indices);
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY(moee_fast, m) {
  m.def("gather_router_softmax(Tensor[] router_logits, Tensor rows) -> Tensor");
  m.def("gather_router_softmax.out(Tensor[] router_logits, Tensor rows, *, Tensor(a!) out) -> Tensor(a!)");
  m.def("mean_router_softmax.out(Tensor[] router_logits, Tensor cu_seqlens, *, Tensor(a!) out) -> Tensor(a!)");
  m.def("combined_cosine(Tensor a_hs, Tensor a_rw, Tensor b_hs, Tensor b_rw, float alpha) -> Tensor");
  m.def(
      "combined_cosine.out(Tensor a_hs, Tensor a_rw, Tensor b_hs, Tensor b_rw, float alpha, *, Tensor(a!) out)"
      " -> Tensor(a!)");
  m.def(
      "topk_combined_cosine(Tensor q_hs, Tensor q_rw, Tensor c_hs, Tensor c_rw, int k, float alpha, int corpus_tile)"
      " -> (Tensor values, Tensor indices)");
  m.def(
      "topk_combined_cosine.out(Tensor q_hs, Tensor q_rw, Tensor c_hs, Tensor c_rw, int k, float alpha,"
      " int corpus_tile, *, Tensor(a!) values, Tensor(b!) indices) -> (Tensor(a!) values, Tensor(b!) indices)");
}

TORCH_LIBRARY_IMPL(moee_fast, CPU, m) {
  m.impl("gather_router_softmax", &gather_router_softmax);
  m.impl("gather_router_softmax.out", &gather_router_softmax_out);
  m.impl("mean_router_softmax.out", &mean_router_softmax_out);
  m.impl("combined_cosine", &combined_cosine);
  m.impl("combined_cosine.out", &combined_cosine_out);
  m.impl("topk_combined_cosine", &topk_combined_cosine);
  m.impl("topk_combined_cosine.out", &topk_combined_cosine_out);
}

// Importing moee_fast._C runs the registrations above; the module itself exposes nothing.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
