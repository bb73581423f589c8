// The one TORCH_LIBRARY block: every schema of the opqn_ext namespace. Kernels are registered per
// dispatch key next to their implementation (cpu/, cuda/); fake kernels and autograd in Python.
#include <torch/library.h>

TORCH_LIBRARY(opqn_ext, m) {
  // x: [B, M*d] or [B, M, d]; assign_weight, codebook: [M, d, K]
  // -> probs [B, M, K], quantized [B, M, d], entropy [B, M]
  m.def(
      "soft_quantize(Tensor x, Tensor assign_weight, Tensor codebook, float scale, bool normalize)"
      " -> (Tensor probs, Tensor quantized, Tensor entropy)");
  // Gradients of soft_quantize. Any output gradient may be None; output_mask says which input
  // gradients to compute (x, assign_weight, codebook); the others come back as empty tensors.
  m.def(
      "soft_quantize_backward(Tensor? grad_probs, Tensor? grad_quantized, Tensor? grad_entropy,"
      " Tensor x, Tensor assign_weight, Tensor codebook, Tensor probs, float scale, bool normalize,"
      " bool[3] output_mask) -> (Tensor grad_x, Tensor grad_assign_weight, Tensor grad_codebook)");
  // x: [B, M*d] or [B, M, d]; assign_weight: [M, d, K], K <= 256 -> codes [B, M] uint8:
  // argmax_k of x[b, m] @ assign_weight[m], ties to the smaller k
  m.def("encode(Tensor x, Tensor assign_weight, bool normalize) -> Tensor codes");
  // lut: [nq, M, K] float32; codes: [N, M] uint8 -> scores [nq, k] float32 (descending),
  // indices [nq, k] int64; score(i) = sum_m lut[q, m, codes[i, m]]; ties to the smaller index
  m.def("adc_topk(Tensor lut, Tensor codes, int k) -> (Tensor scores, Tensor indices)");
  // lut: [nq, M, K] float32; codes: [N, M] uint8 -> scores [nq, N] float32, the adc_topk score
  // of every code (books added in order, so the values equal adc_topk's)
  m.def("adc_scores(Tensor lut, Tensor codes) -> Tensor scores");
  // CPU. scores: [nq, N] float32; labels int64; relevant = same label. Ranking by score descending,
  // ties to the smaller database index. -> average_precision [nq] float64 (0 without relevant
  // items), hits [nq, P] int64 (relevant items among the first cutoffs[p]), precision_sums
  // [nq, P] float64 (sum of the precision at each of those hits), num_relevant [nq] int64
  m.def(
      "rank_stats(Tensor scores, Tensor query_labels, Tensor db_labels, int[] cutoffs)"
      " -> (Tensor average_precision, Tensor hits, Tensor precision_sums, Tensor num_relevant)");
  // codes: [N, M] uint8, every value < 16 -> packed [ceil(N/32), ceil(M/2), 32] uint8 (fastscan4.h)
  m.def("pack_codes4(Tensor codes) -> Tensor packed");
  // lut: [nq, M, K <= 16] float32; packed from pack_codes4 of num_codes codes -> the top-k of the
  // exact scores among the rerank * k best approximate (8-bit table) scores of each query
  m.def("adc_topk4(Tensor lut, Tensor packed, int num_codes, int k, int rerank) -> (Tensor scores, Tensor indices)");
}
