// packed_causal_attention: causal (optionally sliding-window) attention over texts packed end to
// end, registered as torch.ops.moee_fast.packed_causal_attention.
//
// Why not SDPA: on CPU it needs the texts padded to one length, and its flash kernel runs short
// texts (the bulk of evaluation suites) at a small fraction of the matmul rate. Here each work
// item is (text, head, block of up to 64 queries), so no padded row or column is ever computed:
//   1. the item's keys are transposed into Kt [D, keys] so six query rows x sixteen keys of
//      scores accumulate in registers, one broadcast FMA per element;
//   2. each row's softmax runs over exactly its own keys (causal, within the window);
//   3. the same six rows accumulate p_ij * v_j in registers, sixteen columns of the head
//      dimension at a time (probabilities outside a row's own keys are zero).
// Items are sorted by cost and handed out dynamically, so long texts do not leave a thread idle.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <vector>

#include "tile_kernel.h"
#include "vec_math.h"

namespace {

constexpr int64_t kQueryBlock = 64;
constexpr int64_t kRows = 6;    // query rows per score tile (6 vs 4: 0.62-0.67 vs 0.56-0.59 of the matmul peak on 6 x 340 tokens)
constexpr int64_t kCols = 16;   // keys per score tile

struct Item {
  int64_t start, length, head, q0, q1, cost;
};

// scores[r][c] = sum_d q[r][d] * kt[d][c] for r < rows (<= kRows; q rows `q_stride` apart) and
// c in [0, cols), cols a multiple of kCols.
void score_tile(const float* q, int64_t q_stride, int64_t rows, const float* kt, int64_t kt_stride, int64_t dim,
                int64_t cols, float* scores, int64_t scores_stride) {
  for (int64_t c0 = 0; c0 < cols; c0 += kCols) {
#ifdef MOEE_FAST_AVX2
    moee_fast::tile_x16<kRows>(q, q_stride, rows, kt + c0, kt_stride, dim, scores + c0, scores_stride);
#else
    for (int64_t r = 0; r < rows; ++r) {
      float acc[kCols] = {0.f};
      for (int64_t d = 0; d < dim; ++d) {
        const float qd = q[r * q_stride + d];
        for (int64_t c = 0; c < kCols; ++c) acc[c] += qd * kt[d * kt_stride + c0 + c];
      }
      for (int64_t c = 0; c < kCols; ++c) scores[r * scores_stride + c0 + c] = acc[c];
    }
#endif
  }
}

// kt[d][j] = k_j[d] for j < keys (rows `row_stride` apart), d < dim; kt rows `cols` apart.
void transpose_keys(const float* k, int64_t row_stride, int64_t keys, int64_t dim, float* kt, int64_t cols) {
  int64_t j0 = 0;
#ifdef MOEE_FAST_AVX2
  if (dim % 8 == 0) {
    for (; j0 + 8 <= keys; j0 += 8) {
      for (int64_t d0 = 0; d0 < dim; d0 += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(k + (j0 + i) * row_stride + d0);
        moee_fast::transpose8x8(r);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(kt + (d0 + i) * cols + j0, r[i]);
      }
    }
  }
#endif
  for (int64_t j = j0; j < keys; ++j)
    for (int64_t d = 0; d < dim; ++d) kt[d * cols + j] = k[j * row_stride + d];
}

// out[0:dim] = scale * sum_j p[j] * v_j for j in [0, count); v rows `v_stride` apart.
void weighted_sum(const float* p, const float* v, int64_t v_stride, int64_t count, int64_t dim, float scale, float* out) {
  for (int64_t d0 = 0; d0 < dim; d0 += 64) {
    const int64_t width = std::min<int64_t>(64, dim - d0);
#ifdef MOEE_FAST_AVX2
    if (width == 64) {
      __m256 acc[8];
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
      for (int64_t j = 0; j < count; ++j) {
        const __m256 pj = _mm256_broadcast_ss(p + j);
        const float* vj = v + j * v_stride + d0;
        for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * c), acc[c]);
      }
      const __m256 sv = _mm256_set1_ps(scale);
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(out + d0 + 8 * c, _mm256_mul_ps(acc[c], sv));
      continue;
    }
#endif
    float acc[64] = {0.f};
    for (int64_t j = 0; j < count; ++j) {
      const float pj = p[j];
      const float* vj = v + j * v_stride + d0;
#pragma omp simd
      for (int64_t d = 0; d < width; ++d) acc[d] += pj * vj[d];
    }
    for (int64_t d = 0; d < width; ++d) out[d0 + d] = acc[d] * scale;
  }
}

struct Operands {
  const float *q, *k, *v;
  float* out;
  int64_t q_row, q_head, kv_row, kv_head, out_row, group, dim;
  float scale;
  int64_t window;  // 0: full causal
};

