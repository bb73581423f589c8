// The CUDA adc_topk / adc_topk4 pipeline of csrc/cuda/adc_scan_topk.h (chunks, block candidates,
// at::topk, key decoding, merge) run on CPU tensors with the kernels in the emulator. Driven by
// test_cuda_kernels_emulated.py; returns 0, or 1 with the error in emu_last_error().
#include <stdexcept>
#include <string>

#include <ATen/ops/from_blob.h>

#include "adc_launch.h"
#include "cuda/adc_scan_topk.h"
#include "entry_error.h"

namespace {

void check(const std::string& error) {
  if (!error.empty()) throw std::runtime_error(error);
}

// The launcher of scan_topk over emulated kernels; luts, codes and outputs are host memory. Its
// grids hold at most max_queries queries (a GPU's: 65535), so a launch with more is an error.
struct EmulatedLauncher {
  int64_t max_queries;

  void check_grid(const at::Tensor& luts) const {
    if (luts.size(0) > max_queries)
      throw std::runtime_error("a launch over " + std::to_string(luts.size(0)) + " queries, past the grid's " +
                               std::to_string(max_queries));
  }

  template <class Codes>
  void select(const at::Tensor& luts, const Codes& codes, int64_t first, int64_t count, int64_t k,
              int64_t* candidates) const {
    check_grid(luts);
    check(opqn_emu::launch_adc_select(opqn_emu::kAsTheHostDecides, luts.const_data_ptr<float>(), luts.size(0),
                                      codes, luts.size(1), first, count, k, candidates));
  }

  template <class Codes>
  void dense(const at::Tensor& luts, const Codes& codes, int64_t first, int64_t count, float* scores,
             int64_t* keys) const {
    check_grid(luts);
    check(opqn_emu::launch_adc_dense(opqn_emu::kAsTheHostDecides, luts.const_data_ptr<float>(), luts.size(0),
                                     codes, luts.size(1), first, count, scores, keys));
  }

  void decode(const int64_t* top, int64_t n, int64_t first, float* scores, int64_t* indices) const {
    const opqn_emu::LaunchConfig config{dim3(static_cast<unsigned>(opqn::cuda::ceil_div(n, opqn::cuda::kThreads))),
                                        dim3(opqn::cuda::kThreads)};
    check(opqn_emu::launch(config, opqn::cuda::decode_keys_kernel<int64_t>, top, n, first, scores, indices));
  }
};

}  // namespace

extern "C" {

// lut: [nq, M, K] float32; codes: rows [N, M] (layout 0 bytes, 1 words) or pack_codes4's blocks
// (layout 2, `pairs` book pairs) -> scores [nq, k], indices [nq, k], with chunks of at most
// chunk_elements candidates or keys and groups of at most max_queries queries
int emu_adc_topk(int layout, const float* lut, int64_t nq, int64_t M, int64_t K, const uint8_t* codes, int64_t pairs,
                 int64_t N, int64_t k, int64_t chunk_elements, int64_t max_queries, float* scores, int64_t* indices) {
  try {
    const at::Tensor lut_t = at::from_blob(const_cast<float*>(lut), {nq, M, K}, at::kFloat);
    const EmulatedLauncher launcher{max_queries};
    std::tuple<at::Tensor, at::Tensor> top;
    const auto scan = [&](const auto& device_codes) {
      return opqn::cuda::scan_topk(launcher, lut_t, device_codes, N, k, chunk_elements, max_queries);
    };
    switch (layout) {
      case 0: top = scan(opqn::cuda::RowCodes<false>{codes, M}); break;
      case 1: top = scan(opqn::cuda::RowCodes<true>{codes, M}); break;
      case 2: top = scan(opqn::cuda::PackedCodes4{codes, M, pairs}); break;
      default: throw std::runtime_error("unknown code layout " + std::to_string(layout));
    }
    at::from_blob(scores, {nq, k}, at::kFloat).copy_(std::get<0>(top));
    at::from_blob(indices, {nq, k}, at::kLong).copy_(std::get<1>(top));
    return opqn_emu::report("");
  } catch (const std::exception& e) {
    return opqn_emu::report(e.what());
  }
}

}  // extern "C"
