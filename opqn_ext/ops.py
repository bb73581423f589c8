"""Typed wrappers over torch.ops.opqn_ext.*, with the shapes they take and give."""
import operator
from functools import partial
from typing import NamedTuple

import torch

from . import _fake, op_fallbacks, reference


def _integer(name: str, value) -> int:
    """``value`` as an int (Python and numpy integers, integer 0-d tensors, SymInts), or a
    ValueError naming the argument: a float such as 5.5 is never silently truncated."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


_below_autograd = torch._C._AutoDispatchBelowAutograd  # a guard: op calls inside it skip autograd


def _call(op, differentiable: tuple[torch.Tensor, ...], *args):
    """``op(*args)``, straight to its kernel, past the autograd layer of its Python
    ``register_autograd`` formula (5-10 us a call), when no gradient can flow (grad mode off, or none
    of the ``differentiable`` inputs requires grad) and nothing traces the call (torch.compile and
    torch.jit keep the op and its formula in their graphs)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in differentiable):
        return op(*args)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return op(*args)
    with _below_autograd():
        return op(*args)


class PackedCodes4(NamedTuple):
    """4-bit codes packed for :func:`adc_topk4` (layout in csrc/cpu/fastscan4.h)."""

    data: torch.Tensor  # [ceil(N/32), ceil(M/2), 32] uint8
    num_codes: int  # N
    num_books: int  # M


class SoftQuantizeResult(NamedTuple):
    probs: torch.Tensor  # [B, M, K] soft-assignment probabilities (the ADC table of a query)
    quantized: torch.Tensor  # [B, M, d] soft-quantized sub-vectors  C_m @ p_m
    entropy: torch.Tensor  # [B, M] entropy of each book's assignment


def soft_quantize(
    x: torch.Tensor,
    assign_weight: torch.Tensor,
    codebook: torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    normalize: bool = False,
) -> SoftQuantizeResult:
    """Fused soft product quantization of ``x`` (DESIGN.md section 1).

    For every sample b and book m, with ``xhat = x[b, m]`` (or ``x[b, m] / max(||x[b, m]||, 1e-12)``
    when ``normalize``): ``logits = scale * xhat @ assign_weight[m]``, ``probs = softmax(logits)``,
    ``quantized = codebook[m] @ probs``, ``entropy = -sum probs * log(probs)``.

    Args:
        x: ``[B, M*d]`` or ``[B, M, d]``, floating point (float32/float64, or float16/bfloat16
            computed in float32 and returned in their dtype). May be non-contiguous.
        assign_weight: ``[M, d, K]`` assignment weights, same dtype and device as ``x``.
        codebook: ``[M, d, K]`` codewords (columns orthonormal per book, ``K <= d``).
        scale: softmax temperature multiplier (finite): a number, or a one-element tensor such as
            a module's buffer (read with ``float``; in ONNX export, under torch.func's transforms
            and when torch.compile traces, it stays a tensor, an input of the computation).
        normalize: L2-normalize each sub-vector before the similarity.

    Returns:
        ``SoftQuantizeResult(probs [B, M, K], quantized [B, M, d], entropy [B, M])``, in the dtype
        of ``x``, differentiable with respect to ``x``, ``assign_weight`` and ``codebook``.

    NaN or infinite values in ``x`` or the weights are not checked (that would cost a device
    sync): they make the outputs of the affected (sample, book) rows NaN and leave the others
    untouched.

    Under forward-mode AD and torch.func's transforms (``grad``, ``jvp``, ``jacrev``, ``jacfwd``,
    ``hessian``, ``vmap``), and in ONNX export, the result is computed by
    :func:`opqn_ext.reference.soft_quantize` (see :mod:`opqn_ext.op_fallbacks`): the same values,
    with every derivative, in standard operators.
    """
    if (op_fallbacks.differentiating(x, assign_weight, codebook) or op_fallbacks.exporting_onnx()
            or op_fallbacks.traced_tensor(scale)):
        return SoftQuantizeResult(*op_fallbacks.run(_fake._soft_quantize_fake, reference.soft_quantize,
                                                    x, assign_weight, codebook, scale, bool(normalize)))
    return SoftQuantizeResult(*_call(torch.ops.opqn_ext.soft_quantize, (x, assign_weight, codebook),
                                     x, assign_weight, codebook, float(scale), bool(normalize)))


