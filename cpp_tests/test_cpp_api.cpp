// The C++ API (opqn_ext/ops.h) from a program that links opqn_ext_ops and nothing of Python:
// every op against brute-force loops (integer-valued data where the results must be exact), and
// its errors; where the library has CUDA kernels and a GPU is present, each op on CUDA against the
// same call on the CPU. Prints whether CUDA was checked and one line per failed check; exits 1 if
// any failed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <numeric>
#include <string>
#include <vector>

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <opqn_ext/ops.h>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::cout << "FAILED: " << what << "\n";
  }
}

void check_error(const std::function<void()>& call, const std::string& message, const std::string& what) {
  try {
    call();
    check(false, what + ": no error");
  } catch (const c10::Error& e) {
    check(std::string(e.what_without_backtrace()).find(message) != std::string::npos,
          what + ": the error says '" + e.what_without_backtrace() + "', not '" + message + "'");
  }
}

// Pseudo-random integers (a fixed linear congruential sequence): the same data on every machine.
struct Numbers {
  uint64_t state;
  int64_t below(int64_t n) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<int64_t>((state >> 33) % static_cast<uint64_t>(n));
  }
  double uniform() { return static_cast<double>(below(1 << 24)) / (1 << 24); }
};

at::Tensor filled(std::vector<int64_t> shape, at::ScalarType dtype, const std::function<double()>& value) {
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (dtype == at::kByte) t.mutable_data_ptr<uint8_t>()[i] = static_cast<uint8_t>(value());
    else t.mutable_data_ptr<float>()[i] = static_cast<float>(value());
  }
  return t;
}

// score(q, i) = sum_m lut[q, m, codes[i, m]]: [nq][N]
std::vector<std::vector<float>> brute_force_scores(const at::Tensor& lut, const at::Tensor& codes) {
  const int64_t nq = lut.size(0), M = lut.size(1), K = lut.size(2), N = codes.size(0);
  std::vector<std::vector<float>> scores(nq, std::vector<float>(N, 0.0f));
  for (int64_t q = 0; q < nq; ++q)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t m = 0; m < M; ++m)
        scores[q][i] += lut.const_data_ptr<float>()[(q * M + m) * K + codes.const_data_ptr<uint8_t>()[i * M + m]];
  return scores;
}

void check_topk(const at::Tensor& got_scores, const at::Tensor& got_ids, const std::vector<std::vector<float>>& all,
                int64_t k, const std::string& what) {
  check(got_scores.sizes() == at::IntArrayRef({static_cast<int64_t>(all.size()), k}) &&
            got_ids.scalar_type() == at::kLong,
        what + ": shapes or dtype");
  for (size_t q = 0; q < all.size(); ++q) {
    std::vector<int64_t> order(all[q].size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return all[q][a] > all[q][b]; });  // ties: smaller index first
    for (int64_t j = 0; j < k; ++j) {
      check(got_ids[q][j].item<int64_t>() == order[j] && got_scores[q][j].item<float>() == all[q][order[j]],
            what + ": query " + std::to_string(q) + ", place " + std::to_string(j));
    }
  }
}

void test_scans() {
  Numbers rng{1};
  const int64_t nq = 3, M = 5, K = 16, N = 1037;  // N not a multiple of any block size
  const at::Tensor lut = filled({nq, M, K}, at::kFloat, [&] { return static_cast<double>(rng.below(10)); });
  const at::Tensor codes = filled({N, M}, at::kByte, [&] { return static_cast<double>(rng.below(K)); });
  const auto all = brute_force_scores(lut, codes);  // integers: exact in any order of additions; many ties
  for (int64_t k : {int64_t{1}, int64_t{10}, N}) {
    const auto [scores, ids] = opqn_ext::adc_topk(lut, codes, k);
    check_topk(scores, ids, all, k, "adc_topk k=" + std::to_string(k));
  }
  const at::Tensor every = opqn_ext::adc_scores(lut, codes);
  bool same = every.sizes() == at::IntArrayRef({nq, N});
  for (int64_t q = 0; same && q < nq; ++q)
    for (int64_t i = 0; i < N; ++i) same = same && every[q][i].item<float>() == all[q][i];
  check(same, "adc_scores equals the brute-force scores");
  const opqn_ext::PackedCodes4 packed = opqn_ext::pack_codes4(codes);
  check(packed.num_codes == N && packed.data.sizes() == at::IntArrayRef({(N + 31) / 32, (M + 1) / 2, 32}),
        "pack_codes4's layout");
  const auto [scores4, ids4] = opqn_ext::adc_topk4(lut, packed, 10, N);  // every code re-scored: exact
  check_topk(scores4, ids4, all, 10, "adc_topk4 with every code re-scored");
  check_error([&] { opqn_ext::adc_topk(lut, codes, N + 1); }, "k (1038) must be <= the number of codes N (1037)",
              "adc_topk k > N");
  check_error([&] { opqn_ext::adc_topk(lut, codes.to(at::kInt), 3); }, "codes must be uint8", "adc_topk int codes");
  check_error([&] { opqn_ext::adc_topk4(lut, packed, 10, 0); }, "rerank must be >= 1", "adc_topk4 rerank 0");
}

