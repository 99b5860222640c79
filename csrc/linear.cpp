// linear: y = x W^T (+ b) for float32 CPU tensors, registered as torch.ops.moee_fast.linear.
//
// Why: the attention projections and dense MLPs of a packed batch are [~2k, H] x [H, H']
// products, where a BLAS call packs W on every call and splits one small GEMM across the threads.
// Here each thread takes blocks of up to 128 rows of x, packs them into panels while copying
// (tile_kernel.h) and runs the register-tiled kernel over W in place. Each row's result depends
// only on that row, in a fixed summation order.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tile_kernel.h"

namespace {

#ifdef MOEE_FAST_AVX2
constexpr int64_t kBlockRows = 128;

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.device().is_cpu() && weight_in.device().is_cpu() && x_in.scalar_type() == at::kFloat &&
                  weight_in.scalar_type() == at::kFloat,
              "linear: x and weight must be float32 CPU tensors");
  TORCH_CHECK(x_in.dim() >= 1 && weight_in.dim() == 2 && weight_in.size(1) == x_in.size(-1),
              "linear: weight must be [out, ", x_in.size(-1), "], got ", weight_in.sizes());
  const int64_t K = x_in.size(-1), M = weight_in.size(0);
  int64_t N = 1;
  for (int64_t d = 0; d + 1 < x_in.dim(); ++d) N *= x_in.size(d);
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = M;
  at::Tensor y = at::empty(out_shape, x_in.options());
  const float* b = nullptr;
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.size(0) == M,
                "linear: bias must be a float32 [", M, "] tensor");
    b = bias.data_ptr<float>();
  }
  if (N == 0 || M == 0) return y;
  if (K == 0) return b ? y.copy_(bias.expand_as(y)) : y.zero_();
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous();
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Enough blocks for every thread, each a whole number of panels.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block = std::min(kBlockRows, std::max<int64_t>(moee_fast::kNR, (N / (2 * threads) + 15) / 16 * 16));
  const int64_t blocks = (N + block - 1) / block;
  const int64_t max_panels = (block + moee_fast::kNR - 1) / moee_fast::kNR;
#pragma omp parallel num_threads(std::min(threads, blocks))
  {
    std::vector<float> x_panels(max_panels * K * moee_fast::kNR), y_panels(max_panels * M * moee_fast::kNR);
    std::vector<const float*> rows(block);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < blocks; ++i) {
      const int64_t r0 = i * block, n = std::min(block, N - r0), panels = (n + moee_fast::kNR - 1) / moee_fast::kNR;
      for (int64_t r = 0; r < n; ++r) rows[r] = xp + (r0 + r) * K;
      moee_fast::pack_panels(rows.data(), n, K, x_panels.data());
      moee_fast::gemm_panels(wp, M, K, x_panels.data(), K * moee_fast::kNR, panels, y_panels.data());
      moee_fast::unpack_panels(y_panels.data(), M, n, yp + r0 * M, M);
      if (b)
        for (int64_t r = 0; r < n; ++r)
#pragma omp simd
          for (int64_t m = 0; m < M; ++m) yp[(r0 + r) * M + m] += b[m];
    }
  }
  return y;
}

// The panel GEMMs' instruction set, "avx512" or "avx2" (after switching to `use`, when given): for
// tests and benchmarks, which compare the two; both give bitwise the same results.
std::string cpu_isa(const c10::optional<std::string>& use) {
  using moee_fast::CpuIsa;
  if (use.has_value()) {
    TORCH_CHECK(*use == "avx2" || *use == "avx512", "cpu_isa: expected 'avx2' or 'avx512', got '", *use, "'");
    TORCH_CHECK(*use == "avx2" || moee_fast::cpu_has_avx512(), "cpu_isa: this CPU has no AVX-512");
    moee_fast::active_isa().store(static_cast<int>(*use == "avx512" ? CpuIsa::avx512 : CpuIsa::avx2));
  }
  return moee_fast::active_isa().load() == static_cast<int>(CpuIsa::avx512) ? "avx512" : "avx2";
}

// The fp32 FMA rate of one thread on its core, GFLOP/s: 12 independent chains of the active
// ISA's widest FMA, for about `seconds`. A GEMM can approach but never pass it, which makes
// it the ceiling benchmarks hold whole encodes against (a BLAS matmul's rate is one kernel's).
// One loop per ISA: a vector type wider than the build's cannot cross a function boundary.
#define MOEE_FAST_FMA_CHAINS(VEC, SET1, FMA, LANES)                                        \
  VEC acc[12];                                                                              \
  for (auto& a : acc) a = SET1(1.f);                                                        \
  const VEC mul = SET1(0.999999f), add = SET1(1e-6f);                                       \
  const auto begin = std::chrono::steady_clock::now();                                      \
  int64_t rounds = 0;                                                                       \
  double elapsed = 0.0;                                                                     \
  do {                                                                                      \
    for (int i = 0; i < 4096; ++i)                                                          \
      _Pragma("GCC unroll 12") for (auto& a : acc) a = FMA(a, mul, add);                    \
    rounds += 4096;                                                                         \
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count(); \
  } while (elapsed < seconds);                                                              \
  float lanes[LANES], sum = 0.f;                                                            \
  for (auto& a : acc) std::memcpy(lanes, &a, sizeof(lanes)), sum += lanes[0];               \
  volatile float sink = sum; /* keeps the chains live */                                    \
  (void)sink;                                                                               \
  return 2.0 * LANES * 12 * rounds / elapsed / 1e9;

MOEE_FAST_AVX512 double fma_peak_512(double seconds) { MOEE_FAST_FMA_CHAINS(__m512, _mm512_set1_ps, _mm512_fmadd_ps, 16) }

double fma_peak_avx2(double seconds) { MOEE_FAST_FMA_CHAINS(__m256, _mm256_set1_ps, _mm256_fmadd_ps, 8) }

// The summed rate of `threads` threads, each running the chains at once on its own core.
double fma_peak(double seconds, int64_t threads) {
  TORCH_CHECK(seconds > 0 && seconds <= 60, "fma_peak: seconds must be in (0, 60], got ", seconds);
  TORCH_CHECK(threads >= 1 && threads <= 1024, "fma_peak: threads must be in [1, 1024], got ", threads);
  const bool wide = moee_fast::active_isa().load() == static_cast<int>(moee_fast::CpuIsa::avx512);
  double total = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  total += wide ? fma_peak_512(seconds) : fma_peak_avx2(seconds);
  return total;
}
#endif

}  // namespace

#ifdef MOEE_FAST_AVX2
// Only AVX2 builds register it: elsewhere torch's own linear is the faster choice.
TORCH_LIBRARY_FRAGMENT(moee_fast, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("cpu_isa(str? use=None) -> str", &cpu_isa);
  m.def("fma_peak(float seconds=0.2, int threads=1) -> float", &fma_peak);
}

TORCH_LIBRARY_IMPL(moee_fast, CPU, m) {
  m.impl("linear", &linear);
}
#endif