def encode(x: torch.Tensor, assign_weight: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Database codes: ``codes[b, m] = argmax_k xhat[b, m] @ assign_weight[m]`` (ties to the smaller k).

    Args:
        x: ``[B, M*d]`` or ``[B, M, d]`` features, finite (float16/bfloat16 computed in float32).
        assign_weight: ``[M, d, K]`` with ``K <= 256``, same dtype and device as ``x``, finite.
            A NaN has no argmax: non-finite values in either are an error, found on the
            similarities during the argmax (no extra pass over ``x``; on CUDA, one sync).
        normalize: L2-normalize sub-vectors first; a positive scale per row, so it never changes
            the codes (kept for symmetry with :func:`soft_quantize`).

    Returns:
        ``codes [B, M]`` uint8 (no gradient; inputs may require grad).

    In ONNX export, standard operators (MatMul, ArgMax) compute the codes; an exported graph
    cannot raise, so there non-finite inputs give codes instead of an error.
    """
    if op_fallbacks.exporting_onnx():
        return op_fallbacks.run(_fake._encode_fake, op_fallbacks.encode_for_export, x, assign_weight, bool(normalize))
    return torch.ops.opqn_ext.encode(x, assign_weight, bool(normalize))


def adc_topk(lut: torch.Tensor, codes: torch.Tensor, k: int):
    """Asymmetric-distance top-k scan: ``score[q, i] = sum_m lut[q, m, codes[i, m]]``, larger is better.

    Args:
        lut: ``[nq, M, K]`` float32 per-query tables (for OPQN, the query's soft-assignment probs),
            finite (NaN or Inf: error).
        codes: ``[N, M]`` uint8 database codes. A code value ``>= K`` adds 0 (it never reads
            outside the table).
        k: how many results per query, ``1 <= k <= N``.

    Returns:
        ``(scores [nq, k] float32, indices [nq, k] int64)``: scores descending, equal scores in
        increasing index order; identical on every code path, CPU instruction set and thread count.
        The scores are differentiable in ``lut`` (each entry gets the gradients of the scores
        that summed it); under forward-mode AD and torch.func's transforms they are computed by
        :func:`opqn_ext.reference.adc_topk` (every score of every code, then a sort; a ``lut``
        with NaN raises there too, except under ``vmap``, ``jacfwd`` and ``hessian``, whose batched
        values decide nothing: there the NaN scores are returned). In ONNX export, standard
        operators: every score (Gather, Add), then TopK, whose ties ONNX orders by index as well.
    """
    k = _integer("k", k)
    exporting = op_fallbacks.exporting_onnx()
    if exporting or op_fallbacks.differentiating(lut, codes):
        scan = op_fallbacks.adc_topk_for_export if exporting else reference.adc_topk
        return op_fallbacks.run(op_fallbacks.with_finite_lut(_fake._adc_topk_fake), scan, lut, codes, k)
    return _call(torch.ops.opqn_ext.adc_topk, (lut,), lut, codes, k)


def adc_scores(lut: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Every ADC score: ``scores[q, i] = sum_m lut[q, m, codes[i, m]]`` (CPU and CUDA).

    The dense counterpart of :func:`adc_topk` (same arguments and checks, no ``k``): the values
    are bit-identical to the scores ``adc_topk`` reports. Used where whole rankings are needed
    (evaluation); for search, ``adc_topk`` never materializes ``[nq, N]``.

    Returns:
        ``scores [nq, N]`` float32, differentiable in ``lut`` (under forward-mode AD and
        torch.func's transforms, computed by :func:`opqn_ext.reference.adc_scores`, with the NaN
        check of :func:`adc_topk`'s fallback). In ONNX export, the same in standard operators.
    """
    if op_fallbacks.differentiating(lut, codes) or op_fallbacks.exporting_onnx():
        return op_fallbacks.run(op_fallbacks.with_finite_lut(_fake._adc_scores_fake), reference.adc_scores, lut, codes)
    return _call(torch.ops.opqn_ext.adc_scores, (lut,), lut, codes)


class RankStats(NamedTuple):
    """Per-query statistics of a whole ranking (see :func:`rank_stats`)."""

    average_precision: torch.Tensor  # [nq] float64
    hits: torch.Tensor  # [nq, P] int64
    precision_sums: torch.Tensor  # [nq, P] float64
    num_relevant: torch.Tensor  # [nq] int64


def rank_stats(scores: torch.Tensor, query_labels: torch.Tensor, db_labels: torch.Tensor,
               cutoffs=()) -> RankStats:
    """Rank the whole database for every query and summarize where the relevant items fall (CPU).

    Items are ranked by ``scores`` descending, equal scores by smaller database index (the order
    of :func:`adc_topk`); item ``i`` is relevant to query ``q`` when
    ``db_labels[i] == query_labels[q]``. A radix sort per query, parallel over queries.

    Args:
        scores: ``[nq, N]`` float32 on the CPU, finite.
        query_labels: ``[nq]`` int64; db_labels: ``[N]`` int64.
        cutoffs: rank cutoffs ``1 <= c <= N`` for ``hits`` and ``precision_sums``.

    Returns:
        :class:`RankStats`: ``average_precision [nq]`` (mean over the relevant items of the
        precision at their rank; 0 for a query without relevant items), ``hits [nq, P]`` (relevant
        items among the first ``cutoffs[p]``), ``precision_sums [nq, P]`` (the sum of the precision
        at each of those hits, so ``precision_sums / hits`` is AP@cutoff) and ``num_relevant [nq]``.
    """
    cutoffs = [_integer("cutoffs", c) for c in cutoffs]
    return RankStats(*torch.ops.opqn_ext.rank_stats(scores, query_labels, db_labels, cutoffs))


def pack_codes4(codes: torch.Tensor) -> PackedCodes4:
    """Pack ``codes [N, M]`` uint8 (every value < 16, i.e. K <= 16) for the 4-bit fast scan."""
    return PackedCodes4(torch.ops.opqn_ext.pack_codes4(codes), int(codes.shape[0]), int(codes.shape[1]))


def codes4_at(packed: torch.Tensor, indices: torch.Tensor, num_books: int) -> torch.Tensor:
    """The codes ``[..., M]`` of the items ``indices [...]`` from the data of a :class:`PackedCodes4`
    (layout in csrc/cpu/fastscan4.h): code i of book m is in block i // 32, pair m // 2, byte
    (m % 2) * 16 + i % 16, low nibble for i % 32 < 16, high nibble otherwise."""
    books = torch.arange(num_books, device=packed.device)
    i = indices.unsqueeze(-1)
    # nibbles by % and // in int32, for ONNX export: the dynamo exporter types a literal int8 against
    # uint8 bytes, and the TorchScript exporter (opset 17) has no bitwise operators on integers
    byte = packed[i // 32, books // 2, (books % 2) * 16 + i % 16].to(torch.int32)
    return torch.where(i % 32 < 16, byte % 16, byte // 16).to(torch.uint8)


def adc_topk4(lut: torch.Tensor, packed: PackedCodes4, k: int, rerank: int = 2):
    """4-bit fast-scan top-k with exact re-scoring.

    CPU: the query tables are quantized to 8-bit integers and looked up in registers (vpshufb on
    AVX2 and AVX-512); the ``rerank * k`` best approximate scores per query (kept through a top-k
    reservoir during the scan, or, in database parts of up to 131072 codes, selected among all
    their stored sums) are re-scored exactly with ``lut``, and the best ``k`` of those are
    returned, as :func:`adc_topk` would order them. The result equals exact ADC whenever every
    true top-k code survives the approximate stage (recall is measured in the tests and
    benchmarks; raise ``rerank`` for more).
    CUDA: every packed code is scored exactly with the float table (half the code bytes of
    :func:`adc_topk` to read), so the result is exact ADC's and ``rerank`` has no effect.

    Args:
        lut: ``[nq, M, K]`` float32 tables with ``K <= 16``.
        packed: from :func:`pack_codes4` of ``[N, M]`` codes.
        k: results per query, ``1 <= k <= N``.
        rerank: candidates re-scored per result (>= 1).

    Returns:
        ``(scores [nq, k] float32, indices [nq, k] int64)``: exact scores, descending, ties by index;
        the scores are differentiable in ``lut``. Under forward-mode AD and torch.func's
        transforms, the result is exact ADC's, computed by :func:`opqn_ext.reference.adc_topk` on
        the unpacked codes (with the NaN check of :func:`adc_topk`'s fallback); in ONNX export too,
        as :func:`adc_topk` is exported.
    """
    if lut.dim() == 3 and packed.num_books != lut.shape[1]:  # other ranks: the op's error names them
        raise ValueError(f"packed codes have {packed.num_books} books but lut has M={lut.shape[1]}")
    k, rerank = _integer("k", k), _integer("rerank", rerank)
    exporting = op_fallbacks.exporting_onnx()
    if exporting or op_fallbacks.differentiating(lut):
        if rerank < 1:
            raise RuntimeError(f"rerank must be >= 1 (candidates re-scored per result), got {rerank}")
        codes = codes4_at(packed.data, torch.arange(packed.num_codes, device=packed.data.device), packed.num_books)
        checks = partial(_fake._check_topk_args, max_words=16, words="4-bit codes")
        scan = op_fallbacks.adc_topk_for_export if exporting else reference.adc_topk
        return op_fallbacks.run(op_fallbacks.with_finite_lut(checks), scan, lut, codes, k)
    return _call(torch.ops.opqn_ext.adc_topk4, (lut,), lut, packed.data, packed.num_codes, k, rerank)