void run_item(const Item& item, const Operands& o, std::vector<float>& kt, std::vector<float>& scores) {
  const int64_t dim = o.dim, kv_h = item.head / o.group;
  // Keys any query of the block can see: [k_lo, q1) within the text.
  const int64_t k_lo = o.window > 0 ? std::max<int64_t>(0, item.q0 - o.window + 1) : 0;
  const int64_t keys = item.q1 - k_lo;
  const int64_t cols = (keys + kCols - 1) / kCols * kCols;
  kt.resize(dim * cols);
  transpose_keys(o.k + (item.start + k_lo) * o.kv_row + kv_h * o.kv_head, o.kv_row, keys, dim, kt.data(), cols);
  for (int64_t d = 0; d < dim; ++d)  // padding columns: finite, and never read past the causal limit
    std::fill(kt.begin() + d * cols + keys, kt.begin() + (d + 1) * cols, 0.f);
  scores.resize(kRows * cols);
  const float* v_base = o.v + (item.start + k_lo) * o.kv_row + kv_h * o.kv_head;
  for (int64_t i0 = item.q0; i0 < item.q1; i0 += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, item.q1 - i0);
    const float* q_tile = o.q + (item.start + i0) * o.q_row + item.head * o.q_head;
    // Only keys up to the tile's last query matter.
    const int64_t tile_cols = (i0 + rows - k_lo + kCols - 1) / kCols * kCols;
    score_tile(q_tile, o.q_row, rows, kt.data(), cols, dim, tile_cols, scores.data(), cols);
    // Softmax of each row over its own keys [lo, lo + count); the tile's union of keys is
    // [tile_lo, tile_hi), and each row's probabilities are zero outside its own range.
    const int64_t tile_lo = (o.window > 0 ? std::max<int64_t>(0, i0 - o.window + 1) : 0) - k_lo;
    const int64_t tile_hi = i0 + rows - k_lo;
    float inv_total[kRows];
    float* const dst = o.out + (item.start + i0) * o.out_row + item.head * dim;  // rows o.out_row apart
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      const int64_t lo = (o.window > 0 ? std::max<int64_t>(0, i - o.window + 1) : 0) - k_lo;
      const int64_t count = i - k_lo + 1 - lo;
      float* row = scores.data() + r * cols;
      inv_total[r] = 1.f / moee_fast::exp_sum_inplace(row + lo, count, o.scale, moee_fast::scaled_max(row + lo, count, o.scale));
      std::fill(row + tile_lo, row + lo, 0.f);
      std::fill(row + lo + count, row + tile_hi, 0.f);
    }
#ifdef MOEE_FAST_AVX2
    if (dim % 16 == 0) {  // six rows x sixteen columns of the output in registers
      for (int64_t d0 = 0; d0 < dim; d0 += 16)
        moee_fast::tile_x16<kRows>(scores.data() + tile_lo, cols, rows, v_base + tile_lo * o.kv_row + d0, o.kv_row,
                                   tile_hi - tile_lo, dst + d0, o.out_row, false, inv_total);
      continue;
    }
#endif
    for (int64_t r = 0; r < rows; ++r)
      weighted_sum(scores.data() + r * cols + tile_lo, v_base + tile_lo * o.kv_row, o.kv_row, tile_hi - tile_lo, dim,
                   inv_total[r], dst + r * o.out_row);
  }
}

// q [N, Hq, D], k and v [N, Hk, D] (any strides with the last dimension contiguous), cu_seqlens
// int64 [B + 1] from 0 to N. Returns [N, Hq, D].
at::Tensor packed_causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& cu_seqlens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be [tokens, heads, head_dim]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "packed_causal_attention runs float32 only");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2), "q, k, v shapes disagree");
  const int64_t n = q.size(0), heads = q.size(1), kv_heads = k.size(1), dim = q.size(2);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "query heads must be a multiple of key/value heads");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(k.strides() == v.strides(), "k and v must share a layout");
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: none)");
  const at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 2, "cu_seqlens must be [B + 1]");
  const int64_t* c = cu.data_ptr<int64_t>();
  TORCH_CHECK(c[0] == 0 && c[cu.numel() - 1] == n, "cu_seqlens must run from 0 to the token count");

  std::vector<Item> items;
  for (int64_t b = 0; b + 1 < cu.numel(); ++b) {
    const int64_t start = c[b], length = c[b + 1] - c[b];
    TORCH_CHECK(length >= 0, "cu_seqlens must not decrease");
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t q0 = 0; q0 < length; q0 += kQueryBlock) {
        const int64_t q1 = std::min(length, q0 + kQueryBlock);
        const int64_t span = window > 0 ? std::min(q1, window + kQueryBlock) : q1;
        items.push_back({start, length, h, q0, q1, (q1 - q0) * span + 64});
      }
  }
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });

  at::Tensor out = at::empty({n, heads, dim}, q.options());
  const Operands o{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
                   q.stride(0), q.stride(1), k.stride(0), k.stride(1), heads * dim, heads / kv_heads, dim,
                   static_cast<float>(scale), window};
  const int64_t count = static_cast<int64_t>(items.size());
  std::exception_ptr error;
#pragma omp parallel num_threads(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count)))
  {
    std::vector<float> kt, scores;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < count; ++t) {
      try {
        run_item(items[t], o, kt, scores);
      } catch (...) {
#pragma omp critical(packed_attention_error)
        error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moee_fast, m) {
  m.def("packed_causal_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(moee_fast, CPU, m) {
  m.impl("packed_causal_attention", &packed_causal_attention);
}
