// C entry points that run opqn_ext's CUDA kernels in the emulator (cuda_emulator.h), launched as
// the host code in csrc/cuda/*.cu launches them (same grids, shared memory and variants, from the
// kernels' own launch helpers). Inputs are copied into guarded device buffers, outputs copied back.
// Each returns 0, or 1 with the error in emu_last_error(). Driven by test_cuda_kernels_emulated.py.
#include <memory>
#include <string>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/adc_scan_kernels.cuh"
#include "cuda/encode_kernels.cuh"
#include "cuda/soft_quantize_kernels.cuh"
#include "adc_launch.h"
#include "entry_error.h"

namespace opqn_emu {
namespace {
std::string last_error;
}  // namespace

int report(const std::string& error) {
  last_error = error;
  return error.empty() ? 0 : 1;
}

}  // namespace opqn_emu

namespace {

using opqn_emu::DeviceBuffer;
using opqn_emu::LaunchConfig;
using opqn_emu::report;

// A guarded copy of host memory (or nullptr for a null input).
std::unique_ptr<DeviceBuffer> upload(const char* name, const void* host, size_t bytes) {
  if (host == nullptr) return nullptr;
  return std::make_unique<DeviceBuffer>(name, bytes, host);
}

template <class T>
T* device_ptr(const std::unique_ptr<DeviceBuffer>& buffer) {
  return buffer ? buffer->as<T>() : nullptr;
}

void download(const std::unique_ptr<DeviceBuffer>& buffer, void* host) {
  if (buffer) buffer->copy_to(host);
}

// f(scalar_t{}) for dtype 0 float32, 1 float64, 2 float16, 3 bfloat16
template <class F>
int with_dtype(int dtype, const F& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(double{});
    case 2: return f(c10::Half{});
    case 3: return f(c10::BFloat16{});
    default: return report("unknown dtype code " + std::to_string(dtype));
  }
}

template <class scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The 8-bit rows (bytes or words) or the 4-bit packed codes: f(Codes{...}) on device memory.
template <class F>
std::string with_codes(int layout, const uint8_t* codes, int64_t M, int64_t pairs, const F& f) {
  switch (layout) {
    case 0: return f(opqn::cuda::RowCodes<false>{codes, M});
    case 1: return f(opqn::cuda::RowCodes<true>{codes, M});
    case 2: return f(opqn::cuda::PackedCodes4{codes, M, pairs});
    default: return "unknown code layout " + std::to_string(layout);
  }
}

}  // namespace

extern "C" {

const char* emu_last_error() { return opqn_emu::last_error.c_str(); }

// 0 ascending, 1 descending, 2 shuffled (opqn_emu::Schedule)
void emu_set_schedule(int schedule) { opqn_emu::set_schedule(static_cast<opqn_emu::Schedule>(schedule)); }

// x: [B, M, d]; A, C: [M, d, K] -> probs [B, M, K], quantized [B, M, d], entropy [B, M] (x's dtype)
int emu_soft_quantize_forward(int dtype, const void* x, const void* A, const void* C, void* probs, void* quantized,
                              void* entropy, int64_t B, int64_t M, int64_t d, int64_t K, double scale,
                              int normalize) {
  return with_dtype(dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    using acc_t = acc_type<scalar_t>;
    const size_t s = sizeof(scalar_t);
    auto x_d = upload("x", x, B * M * d * s), A_d = upload("assign_weight", A, M * d * K * s),
         C_d = upload("codebook", C, M * d * K * s);
    auto p_d = std::make_unique<DeviceBuffer>("probs", B * M * K * s);
    auto q_d = std::make_unique<DeviceBuffer>("quantized", B * M * d * s);
    auto h_d = std::make_unique<DeviceBuffer>("entropy", B * M * s);
    constexpr int tile = opqn::cuda::tile_rows<acc_t>();
    const size_t smem = opqn::cuda::forward_shared_bytes<acc_t>(d, K);
    LaunchConfig config{opqn::cuda::soft_quantize_grid<acc_t>(B, M), dim3(opqn::cuda::kThreads), smem,
                        smem > opqn::cuda::kSharedWithoutOptIn};
    const std::string error = opqn_emu::launch(
        config, opqn::cuda::soft_quantize_forward_kernel<scalar_t, acc_t, tile>, device_ptr<const scalar_t>(x_d),
        device_ptr<const scalar_t>(A_d), device_ptr<const scalar_t>(C_d), p_d->as<scalar_t>(), q_d->as<scalar_t>(),
        h_d->as<scalar_t>(), B, M, d, K, static_cast<acc_t>(scale), normalize != 0);
    p_d->copy_to(probs);
    q_d->copy_to(quantized);
    h_d->copy_to(entropy);
    return report(error);
  });
}