void test_encode() {
  Numbers rng{2};
  const int64_t B = 64, M = 3, d = 8, K = 12;
  // small integers: every similarity is exact, and equal ones (ties) are frequent
  const at::Tensor x = filled({B, M * d}, at::kFloat, [&] { return static_cast<double>(rng.below(5) - 2); });
  const at::Tensor w = filled({M, d, K}, at::kFloat, [&] { return static_cast<double>(rng.below(3) - 1); });
  const at::Tensor codes = opqn_ext::encode(x, w, /*normalize=*/false);
  check(codes.scalar_type() == at::kByte && codes.sizes() == at::IntArrayRef({B, M}), "encode's codes [B, M] uint8");
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t m = 0; m < M; ++m) {
      int64_t best = 0;
      float best_sim = -INFINITY;
      for (int64_t k = 0; k < K; ++k) {
        float sim = 0.0f;
        for (int64_t i = 0; i < d; ++i) sim += x[b][m * d + i].item<float>() * w[m][i][k].item<float>();
        if (sim > best_sim) best_sim = sim, best = k;  // the first maximum: ties to the smaller word
      }
      check(codes[b][m].item<uint8_t>() == best,
            "encode sample " + std::to_string(b) + " book " + std::to_string(m));
    }
  }
  check(opqn_ext::encode(x.view({B, M, d}), w, false).equal(codes), "encode of [B, M, d] equals that of [B, M*d]");
  check_error([&] { opqn_ext::encode(x, w.view({M * d, K}), true); }, "assign_weight must have shape",
              "encode 2-d weights");
}

void test_soft_quantize() {
  Numbers rng{3};
  const int64_t B = 20, M = 3, d = 8, K = 6;
  const double scale = 2.5;
  const at::Tensor x = filled({B, M * d}, at::kFloat, [&] { return rng.uniform() * 2 - 1; });
  const at::Tensor w = filled({M, d, K}, at::kFloat, [&] { return rng.uniform() - 0.5; });
  const at::Tensor c = filled({M, d, K}, at::kFloat, [&] { return rng.uniform() - 0.5; });
  const auto [probs, quantized, entropy] = opqn_ext::soft_quantize(x, w, c, scale, false);
  double worst = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t m = 0; m < M; ++m) {
      std::vector<double> logits(K), p(K);
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t i = 0; i < d; ++i) logits[k] += x[b][m * d + i].item<float>() * w[m][i][k].item<float>();
        logits[k] *= scale;
      }
      const double top = *std::max_element(logits.begin(), logits.end());
      double sum = 0.0, h = 0.0;
      for (int64_t k = 0; k < K; ++k) sum += p[k] = std::exp(logits[k] - top);
      for (int64_t k = 0; k < K; ++k) {
        p[k] /= sum;
        h -= p[k] * std::log(p[k]);
        worst = std::max(worst, std::abs(p[k] - probs[b][m][k].item<float>()));
      }
      worst = std::max(worst, std::abs(h - entropy[b][m].item<float>()));
      for (int64_t i = 0; i < d; ++i) {
        double q = 0.0;
        for (int64_t k = 0; k < K; ++k) q += c[m][i][k].item<float>() * p[k];
        worst = std::max(worst, std::abs(q - quantized[b][m][i].item<float>()));
      }
    }
  }
  check(worst < 1e-5, "soft_quantize equals softmax, entropy and codebook @ probs in double (worst error " +
                          std::to_string(worst) + ")");
  check_error([&] { opqn_ext::soft_quantize(x.to(at::kInt), w, c); }, "x must be a floating-point tensor",
              "soft_quantize int x");
  check_error([&] { opqn_ext::soft_quantize(x.view({B, M * d / 2, 2}), w, c); }, "x must have shape [B, 3, 8]",
              "soft_quantize x of another shape");
}

