"""OPQNIndex: a searchable, persistent database of OPQN codes; ShardedIndex: the same spread over
the ranks of a torch.distributed process group.

An index holds the model parts that encoding and querying need (assignment weights, codebook,
query scale) and, per item, a uint8 code ``[M]``, an int64 id and an int64 label (-1: none).
Items are kept sorted by id, so the scan's tie order (smaller position first) is the order of
smaller ids; a sharded search merges shards in the same order and returns exactly what one index
holding every item returns.

Files (``save`` / ``load``): one safetensors file with the arrays, and a JSON header (format
version, settings, array checksums) in its metadata; never pickle. A save writes a temporary file
next to the target, fsyncs it and renames it over the target, so a crash leaves the previous
index intact. ``load(mmap=True)`` maps codes, ids and labels from the file instead of reading
them, so an index larger than memory can be searched; checksums are verified on load unless
``verify=False``.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import threading
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .arrays import Array, as_tensor
from .distributed import all_gather_rows, all_gather_topk, all_reduce_sum
from .ops import PackedCodes4, _integer, adc_scores, adc_topk, adc_topk4, encode, pack_codes4, soft_quantize
from .safetensors_files import save_file

FORMAT = "opqn-index"
FORMAT_VERSION = 1
_ARRAYS = ("codes", "ids", "labels", "assign_weight", "codebook")
_DTYPES = {"codes": ("U8", np.uint8), "ids": ("I64", np.int64), "labels": ("I64", np.int64),
           "assign_weight": ("F32", np.float32), "codebook": ("F32", np.float32)}  # safetensors' name, numpy's
_PER_ITEM = ("codes", "ids", "labels")  # memory-mapped by load(mmap=True)
_CRC_CHUNK = 64 << 20
# range_search: the k of its first top-k scan, the factor by which k grows for queries whose top-k
# all scored above the threshold, and the largest k (the CUDA scan's) before it computes every score
RANGE_FIRST_K, RANGE_GROWTH, RANGE_MAX_K = 64, 16, 1024
# the id of the places in a top-k beyond the items searched (as FAISS); never an item's id
NO_ID = -1


class IndexFileError(ValueError):
    """An index file that is missing, truncated, corrupted or of another format version."""


def _append_rows(current: torch.Tensor, buffer: torch.Tensor | None, rows: torch.Tensor):
    """``(current ++ rows, the buffer behind it)``, in amortized O(len(rows)): ``current`` is kept as
    the prefix of a buffer with spare room, which the rows go into; when it is not that buffer's
    prefix or the room runs out, a new buffer with room for half as many rows again takes over."""
    n, need = current.shape[0], current.shape[0] + rows.shape[0]
    fits = (buffer is not None and buffer.device == current.device and need <= buffer.shape[0]
            and (n == 0 or current.data_ptr() == buffer.data_ptr()))
    if buffer is None or not fits:
        buffer = torch.empty((need if n == 0 else max(need, n + n // 2), *current.shape[1:]),
                             dtype=current.dtype, device=current.device)
        buffer[:n] = current
    buffer[n:need] = rows
    return buffer[:need], buffer


def _is_integer(values: torch.Tensor) -> bool:
    """Integer dtype, or empty (``torch.as_tensor([])`` is float32)."""
    return values.numel() == 0 or not (values.dtype.is_floating_point or values.dtype.is_complex
                                       or values.dtype == torch.bool)


def _integer_ids(ids, name: str = "ids") -> torch.Tensor:
    """``ids`` (a sequence, array or tensor of integers) as an int64 CPU tensor; floats, bools and
    anything else are refused (a ValueError naming the argument ``name``) rather than truncated."""
    try:
        ids = torch.as_tensor(ids).cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be integers, got {type(ids).__name__} ({err})") from None
    if not _is_integer(ids):
        raise ValueError(f"{name} must be integers, got {ids.dtype}")
    return ids.long()


def _check_item_ids(ids: torch.Tensor, name: str = "ids") -> None:
    """Refuses NO_ID, which search returns where fewer than k items exist."""
    if bool((ids == NO_ID).any()):
        raise ValueError(f"{name} must not hold {NO_ID}: search returns that id where fewer than k items "
                         "exist (as FAISS)")


def _checked_k(k, fast_scan: bool, num_words: int) -> int:
    """A search's k as an int, after the checks of k and fast_scan every search makes."""
    k = _integer("k", k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if fast_scan and num_words > 16:
        raise ValueError(f"fast_scan needs K <= 16 codes; this index has K={num_words}")
    return k


def _padded_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[nq, n]`` results (n <= k) widened to ``[nq, k]`` with score -inf and id NO_ID."""
    nq, n = scores.shape
    if n == k:
        return scores, ids
    return (torch.cat([scores, scores.new_full((nq, k - n), float("-inf"))], 1),
            torch.cat([ids, ids.new_full((nq, k - n), NO_ID)], 1))


def _is_orthonormal(codebook: torch.Tensor, tol: float = 1e-4) -> bool:
    """Whether every book's ``C_m^T C_m`` is within ``tol`` of the identity."""
    gram = torch.einsum("mdk,mdl->mkl", codebook.double(), codebook.double())
    return bool((gram - torch.eye(codebook.shape[2], dtype=torch.float64, device=codebook.device)).abs().max() <= tol)


def _crc32(array: np.ndarray) -> int:
    flat = array.reshape(-1).view(np.uint8)
    crc = 0
    for start in range(0, flat.size, _CRC_CHUNK):
        crc = zlib.crc32(flat[start:start + _CRC_CHUNK].data, crc)
    return crc


def _ranges(nq: int, query: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor):
    """Range-search results found in any order (``query``, ``scores``, ``ids``: ``[n]`` each) as
    ``(lims [nq + 1], scores, ids)``: by query, then score descending, then smaller id. Stable sorts
    by each key, the last key first."""
    order = torch.sort(ids, stable=True).indices
    order = order[torch.sort(scores[order], stable=True, descending=True).indices]
    order = order[torch.sort(query[order], stable=True).indices]
    lims = torch.zeros(nq + 1, dtype=torch.int64)
    lims[1:] = torch.cumsum(torch.bincount(query, minlength=nq), 0)
    return lims, scores[order], ids[order]


def _rows(rows: list[int]) -> str:
    shown = ", ".join(map(str, rows[:10]))
    return f"rows [{shown}]" + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")


def _check_finite_rows(name: str, values: torch.Tensor, batch_size: int = 65536) -> None:
    """A ValueError naming the rows of ``values [n, D]`` that hold NaN or infinite values, if any
    (looked for ``batch_size`` rows at a time)."""
    bad = [(~torch.isfinite(values[i:i + batch_size]).all(1)).nonzero().flatten().cpu() + i
           for i in range(0, len(values), batch_size)]
    rows = torch.cat(bad).tolist() if bad else []
    if rows:
        raise ValueError(f"{name} must be finite: {_rows(rows)} hold NaN or infinite values")


class OPQNIndex:
    """Encode, add, remove, search, save and load OPQN codes.

    Args:
        assign_weight: ``[M, d, K]`` assignment weights (the trained head's, or the codebook).
        codebook: ``[M, d, K]`` orthonormal codebook.
        query_scale: logit scale of query tables (normalized sub-features; the head's
            ``feature_norm`` unless set).
        settings: JSON-serializable model settings stored with the index (e.g. the training config).
        orthonormal: whether the codebook is orthonormal, so that a query's table is its assignment
            probabilities; otherwise (a codebook learned away from orthonormality) the table holds
            the inner products of the soft-quantized query with the codewords, as the head's
            ``query_lut``. None: whether ``C_m^T C_m`` is within 1e-4 of the identity.
    """

    def __init__(self, assign_weight: torch.Tensor, codebook: torch.Tensor, query_scale: float,
                 settings: dict | None = None, orthonormal: bool | None = None):
        if assign_weight.dim() != 3 or assign_weight.shape != codebook.shape:
            raise ValueError(f"assign_weight and codebook must both be [M, d, K], got {list(assign_weight.shape)} "
                             f"and {list(codebook.shape)}")
        M, d, K = assign_weight.shape
        if K > 256:
            raise ValueError(f"codes are uint8, so K must be <= 256, got K={K}")
        self.assign_weight = assign_weight.detach().float().contiguous()
        self.codebook = codebook.detach().float().contiguous()
        self.query_scale = float(query_scale)
        for name, t in (("assign_weight", self.assign_weight), ("codebook", self.codebook),
                        ("query_scale", torch.tensor(self.query_scale))):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} must be finite (in float32): it holds NaN or infinite values")
        self.orthonormal = _is_orthonormal(self.codebook) if orthonormal is None else bool(orthonormal)
        self.settings = dict(settings or {})
        self.num_books, self.dim, self.num_words = M, d, K
        device = self.assign_weight.device
        self.codes = torch.zeros(0, M, dtype=torch.uint8, device=device)  # [N, M]
        self.ids = torch.zeros(0, dtype=torch.int64)  # [N], increasing
        self.labels = torch.zeros(0, dtype=torch.int64)  # [N], -1 = none
        self.mapped_codes: np.memmap | None = None  # the file mapping behind codes after load(mmap=True)
        self._buffers: dict[str, torch.Tensor] = {}  # codes, ids, labels: prefixes of these (_append_rows)
        self._packed_codes: PackedCodes4 | None = None  # 4-bit layout of (a prefix of) the codes, for fast_scan

    @classmethod
    def from_head(cls, head, settings: dict | None = None) -> "OPQNIndex":
        """An empty index for the codes of a trained :class:`~opqn_ext.nn.OrthoPQHead`."""
        scale = head.query_scale if head.query_scale is not None else float(head.feature_norm)
        return cls(head.assignment_weight, head.codebook, scale, settings, orthonormal=not head.learn_codebook)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def code_bits(self) -> int:
        return self.num_books * math.ceil(math.log2(self.num_words)) if self.num_words > 1 else 0

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __repr__(self) -> str:
        return (f"OPQNIndex({len(self)} items, M={self.num_books}, K={self.num_words}, d={self.dim}, "
                f"device={self.device})")

    def to(self, device) -> "OPQNIndex":
        """Move codes and model parts to ``device`` (ids and labels stay on the CPU); returns self."""
        device = torch.device(device)
        if device != self.codes.device:
            self.codes, self.mapped_codes, self._packed_codes = self.codes.to(device), None, None
        self.assign_weight = self.assign_weight.to(device)
        self.codebook = self.codebook.to(device)
        return self

    # ---- adding and removing -------------------------------------------------------------

    def encode(self, features: Array, batch_size: int = 65536) -> torch.Tensor:
        """Codes ``[B, M]`` uint8 of features ``[B, M*d]`` (a tensor or array), in batches."""
        features = as_tensor(features, "features")
        if features.dim() != 2 or features.shape[1] != self.num_books * self.dim:
            raise ValueError(f"features must be [B, {self.num_books * self.dim}], got {list(features.shape)}")
        parts = []
        for i in range(0, features.shape[0], batch_size):
            batch = features[i:i + batch_size].to(self.device, torch.float32)
            try:
                parts.append(encode(batch, self.assign_weight))
            except RuntimeError:
                _check_finite_rows("features", features, batch_size)
                raise
        return torch.cat(parts) if parts else torch.zeros(0, self.num_books, dtype=torch.uint8, device=self.device)

    def add(self, features: Array, ids=None, labels=None, batch_size: int = 65536) -> torch.Tensor:
        """Encode and add ``features [B, M*d]``; returns the ids given to them (int64 ``[B]``)."""
        return self.add_codes(self.encode(features, batch_size), ids, labels)

    def add_codes(self, codes: Array, ids=None, labels=None) -> torch.Tensor:
        """Add precomputed codes ``[B, M]`` uint8 (every value < K); ids default to those after the
        largest id held (from 0); duplicate ids (within the call or with the index) and the id -1
        (search's mark of a missing result) are rejected.

        Ids above every id in the index (the default) are appended in amortized O(B): the per-item
        arrays keep spare room, grown by half when full. Other ids are looked up in the index
        (O(B log N)) and sorted in (O(N log N))."""
        codes = as_tensor(codes, "codes")
        if codes.dim() != 2 or codes.shape[1] != self.num_books or codes.dtype != torch.uint8:
            raise ValueError(f"codes must be uint8 [B, {self.num_books}], got {codes.dtype} {list(codes.shape)}")
        n = codes.shape[0]
        if n and int(codes.max()) >= self.num_words:
            raise ValueError(f"codes must be < K={self.num_words}, got a code {int(codes.max())}")
        last = int(self.ids[-1]) if len(self) else NO_ID
        start = max(last + 1, 0)
        ids = torch.arange(start, start + n) if ids is None else torch.as_tensor(ids).cpu()
        if ids.dim() != 1 or len(ids) != n or not _is_integer(ids):
            raise ValueError(f"ids must be {n} integers, got {ids.dtype} {list(ids.shape)}")
        ids = ids.long()
        _check_item_ids(ids)
        labels = torch.full((n,), -1, dtype=torch.int64) if labels is None else torch.as_tensor(labels).cpu()
        if labels.dim() != 1 or len(labels) != n or not _is_integer(labels):
            raise ValueError(f"labels must be {n} integers, got {labels.dtype} {list(labels.shape)}")
        if len(ids.unique()) != n:
            raise ValueError("ids must be unique: the batch repeats an id")
        in_order = n == 0 or (int(ids.min()) > last and bool((ids[1:] > ids[:-1]).all()))
        if not in_order:
            clash = self._find(ids)[1]
            if bool(clash.any()):
                raise ValueError(f"ids already in the index: {ids[clash][:10].tolist()}")
        self._insert(codes, ids, labels.long(), in_order)
        return ids

    def _insert(self, codes: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, in_order: bool) -> None:
        """Adds rows already checked (codes < K, ids unique and new to the index); ``in_order``:
        the ids increase and follow every id held, so the rows are appended, not sorted in."""
        for name, rows in (("codes", codes.to(self.device)), ("ids", ids), ("labels", labels)):
            value, self._buffers[name] = _append_rows(getattr(self, name), self._buffers.get(name), rows)
            setattr(self, name, value)
        self.mapped_codes = None
        if not in_order:
            self._sort_by_id()  # the packed layout no longer describes a prefix of the codes

    def _sort_by_id(self) -> None:
        order = torch.argsort(self.ids, stable=True)
        self.ids, self.labels = self.ids[order], self.labels[order]
        self.codes = self.codes[order.to(self.device)]
        self._packed_codes = None

    def _find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, whether found) of int64 ``ids [n]``: a binary search of the sorted ids;
        positions of ids not found are any valid position (0 in an empty index)."""
        if not len(self):
            return torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
        pos = torch.searchsorted(self.ids, ids).clamp(max=len(self) - 1)
        return pos, self.ids[pos] == ids

    def remove(self, ids) -> int:
        """Remove the items with these ids; returns how many were present."""
        pos, found = self._find(_integer_ids(ids).reshape(-1))
        gone = torch.zeros(len(self), dtype=torch.bool)
        gone[pos[found]] = True
        removed = int(gone.sum())
        if removed:
            keep = ~gone
            self.ids, self.labels = self.ids[keep], self.labels[keep]
            self.codes = self.codes[keep.to(self.device)]
            self.mapped_codes, self._packed_codes = None, None
        return removed

    def contains(self, ids) -> torch.Tensor:
        """Whether each of ``ids`` (any shape) is the id of an item of the index (bool, same shape)."""
        ids = _integer_ids(ids)
        return self._find(ids.reshape(-1))[1].reshape(ids.shape)

    def labels_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Labels of items given by id (any shape); -1 for ids not in the index."""
        ids = _integer_ids(ids)
        pos, found = self._find(ids.reshape(-1))
        labels = torch.where(found, self.labels[pos] if len(self) else pos, -1)
        return labels.reshape(ids.shape)

    def reconstruct(self, ids) -> torch.Tensor:
        """The vectors ``[n, M*d]`` float32 that the items of ``ids`` (``[n]``) stand for: per book,
        the codeword of its code. A query's ADC score of an item is the inner product of its
        soft-quantized sub-vectors with these (the probability tables of an orthonormal codebook
        are those inner products)."""
        ids = _integer_ids(ids).reshape(-1)
        pos, found = self._find(ids)
        missing = ~found
        if bool(missing.any()):
            raise ValueError(f"ids not in the index: {ids[missing][:10].tolist()}")
        codes = self.codes[pos.to(self.device)].long()  # [n, M]
        words = self.codebook.transpose(1, 2)  # [M, K, d]
        return words[torch.arange(self.num_books, device=self.device), codes].reshape(len(ids), -1)

    # ---- search ----------------------------------------------------------------------------

    @torch.no_grad()
    def query_lut(self, queries: Array) -> torch.Tensor:
        """Query tables ``[nq, M, K]`` float32 of features ``[nq, M*d]`` (no gradient): the inner
        products of the soft-quantized queries with the codewords, which an orthonormal codebook
        makes the assignment probabilities. Queries that give tables with NaN or infinities (their
        own, or products that overflow) are named in a ValueError. A query's table may differ in its
        last bits with the batch it comes in (up to 2^21 multiply-adds a product, as 64 queries of
        8 x 64 x 64: row loops; more: BLAS)."""
        queries = as_tensor(queries, "queries")
        luts = self._tables(queries)
        if not bool(torch.isfinite(luts).all()):
            _check_finite_rows("queries", queries)
            bad = (~torch.isfinite(luts).flatten(1).all(1)).nonzero().flatten().tolist()
            raise ValueError(f"queries {_rows(bad)} give tables that are not finite: their values are so large "
                             "that a sub-vector's products with the weights or its squared norm overflow float32")
        return luts

    def _tables(self, queries: torch.Tensor) -> torch.Tensor:
        """query_lut's tables, unchecked: search leaves the check to the scan, which makes it anyway."""
        if queries.dim() != 2 or queries.shape[1] != self.num_books * self.dim:
            raise ValueError(f"queries must be [nq, {self.num_books * self.dim}], got {list(queries.shape)}")
        queries = queries.to(self.device, torch.float32)
        sq = soft_quantize(queries, self.assign_weight, self.codebook, self.query_scale, True)
        return sq.probs if self.orthonormal else torch.einsum("bmd,mdk->bmk", sq.quantized, self.codebook)

    def search(self, queries: Array, k: int, batch_size: int = 4096, fast_scan: bool = False,
               rerank: int = 2, subset=None):
        """Top-k of feature queries ``[nq, M*d]``: ``(scores [nq, k] float32, ids [nq, k] int64)``,
        scores descending, ties to the smaller id; queries go in batches (bounded memory). Where
        fewer than k items are searched, the places after them hold score -inf and id -1 (FAISS
        writes -1 and the lowest float there).
        ``subset``: ids of the items to search among (FAISS's ID selector; ids the index lacks are
        ignored); their codes are gathered and scanned.

        No gradient flows (for differentiable scores, call :func:`~opqn_ext.adc_topk` on tables
        that require grad). ``fast_scan`` (K <= 16): the 4-bit scan ``adc_topk4``; on the CPU, register lookups with
        ``rerank * k`` candidates re-scored exactly: returned scores are exact, the result equals the
        exact scan whenever every true top-k item survives the approximate stage (recall measured in
        tests); on CUDA, an exact scan of the packed codes.
        """
        queries = as_tensor(queries, "queries")
        return self._search(lambda q0, q1: self._tables(queries[q0:q1]), queries.shape[0], k, batch_size,
                            fast_scan, rerank, subset, lambda q0, q1: self.query_lut(queries[q0:q1]))

    def search_luts(self, luts: Array, k: int, batch_size: int = 4096, fast_scan: bool = False,
                    rerank: int = 2, subset=None):
        """Top-k of precomputed query tables ``[nq, M, K]``."""
        luts = as_tensor(luts, "luts")
        if luts.dim() != 3 or luts.shape[1:] != (self.num_books, self.num_words):
            raise ValueError(f"luts must be [nq, {self.num_books}, {self.num_words}], got {list(luts.shape)}")
        return self._search(lambda q0, q1: luts[q0:q1].to(self.device, torch.float32), luts.shape[0], k, batch_size,
                            fast_scan, rerank, subset)

    def restricted(self, ids) -> "OPQNIndex":
        """A new index of the items whose ids are in ``ids`` (others ignored), with this one's model
        and settings: for many searches among one large subset, whose ids ``search(subset=...)``
        would sort and look up every time (about 0.1 s per 1M ids at 10M items, RESULTS.md)."""
        return self._taking(self._positions(ids))

    def _taking(self, pos: torch.Tensor) -> "OPQNIndex":
        """A new index of the items at the increasing positions ``pos``, with this one's model and settings."""
        part = OPQNIndex(self.assign_weight, self.codebook, self.query_scale, self.settings, self.orthonormal)
        part.codes, part.ids, part.labels = self.codes[pos.to(self.device)], self.ids[pos], self.labels[pos]
        return part

    def model_mismatch(self, other: "OPQNIndex") -> str:
        """Why the codes of ``other`` do not compare with this index's queries ('' when they do): its
        shapes, assignment weights, codebook, query scale or table kind differ."""
        if (other.num_books, other.dim, other.num_words) != (self.num_books, self.dim, self.num_words):
            return (f"its codes are M={other.num_books} books of K={other.num_words} words (d={other.dim}), "
                    f"not M={self.num_books}, K={self.num_words} (d={self.dim})")
        for what, mine, theirs in (("assignment weights differ", self.assign_weight, other.assign_weight),
                                   ("codebook differs", self.codebook, other.codebook)):
            if not torch.equal(mine.cpu(), theirs.cpu()):
                return f"its {what} (another model made its codes)"
        if other.query_scale != self.query_scale or other.orthonormal != self.orthonormal:
            return "its query tables differ (query scale or codebook kind)"
        return ""

    def merge_from(self, other: "OPQNIndex", id_offset: int = 0) -> torch.Tensor:
        """Add every item of ``other`` (an index of the same model: same assignment weights,
        codebook and query scale) under its id plus ``id_offset``, with its label; ``other`` is
        left as it is and the settings are this index's. Returns the ids added (increasing). An
        id this index holds already, or another model's index, raises ValueError. FAISS's
        ``merge_from``: indexes built apart (parts of a gallery, the shards of a
        :class:`ShardedIndex`) become one."""
        why = self.model_mismatch(other)
        if why:
            raise ValueError(f"other cannot be merged: {why}")
        ids = other.ids + int(id_offset)  # increasing, as every index's
        _check_item_ids(ids, "other's ids plus id_offset")
        in_order = not len(ids) or not len(self) or int(ids[0]) > int(self.ids[-1])
        if not in_order:
            clash = self._find(ids)[1]
            if bool(clash.any()):
                raise ValueError(f"other holds ids this index holds already: {ids[clash][:10].tolist()}"
                                 + (f" and {int(clash.sum()) - 10} more" if int(clash.sum()) > 10 else ""))
        self._insert(other.codes, ids, other.labels, in_order)  # other's codes and ids are valid already
        return ids

    def subset_size(self, subset) -> int:
        """How many items a search restricted to the ids ``subset`` scans (None: every item)."""
        return len(self) if subset is None else len(self._positions(subset))

    def _positions(self, subset) -> torch.Tensor:
        """The positions, increasing, of the items whose ids are in ``subset``."""
        wanted = torch.unique(_integer_ids(subset, "subset").reshape(-1))  # sorted: a cache-friendly search
        pos, found = self._find(wanted)
        return pos[found]  # increasing, as the ids are: the scan's tie order stays the id order

    def _scanned(self, subset) -> "OPQNIndex":
        """The index a search scans: this one, or that of the items of ``subset``."""
        return self if subset is None else self.restricted(subset)

    @torch.no_grad()
    def range_search(self, queries: Array, min_score: float, batch_bytes: int = 64 << 20, subset=None):
        """Every item scoring at least ``min_score`` for each feature query ``[nq, M*d]`` (open-set
        identification: "is this person in the gallery?"), as FAISS returns ranges:
        ``(lims [nq + 1] int64, scores [lims[-1]] float32, ids [lims[-1]] int64)``; query ``q``'s
        results are ``scores[lims[q]:lims[q + 1]]``, descending, ties to the smaller id. The scores
        are ``adc_topk``'s. ``subset``: as in :meth:`search`.

        A query with few results (the usual open-set case) costs one top-k scan: its top
        ``RANGE_FIRST_K`` holds all of them when the last scores below ``min_score``; queries whose
        top-k is all above get top-k scans of ``RANGE_GROWTH`` times larger k, up to ``RANGE_MAX_K``;
        for those still full, every score is computed, for blocks of queries x items of
        ``batch_bytes`` at a time."""
        if math.isnan(min_score):
            raise ValueError("min_score must be a number, got nan")
        luts = self.query_lut(queries)  # [nq, M, K]
        scanned = self._scanned(subset)
        codes, item_ids = scanned.codes, scanned.ids
        nq, n = luts.shape[0], len(item_ids)
        found_q, found_pos, found_scores = [], [], []
        pending, k = torch.arange(nq), min(n, RANGE_FIRST_K)
        while len(pending) and k:
            top, pos = (t.cpu() for t in adc_topk(luts[pending.to(self.device)], codes, k))  # [p, k]
            complete = (top[:, -1] < min_score) | (k == n)  # every item above the threshold is in the top-k
            row, col = torch.nonzero(complete[:, None] & (top >= min_score), as_tuple=True)
            found_q.append(pending[row])
            found_pos.append(pos[row, col])
            found_scores.append(top[row, col])
            pending = pending[~complete]
            if k >= min(n, RANGE_MAX_K):
                break
            k = min(n, RANGE_MAX_K, k * RANGE_GROWTH)
        rows_per_block = max(1, min(len(pending), 256))
        cols = max(1, min(max(n, 1), batch_bytes // (4 * rows_per_block)))
        for q0 in range(0, len(pending), rows_per_block):
            block = pending[q0:q0 + rows_per_block]
            for i0 in range(0, n, cols):
                scores = adc_scores(luts[block.to(self.device)], codes[i0:i0 + cols])  # [rows, cols]
                q, pos = torch.nonzero(scores >= min_score, as_tuple=True)
                found_q.append(block[q.cpu()])
                found_pos.append(pos.cpu() + i0)
                found_scores.append(scores[q, pos].cpu())
        q = torch.cat(found_q) if found_q else torch.zeros(0, dtype=torch.int64)
        pos = torch.cat(found_pos) if found_pos else torch.zeros(0, dtype=torch.int64)
        scores = torch.cat(found_scores) if found_scores else torch.zeros(0)
        return _ranges(nq, q, scores, item_ids[pos])

    def _packed(self) -> PackedCodes4:
        """The 4-bit layout of the codes. Codes appended since it was made are packed onto it (its
        whole blocks of 32 codes stay as they are), so a growing index is never packed anew."""
        packed = self._packed_codes
        if packed is not None and packed.num_codes == len(self):
            return packed
        if packed is None:
            self._buffers.pop("packed", None)
            kept = torch.zeros(0, (self.num_books + 1) // 2, 32, dtype=torch.uint8, device=self.device)
        else:
            kept = packed.data[:packed.num_codes // 32]
        tail = pack_codes4(self.codes[kept.shape[0] * 32:])
        data, self._buffers["packed"] = _append_rows(kept, self._buffers.get("packed"), tail.data)
        self._packed_codes = PackedCodes4(data, len(self), self.num_books)
        return self._packed_codes

    @torch.no_grad()  # queries straight from a model in training mode would keep every batch's graph
    def _search(self, lut_batch, nq: int, k: int, batch_size: int, fast_scan: bool = False, rerank: int = 2,
                subset=None, checked_lut_batch=None):
        """Top-k of the tables ``lut_batch(q0, q1)`` gives; ``checked_lut_batch``: the same tables,
        with the error that names the queries whose tables are not finite (the scans reject such
        tables, then it says which), or None (the tables are the caller's)."""
        k = _checked_k(k, fast_scan, self.num_words)
        scanned = self._scanned(subset)
        found = min(k, len(scanned))  # the rest of each row: padding
        scores, ids = [], []
        for q0 in range(0, nq, batch_size):
            q1 = min(nq, q0 + batch_size)
            if not found:  # nothing to scan: the tables are only checked
                luts = (checked_lut_batch or lut_batch)(q0, q1)
                s, pos = torch.zeros(len(luts), 0), torch.zeros(len(luts), 0, dtype=torch.int64)
            else:
                luts = lut_batch(q0, q1)
                try:
                    if fast_scan:
                        s, pos = adc_topk4(luts, scanned._packed(), found, rerank)
                    else:
                        s, pos = adc_topk(luts, scanned.codes, found)
                except RuntimeError as err:
                    if checked_lut_batch is not None and "lut must be finite" in str(err):
                        checked_lut_batch(q0, q1)  # raises the error that names the queries
                    raise
            s, item_ids = _padded_topk(s.cpu(), scanned.ids.take(pos.cpu()), k)  # take: one op, no indexing
            scores.append(s)
            ids.append(item_ids)
        if len(scores) == 1:
            return scores[0], ids[0]
        if not scores:
            return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64)
        return torch.cat(scores), torch.cat(ids)

    # ---- persistence -----------------------------------------------------------------------

    def _arrays(self) -> dict[str, torch.Tensor]:
        # assign_weight copied: it may be the codebook itself (codeword assignment), and safetensors
        # refuses to write one storage twice
        return {"codes": self.codes.cpu().contiguous(), "ids": self.ids.contiguous(),
                "labels": self.labels.contiguous(), "assign_weight": self.assign_weight.cpu().clone(),
                "codebook": self.codebook.cpu().contiguous()}

    def save(self, path: str | Path) -> Path:
        """Write the index atomically (temporary file, fsync, rename) to ``path``; the file keeps the
        permissions of the index it replaces (a new one gets those of any new file)."""
        path = Path(path)
        arrays = self._arrays()
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "num_items": len(self),
                  "num_books": self.num_books, "dim": self.dim, "num_words": self.num_words,
                  "query_scale": self.query_scale, "orthonormal": self.orthonormal, "settings": self.settings,
                  "crc32": {name: _crc32(t.numpy()) for name, t in arrays.items()}}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")  # a file per saving thread
        try:
            save_file(arrays, tmp, metadata={"opqn_index": json.dumps(header)}, replaces=path)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        dir_fd = os.open(path.parent if str(path.parent) else ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return path

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True, verify: bool = True, device=None) -> "OPQNIndex":
        """Read an index written by :meth:`save`. With ``mmap`` the codes stay in the file (mapped
        copy-on-write, with the ids and labels) and are paged in by the scans; ``verify`` checks every
        array's CRC-32 (one sequential read of the file)."""
        path = Path(path)
        header, layout, data_start = _read_header(path)
        arrays: dict[str, torch.Tensor] = {}
        mapped: np.memmap | None = None
        crcs = header.get("crc32")
        for name in _ARRAYS:
            (begin, end), shape = layout[name]["data_offsets"], tuple(layout[name]["shape"])
            dtype = _DTYPES[name][1]
            array: np.ndarray
            if mmap and name in _PER_ITEM and end > begin:
                file_map = np.memmap(path, dtype=dtype, mode="c", offset=data_start + begin, shape=shape)
                mapped, array = file_map if name == "codes" else mapped, file_map
            else:
                with open(path, "rb") as f:
                    f.seek(data_start + begin)
                    raw = f.read(end - begin)
                array = np.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
            if verify and not (isinstance(crcs, dict) and _is_int(crcs.get(name))
                               and _crc32(np.ascontiguousarray(array)) == crcs[name]):
                raise IndexFileError(f"{path}: array {name} is corrupted (CRC-32 mismatch)")
            arrays[name] = torch.from_numpy(array)
        n = _member(path, header, "num_items", "the opqn_index header", _is_int)
        M = _member(path, header, "num_books", "the opqn_index header", _is_int)
        A = arrays["assign_weight"]
        if A.dim() != 3 or A.shape != arrays["codebook"].shape or A.shape[0] != M or not 1 <= A.shape[2] <= 256:
            raise IndexFileError(f"{path}: assign_weight and codebook must both be [M={M}, d, K <= 256], got "
                                 f"{list(A.shape)} and {list(arrays['codebook'].shape)}")
        if arrays["codes"].shape != (n, M) or arrays["ids"].shape != (n,) or arrays["labels"].shape != (n,):
            raise IndexFileError(f"{path}: array shapes do not match the header ({n} items, M={M})")
        query_scale = _member(path, header, "query_scale", "the opqn_index header", _is_number)
        settings = header.get("settings", {})
        if not isinstance(settings, dict):
            raise IndexFileError(f"{path}: corrupted index file header (settings is not a JSON object)")
        orthonormal = header.get("orthonormal")  # not a boolean (a file without it): detected
        try:  # the constructor's checks of the model (finite weights and scale) apply to files too
            index = cls(arrays["assign_weight"], arrays["codebook"], query_scale, settings,
                        orthonormal if isinstance(orthonormal, bool) else None)
        except ValueError as err:
            raise IndexFileError(f"{path}: {err}") from err
        index.codes, index.ids, index.labels = arrays["codes"], arrays["ids"], arrays["labels"]
        index.mapped_codes = mapped
        if n > 1 and not bool((index.ids[1:] > index.ids[:-1]).all()):
            raise IndexFileError(f"{path}: ids are not strictly increasing")
        if n and bool(index._find(torch.tensor([NO_ID]))[1]):
            raise IndexFileError(f"{path}: holds an item of id {NO_ID}, which search reserves for missing results")
        return index.to(device) if device is not None else index


def _read_header(path: Path) -> tuple[dict, dict, int]:
    """(our JSON header, the safetensors tensor layout, offset of the data) with every check."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise IndexFileError(f"{path}: truncated index file ({size} bytes)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(size - 8, 100 << 20):
                raise IndexFileError(f"{path}: truncated or corrupted index file (header of {header_len} bytes in a "
                                     f"{size}-byte file)")
            layout = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise IndexFileError(f"{path}: index file does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IndexFileError(f"{path}: corrupted index file header ({err})") from None
    if not isinstance(layout, dict):
        raise IndexFileError(f"{path}: corrupted index file header")
    meta = layout.pop("__metadata__", {}) or {}
    try:
        header = json.loads(meta["opqn_index"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise IndexFileError(f"{path}: not an OPQN index (no opqn_index header)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise IndexFileError(f"{path}: not an OPQN index (format "
                             f"{header.get('format') if isinstance(header, dict) else 'missing'!r})")
    version = header.get("format_version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise IndexFileError(f"{path}: index format version {version} is not supported "
                             f"(this opqn_ext reads version {FORMAT_VERSION})")
    data_start = 8 + header_len
    for name in _ARRAYS:
        if name not in layout:
            raise IndexFileError(f"{path}: array {name} is missing")
        offsets = _member(path, layout[name], "data_offsets", name, _are_ints)
        shape = _member(path, layout[name], "shape", name, _are_ints)
        dtype = _member(path, layout[name], "dtype", name, lambda v: isinstance(v, str))
        if dtype != _DTYPES[name][0]:
            raise IndexFileError(f"{path}: array {name} has dtype {dtype}, not {_DTYPES[name][0]}")
        if len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
            raise IndexFileError(f"{path}: corrupted index file header (byte range of array {name})")
        if offsets[1] > size - data_start:
            raise IndexFileError(f"{path}: truncated index file (array {name} ends at byte {offsets[1]} of the data, "
                                 f"which has {size - data_start})")
        item = np.dtype(_DTYPES[name][1]).itemsize
        # sizes whose product (zeros counted as ones) exceeds the file: an empty array of them is refused too
        if (any(s < 0 for s in shape) or math.prod(max(s, 1) for s in shape) * item > size
                or math.prod(shape) * item != offsets[1] - offsets[0]):
            raise IndexFileError(f"{path}: array {name} has {offsets[1] - offsets[0]} bytes for shape {shape}")
    return header, layout, data_start


def _is_int(value) -> bool:
    """A JSON integer (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or isinstance(value, float)


def _are_ints(value) -> bool:
    return isinstance(value, list) and all(map(_is_int, value))


def _member(path: Path, obj, key: str, where: str, holds):
    """``obj[key]`` of a JSON header where ``holds`` it, or the IndexFileError naming the member."""
    if not isinstance(obj, dict) or key not in obj:
        raise IndexFileError(f"{path}: corrupted index file header ({where} has no {key})")
    if not holds(obj[key]):
        raise IndexFileError(f"{path}: corrupted index file header ({where} has a {key} of the wrong type)")
    return obj[key]


class ShardedIndex:
    """An index spread over the ranks of a torch.distributed process group: rank r holds the
    items whose id is congruent to r modulo the world size, scans them locally, and the global
    top-k is merged with an all-gather. Results equal those of one OPQNIndex holding every item.

    Every method is collective: all ranks call it with the same arguments (``add`` with the
    whole batch: each rank encodes and keeps its own part).
    """

    def __init__(self, shard: OPQNIndex, group=None):
        if not dist.is_initialized():
            raise RuntimeError("ShardedIndex needs an initialized torch.distributed process group")
        self.shard, self.group = shard, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def __len__(self) -> int:
        return int(all_reduce_sum(torch.tensor([len(self.shard)], dtype=torch.int64), self.group))

    def to(self, device) -> "ShardedIndex":
        """Move this rank's shard to ``device`` (e.g. its own GPU); returns self."""
        self.shard.to(device)
        return self

    def _mine(self, ids, labels):
        """(mask, ids, labels) of the items of a batch that belong to this rank."""
        ids = _integer_ids(ids)
        _check_item_ids(ids)  # on every rank, not only on the one the id -1 would go to
        mine = torch.remainder(ids, self.world) == self.rank
        return mine, ids[mine], None if labels is None else torch.as_tensor(labels)[mine]

    def add(self, features: Array, ids, labels=None) -> None:
        """Add the items of ``features [B, M*d]`` with (required, global) ``ids`` that belong to this rank."""
        mine, ids, labels = self._mine(ids, labels)
        self.shard.add(as_tensor(features, "features")[mine], ids, labels)

    def add_codes(self, codes: Array, ids, labels=None) -> None:
        mine, ids, labels = self._mine(ids, labels)
        self.shard.add_codes(as_tensor(codes, "codes")[mine], ids, labels)

    def remove(self, ids) -> int:
        """Remove ids from whichever shard holds them; returns the global count removed."""
        return int(all_reduce_sum(torch.tensor([self.shard.remove(ids)], dtype=torch.int64), self.group))

    def _owned(self, ids: torch.Tensor) -> torch.Tensor:
        """Which of ``ids`` this rank holds: those it owns (``add`` keeps an id on the rank id
        modulo the world size) and its shard has."""
        _, found = self.shard._find(ids)
        return found & (torch.remainder(ids, self.world) == self.rank)

    def contains(self, ids) -> torch.Tensor:
        """Whether each of ``ids`` (any shape) is the id of an item of some rank (the same on every rank)."""
        ids = _integer_ids(ids)
        held = self._owned(ids.reshape(-1)).long()
        return (all_reduce_sum(held, self.group) > 0).reshape(ids.shape)

    def restricted(self, ids) -> "ShardedIndex":
        """The sharded index of the items whose ids are in ``ids``: each rank restricts its shard
        (``OPQNIndex.restricted``)."""
        return ShardedIndex(self.shard.restricted(ids), self.group)

    def labels_of(self, ids) -> torch.Tensor:
        """Labels of items given by id (any shape), from the rank holding each; -1 for ids no rank holds."""
        ids = _integer_ids(ids)
        flat = ids.reshape(-1)
        mine = torch.where(self._owned(flat), self.shard.labels_of(flat) + 1, 0)  # 0: not held here
        return (all_reduce_sum(mine, self.group) - 1).reshape(ids.shape)

    def reconstruct(self, ids) -> torch.Tensor:
        """The vectors ``[n, M*d]`` of the items of ``ids [n]`` (see ``OPQNIndex.reconstruct``),
        each from the rank holding it, on every rank."""
        ids = _integer_ids(ids).reshape(-1)
        mine = self._owned(ids)
        held = all_reduce_sum(mine.long(), self.group)
        if bool((held == 0).any()):
            raise ValueError(f"ids not in the index: {ids[held == 0][:10].tolist()}")
        vectors = torch.zeros(len(ids), self.shard.num_books * self.shard.dim, device=self.shard.device)
        vectors[mine.to(vectors.device)] = self.shard.reconstruct(ids[mine])
        return all_reduce_sum(vectors, self.group)  # exact: every other rank adds zeros

    def search(self, queries: Array, k: int, batch_size: int = 4096, fast_scan: bool = False,
               rerank: int = 2, subset=None):
        """Global top-k ``(scores [nq, k], ids [nq, k])``, the same on every rank; ``fast_scan``,
        ``rerank`` and ``subset`` as in ``OPQNIndex.search``, on each shard."""
        luts = self.shard.query_lut(queries) if len(queries) else None
        return self._search(luts, len(queries), k, batch_size, fast_scan, rerank, subset)

    def search_luts(self, luts: Array, k: int, batch_size: int = 4096, fast_scan: bool = False,
                    rerank: int = 2, subset=None):
        return self._search(luts, len(luts), k, batch_size, fast_scan, rerank, subset)

    def _search(self, luts, nq: int, k: int, batch_size: int, fast_scan: bool, rerank: int, subset):
        k = _checked_k(k, fast_scan, self.shard.num_words)
        shard = self.shard._scanned(subset)  # the subset's ids looked up once
        total = int(all_reduce_sum(torch.tensor([len(shard)], dtype=torch.int64), self.group))
        local_k = min(k, len(shard))
        scores = torch.full((nq, k), float("-inf"))
        ids = torch.full((nq, k), torch.iinfo(torch.int64).max, dtype=torch.int64)  # sorted after every item
        if local_k and nq:
            s, i = shard.search_luts(luts, local_k, batch_size, fast_scan, rerank)
            scores[:, :local_k], ids[:, :local_k] = s, i
        scores, ids = all_gather_topk(scores, ids, k, self.group)
        ids[:, total:] = NO_ID  # fewer than k items in all: as OPQNIndex.search
        return scores, ids

    def range_search(self, queries: Array, min_score: float, batch_bytes: int = 64 << 20, subset=None):
        """Every item of every shard scoring at least ``min_score`` for each query, as
        ``OPQNIndex.range_search`` returns it (the same order), on every rank."""
        lims, scores, ids = self.shard.range_search(queries, min_score, batch_bytes, subset)
        nq = len(lims) - 1
        query = torch.repeat_interleave(torch.arange(nq), lims.diff())
        query, scores, ids = (all_gather_rows(t, self.group) for t in (query, scores, ids))
        return _ranges(nq, query, scores, ids)

    def shard_path(self, path: str | Path) -> Path:
        path = Path(path)
        return path.with_name(f"{path.name}.shard{self.rank:05d}-of-{self.world:05d}")

    def save(self, path: str | Path) -> Path:
        """Each rank writes its shard to ``<path>.shardRRRRR-of-WWWWW`` (atomically)."""
        return self.shard.save(self.shard_path(path))

    @classmethod
    def from_index(cls, index: OPQNIndex, group=None) -> "ShardedIndex":
        """The sharded index of the items of ``index`` (every rank passes an index holding them
        all, e.g. loaded from one file): each rank keeps the items it owns, on the index's device."""
        return cls(_owned_part(index, dist.get_rank(group), dist.get_world_size(group)), group)

    @classmethod
    def load(cls, path: str | Path, group=None, mmap: bool = True, verify: bool = True,
             device=None) -> "ShardedIndex":
        """Read a sharded index as each rank needs it: the shard this rank saved
        (``<path>.shardRRRRR-of-WWWWW`` of this world size), or else, from shards saved by another
        number of ranks or from one index file at ``path`` (e.g. ``opqn index build``'s), the items
        this rank owns (every file is read; those items are copied out of the mappings). An index
        file written after the shard files beside it (changed by ``opqn index add``, say) is refused
        rather than either being loaded silently. ``device``: where this rank's shard goes (e.g.
        ``cuda:<local rank>``); the CPU by default."""
        loaded = cls._load(Path(path), group, mmap, verify)
        return loaded.to(device) if device is not None else loaded

    @classmethod
    def _load(cls, path: Path, group, mmap: bool, verify: bool) -> "ShardedIndex":
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        files = shard_files(path)
        if files and path.exists() and path.stat().st_mtime_ns > max(f.stat().st_mtime_ns for f in files):
            raise IndexFileError(f"{path} was written after its shard files (of {len(files)} ranks): remove them "
                                 f"to load it, or it to load them")
        if len(files) == world:
            return cls(OPQNIndex.load(files[rank], mmap=mmap, verify=verify), group)
        if not files:
            if not path.exists():
                raise IndexFileError(f"{path}: neither an index file nor the shard files of {world} or any other "
                                     f"number of ranks exist")
            files = [path]
        parts = [_owned_part(OPQNIndex.load(file, mmap=True, verify=verify), rank, world) for file in files]
        for part in parts[1:]:
            parts[0].merge_from(part)
        return cls(parts[0], group)


def _owned_part(index: OPQNIndex, rank: int, world: int) -> OPQNIndex:
    """The index of the items of ``index`` that rank ``rank`` of ``world`` owns (id = rank mod world)."""
    return index._taking(torch.nonzero(torch.remainder(index.ids, world) == rank).reshape(-1))


def shard_files(path: str | Path) -> list[Path]:
    """The shard files of a :class:`ShardedIndex` saved at ``path`` (in rank order), of the one
    number of ranks they were saved by; [] when there are none. A set with a file missing, or
    shards of two numbers of ranks, raise IndexFileError."""
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\.shard(\d{5})-of-(\d{5})")
    found: dict[int, dict[int, Path]] = {}
    for file in path.parent.glob(glob.escape(path.name) + ".shard*-of-*"):
        match = pattern.fullmatch(file.name)
        if match:
            found.setdefault(int(match[2]), {})[int(match[1])] = file
    if len(found) > 1:
        raise IndexFileError(f"{path}: shard files of {' and of '.join(map(str, sorted(found)))} ranks; "
                             f"remove the set that is out of date")
    if not found:
        return []
    (world, ranks), = found.items()
    missing = sorted(set(range(world)) - set(ranks))
    if missing:
        raise IndexFileError(f"{path}: shard files of ranks {missing[:10]} of {world} are missing")
    return [ranks[r] for r in range(world)]