// Output gradients gp [B, M, K], gq [B, M, d], gh [B, M] (each may be null), x, A, C, probs ->
// g [B, M, K] (float, or double for float64 inputs), grad_x [B, M, d] (not computed when null)
int emu_soft_quantize_backward(int dtype, const void* gp, const void* gq, const void* gh, const void* x,
                               const void* A, const void* C, const void* probs, void* g, void* grad_x, int64_t B,
                               int64_t M, int64_t d, int64_t K, double scale, int normalize) {
  return with_dtype(dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    using acc_t = acc_type<scalar_t>;
    const size_t s = sizeof(scalar_t);
    auto gp_d = upload("grad_probs", gp, B * M * K * s), gq_d = upload("grad_quantized", gq, B * M * d * s),
         gh_d = upload("grad_entropy", gh, B * M * s), x_d = upload("x", x, B * M * d * s),
         A_d = upload("assign_weight", A, M * d * K * s), C_d = upload("codebook", C, M * d * K * s),
         p_d = upload("probs", probs, B * M * K * s);
    auto g_d = std::make_unique<DeviceBuffer>("g", B * M * K * sizeof(acc_t));
    std::unique_ptr<DeviceBuffer> gx_d;
    if (grad_x != nullptr) gx_d = std::make_unique<DeviceBuffer>("grad_x", B * M * d * s);
    constexpr int tile = opqn::cuda::tile_rows<acc_t>();
    const size_t smem = opqn::cuda::backward_shared_bytes<acc_t>(d, K);
    LaunchConfig config{opqn::cuda::soft_quantize_grid<acc_t>(B, M), dim3(opqn::cuda::kThreads), smem,
                        smem > opqn::cuda::kSharedWithoutOptIn};
    const std::string error = opqn_emu::launch(
        config, opqn::cuda::soft_quantize_backward_kernel<scalar_t, acc_t, tile>, device_ptr<const scalar_t>(gp_d),
        device_ptr<const scalar_t>(gq_d), device_ptr<const scalar_t>(gh_d), device_ptr<const scalar_t>(x_d),
        device_ptr<const scalar_t>(A_d), device_ptr<const scalar_t>(C_d), device_ptr<const scalar_t>(p_d),
        g_d->as<acc_t>(), device_ptr<scalar_t>(gx_d), B, M, d, K, static_cast<acc_t>(scale), normalize != 0);
    g_d->copy_to(g);
    download(gx_d, grad_x);
    return report(error);
  });
}

// x: [B, M, d]; A: [M, d, K] -> codes [B, M] uint8, *nonfinite 1 where a similarity is not finite (else as given)
int emu_encode(int dtype, const void* x, const void* A, uint8_t* codes, int* nonfinite, int64_t B, int64_t M,
               int64_t d, int64_t K) {
  return with_dtype(dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    using acc_t = acc_type<scalar_t>;
    const size_t s = sizeof(scalar_t);
    auto x_d = upload("x", x, B * M * d * s), A_d = upload("assign_weight", A, M * d * K * s);
    auto c_d = std::make_unique<DeviceBuffer>("codes", B * M);
    auto flag_d = upload("nonfinite", nonfinite, sizeof(int));
    const size_t smem = opqn::cuda::encode_shared_bytes<acc_t>(d, K);
    LaunchConfig config{opqn::cuda::encode_grid(B, M), dim3(opqn::cuda::kThreads), smem,
                        smem > opqn::cuda::kSharedWithoutOptIn};
    const std::string error =
        opqn_emu::launch(config, opqn::cuda::encode_kernel<scalar_t, acc_t>, device_ptr<const scalar_t>(x_d),
                         device_ptr<const scalar_t>(A_d), c_d->as<uint8_t>(), flag_d->as<int>(), B, M, d, K);
    c_d->copy_to(codes);
    flag_d->copy_to(nonfinite);
    return report(error);
  });
}