// The instruction-set paths: every one this CPU runs gives the same (exact) top-k; an unknown path is
// refused by name; the build says whether it has CUDA kernels as the dispatcher does.
void test_cpu_isas() {
  const std::vector<std::string> isas = opqn_ext::available_cpu_isas();
  const std::string before = opqn_ext::active_cpu_isa();
  check(!isas.empty() && isas.front() == "scalar", "available_cpu_isas starts with scalar");
  check(std::find(isas.begin(), isas.end(), before) != isas.end(), "active_cpu_isa is an available path");
  Numbers rng{5};
  const at::Tensor lut = filled({3, 8, 16}, at::kFloat, [&] { return static_cast<double>(rng.below(10)); });
  const at::Tensor codes = filled({3000, 8}, at::kByte, [&] { return static_cast<double>(rng.below(16)); });
  const auto all = brute_force_scores(lut, codes);
  for (const std::string& isa : isas) {
    opqn_ext::set_cpu_isa(isa);
    check(opqn_ext::active_cpu_isa() == isa, "set_cpu_isa(" + isa + ") makes it the active path");
    const auto [scores, ids] = opqn_ext::adc_topk(lut, codes, 50);
    check_topk(scores, ids, all, 50, "adc_topk on the " + isa + " path");
  }
  opqn_ext::set_cpu_isa(before);
  check_error([] { opqn_ext::set_cpu_isa("sse9"); }, "'sse9'", "set_cpu_isa of an unknown path");
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("opqn_ext::adc_topk", "");
  check(opqn_ext::cuda_built() == op.hasKernelForDispatchKey(c10::DispatchKey::CUDA),
        "cuda_built says whether the CUDA kernels are registered");
}

// Why the CUDA kernels cannot be checked here ("" when they can).
std::string why_no_cuda() {
  if (!opqn_ext::cuda_built()) return "the library has no CUDA kernels";  // as the dispatcher says (test_cpu_isas)
  if (!at::hasCUDA()) return "no GPU";
  return "";
}

void test_cuda_equals_cpu() {
  Numbers rng{4};
  const int64_t nq = 5, M = 8, K = 16, N = 5000, B = 300, d = 16;
  const at::Tensor lut = filled({nq, M, K}, at::kFloat, [&] { return static_cast<double>(rng.below(10)); });
  const at::Tensor codes = filled({N, M}, at::kByte, [&] { return static_cast<double>(rng.below(K)); });
  const auto [scores, ids] = opqn_ext::adc_topk(lut, codes, 100);  // integers: exact, ties included
  const auto [cuda_scores, cuda_ids] = opqn_ext::adc_topk(lut.cuda(), codes.cuda(), 100);
  check(cuda_scores.cpu().equal(scores) && cuda_ids.cpu().equal(ids), "adc_topk on CUDA equals the CPU's");
  check(opqn_ext::adc_scores(lut.cuda(), codes.cuda()).cpu().equal(opqn_ext::adc_scores(lut, codes)),
        "adc_scores on CUDA equals the CPU's");
  const auto [scores4, ids4] = opqn_ext::adc_topk4(lut.cuda(), opqn_ext::pack_codes4(codes.cuda()), 100);
  check(scores4.cpu().equal(scores) && ids4.cpu().equal(ids), "adc_topk4 on CUDA (exact there) equals adc_topk");
  const at::Tensor x = filled({B, M * d}, at::kFloat, [&] { return static_cast<double>(rng.below(5) - 2); });
  const at::Tensor w = filled({M, d, K}, at::kFloat, [&] { return static_cast<double>(rng.below(3) - 1); });
  check(opqn_ext::encode(x.cuda(), w.cuda(), false).cpu().equal(opqn_ext::encode(x, w, false)),
        "encode on CUDA equals the CPU's (exact similarities, ties to the smaller word)");
  const auto cpu = opqn_ext::soft_quantize(x, w, w, 0.5, true);
  const auto gpu = opqn_ext::soft_quantize(x.cuda(), w.cuda(), w.cuda(), 0.5, true);
  const auto difference = [](const at::Tensor& on_gpu, const at::Tensor& on_cpu) {
    return on_gpu.cpu().sub(on_cpu).abs().max().item<double>();
  };
  const double worst = std::max({difference(gpu.probs, cpu.probs), difference(gpu.quantized, cpu.quantized),
                                 difference(gpu.entropy, cpu.entropy)});
  check(worst < 1e-5, "soft_quantize on CUDA agrees with the CPU (worst difference " + std::to_string(worst) + ")");
}

}  // namespace

int main() {
  test_scans();
  test_encode();
  test_soft_quantize();
  test_cpu_isas();
  const std::string why = why_no_cuda();
  std::cout << "cuda: " << (why.empty() ? "checked" : "not checked (" + why + ")") << "\n";
  if (why.empty()) test_cuda_equals_cpu();
  std::cout << (failures ? "failed: " + std::to_string(failures) + " checks\n" : std::string("every check passed\n"));
  return failures ? 1 : 0;
}