// luts: [nq, M, stride] padded tables (stride 256 for layouts 0/1, 16 for layout 2); codes: code_bytes
// of rows [N, M] (layout 0 bytes, 1 words) or pack_codes4 blocks (layout 2, `pairs` book pairs) ->
// for codes [first, first + count): scores [nq, count] and signed rank keys [nq, count] (each unless null)
int emu_adc_dense(int layout, int placement, const float* luts, int64_t nq, int64_t M, int64_t stride,
                  const uint8_t* codes, int64_t code_bytes, int64_t pairs, int64_t first, int64_t count, float* scores,
                  int64_t* keys) {
  auto lut_d = upload("luts", luts, nq * M * stride * sizeof(float));
  auto codes_d = upload("codes", codes, code_bytes);
  std::unique_ptr<DeviceBuffer> scores_d, keys_d;
  if (scores != nullptr) scores_d = std::make_unique<DeviceBuffer>("scores", nq * count * sizeof(float));
  if (keys != nullptr) keys_d = std::make_unique<DeviceBuffer>("keys", nq * count * sizeof(int64_t));
  const std::string error = with_codes(layout, codes_d->as<uint8_t>(), M, pairs, [&](auto rows) {
    using Codes = decltype(rows);
    if (Codes::kLutStride != stride) return std::string("table stride does not match the code layout");
    return opqn_emu::launch_adc_dense(placement, lut_d->as<const float>(), nq, rows, M, first, count,
                                      device_ptr<float>(scores_d), device_ptr<int64_t>(keys_d));
  });
  download(scores_d, scores);
  download(keys_d, keys);
  return report(error);
}

// As emu_adc_dense -> candidates [nq, blocks, k]: each select block's k best signed rank keys
int emu_adc_select(int layout, int placement, const float* luts, int64_t nq, int64_t M, int64_t stride,
                   const uint8_t* codes, int64_t code_bytes, int64_t pairs, int64_t first, int64_t count, int64_t k,
                   int64_t* candidates) {
  auto lut_d = upload("luts", luts, nq * M * stride * sizeof(float));
  auto codes_d = upload("codes", codes, code_bytes);
  const int64_t blocks = opqn::cuda::select_grid(count, nq).x;
  auto out_d = std::make_unique<DeviceBuffer>("candidates", nq * blocks * k * sizeof(int64_t));
  const std::string error = with_codes(layout, codes_d->as<uint8_t>(), M, pairs, [&](auto rows) {
    using Codes = decltype(rows);
    if (Codes::kLutStride != stride) return std::string("table stride does not match the code layout");
    return opqn_emu::launch_adc_select(placement, lut_d->as<const float>(), nq, rows, M, first, count, k,
                                       out_d->as<int64_t>());
  });
  out_d->copy_to(candidates);
  return report(error);
}

// top: [n] signed rank keys of codes from `first` on -> scores [n], indices [n]
int emu_decode_keys(const int64_t* top, int64_t n, int64_t first, float* scores, int64_t* indices) {
  auto top_d = upload("top", top, n * sizeof(int64_t));
  auto scores_d = std::make_unique<DeviceBuffer>("scores", n * sizeof(float));
  auto indices_d = std::make_unique<DeviceBuffer>("indices", n * sizeof(int64_t));
  const LaunchConfig config{dim3(static_cast<unsigned>(opqn::cuda::ceil_div(n, opqn::cuda::kThreads))),
                            dim3(opqn::cuda::kThreads)};
  const auto kernel = opqn::cuda::decode_keys_kernel<int64_t>;
  const std::string error = opqn_emu::launch(config, kernel, top_d->as<const int64_t>(), n, first,
                                             scores_d->as<float>(), indices_d->as<int64_t>());
  scores_d->copy_to(scores);
  indices_d->copy_to(indices);
  return report(error);
}

}  // extern "C"
