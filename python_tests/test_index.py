"""OPQNIndex: add/remove/search against direct adc_topk, persistence (atomic saves, mmap,
corruption and version errors, a process killed while saving)."""
import copy
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import opqn_ext
from opqn_ext import index as index_module
from opqn_ext.index import FORMAT_VERSION, IndexFileError, OPQNIndex
from opqn_ext.nn import OrthoPQHead

M, D, K = 4, 64, 16


def make_index(seed=0):
    head = OrthoPQHead(D, 5, M, K, seed=seed)
    return OPQNIndex.from_head(head, settings={"note": "test"}), head


def features(n, seed):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_search_equals_adc_topk_over_the_encoded_features(device):
    index, head = make_index()
    index.to(device)
    db, q = features(3000, 1), features(17, 2)
    ids = index.add(db, labels=torch.arange(3000) % 7)
    assert ids.tolist() == list(range(3000)) and len(index) == 3000
    scores, got = index.search(q, 10, batch_size=5)
    codes = opqn_ext.encode(db, head.assign_weight.detach())
    want_s, want_i = opqn_ext.adc_topk(head.query_lut(q), codes, 10)
    assert torch.equal(got, want_i) and torch.allclose(scores, want_s)
    assert torch.equal(index.labels[:7], torch.arange(7))


@pytest.mark.parametrize("fast_scan", [False, True])
def test_the_results_of_given_tables_do_not_depend_on_their_batch(device, fast_scan):
    """What README promises: only a query's tables may change (in their last bits) with its batch;
    the scan of given tables returns the same for a query alone, in small batches and in one."""
    index, _ = make_index()
    index.to(device)
    index.add(features(3000, 1))
    # 40 queries: interleaved groups of 16 (AVX2) or 32 (AVX-512) and a partial one; each query's
    # tables shifted apart, so that no two queries have the same results
    luts = index.query_lut(features(40, 2))
    luts = luts + torch.arange(40, device=luts.device).view(40, 1, 1) * 1e-3
    want_s, want_i = index.search_luts(luts, 12, fast_scan=fast_scan)
    for batch_size in (1, 7):
        scores, ids = index.search_luts(luts, 12, batch_size=batch_size, fast_scan=fast_scan)
        assert torch.equal(scores, want_s) and torch.equal(ids, want_i), batch_size


def test_ids_continue_and_duplicates_are_rejected():
    index, _ = make_index()
    index.add(features(5, 1))
    assert index.add(features(3, 2)).tolist() == [5, 6, 7]
    index.add(features(2, 3), ids=[100, 50])
    assert index.ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 50, 100]  # kept sorted by id
    with pytest.raises(ValueError, match=r"ids already in the index: \[50\]"):
        index.add(features(1, 4), ids=[50])
    with pytest.raises(ValueError, match="ids must be unique"):
        index.add(features(2, 4), ids=[200, 200])
    with pytest.raises(ValueError, match="ids must be 2 integers"):
        index.add(features(2, 4), ids=[1.5, 2.5])
    assert len(index) == 10


def test_the_id_minus_one_is_refused_and_default_ids_start_at_zero():
    index, _ = make_index()
    message = r"ids must not hold -1: search returns that id where fewer than k items exist \(as FAISS\)"
    with pytest.raises(ValueError, match=message):
        index.add(features(3, 1), ids=[-5, -1, 4])
    assert len(index) == 0
    index.add(features(2, 1), ids=[-5, -2])
    assert index.add(features(2, 2)).tolist() == [0, 1]  # not -1, 0: after the largest id, from 0
    other, _ = make_index()
    other.add(features(2, 3), ids=[0, 9])
    with pytest.raises(ValueError, match=message.replace("ids must", "other's ids plus id_offset must")):
        index.merge_from(other, id_offset=-10)
    assert index.ids.tolist() == [-5, -2, 0, 1]


def test_a_saved_index_holding_the_id_minus_one_is_refused(tmp_path):
    index, _ = make_index()
    index.add(features(3, 1), ids=[-3, -2, 0])
    index.ids = torch.tensor([-3, -1, 0])  # as a file written without the check would hold
    index.save(tmp_path / "a.opqn")
    with pytest.raises(IndexFileError, match="holds an item of id -1, which search reserves for missing results"):
        OPQNIndex.load(tmp_path / "a.opqn")


@pytest.mark.parametrize("fast_scan", [False, True])
def test_a_top_k_beyond_the_items_is_padded_as_faiss_pads_it(device, fast_scan):
    index, _ = make_index()
    index.to(device)
    q = features(7, 2)
    scores, ids = index.search(q, 4, fast_scan=fast_scan)  # an empty index: padding only
    assert torch.equal(scores, torch.full((7, 4), float("-inf"))) and torch.equal(ids, torch.full((7, 4), -1))
    index.add(features(5, 1), ids=[10, 20, 30, 40, 50])
    want_s, want_i = index.search(q, 5, batch_size=3, fast_scan=fast_scan)  # tables as in the batches below
    scores, ids = index.search(q, 8, batch_size=3, fast_scan=fast_scan)
    assert scores.shape == ids.shape == (7, 8) and scores.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(scores[:, :5], want_s) and torch.equal(ids[:, :5], want_i)
    assert bool((scores[:, 5:] == float("-inf")).all()) and bool((ids[:, 5:] == -1).all())
    scores, ids = index.search(q, 3, subset=[20, 50, 60], fast_scan=fast_scan)  # 60 is no item's id
    assert sorted(ids[0, :2].tolist()) == [20, 50] and ids[:, 2].tolist() == [-1] * 7
    assert scores[:, 2].tolist() == [float("-inf")] * 7 and bool(torch.isfinite(scores[:, :2]).all())
    assert torch.equal(index.search_luts(index.query_lut(q), 8, fast_scan=fast_scan)[1][:, 5:], torch.full((7, 3), -1))
    assert index.search(q[:0], 8)[0].shape == (0, 8)


def test_add_codes_validates():
    index, _ = make_index()
    with pytest.raises(ValueError, match="codes must be < K=16, got a code 16"):
        index.add_codes(torch.full((2, M), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"codes must be uint8 \[B, 4\]"):
        index.add_codes(torch.zeros(2, M, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"features must be \[B, 64\]"):
        index.add(torch.zeros(2, 63))


def test_search_errors():
    index, _ = make_index()
    index.add(features(5, 1))
    for k in (0, -1):
        with pytest.raises(ValueError, match=rf"k must be >= 1, got {k}"):
            index.search(features(1, 2), k)
    with pytest.raises(ValueError, match=r"k must be an integer, got 6.5"):
        index.search(features(1, 2), 6.5)  # beyond the items: padded, were it an integer
    with pytest.raises(ValueError, match=r"queries must be \[nq, 64\]"):
        index.search(torch.zeros(1, 10), 1)


def test_rows_that_are_not_finite_are_named(device):
    index, _ = make_index()
    index.to(device)
    bad = features(25, 1)
    bad[[3, 17], 5], bad[20, 0] = float("nan"), float("-inf")
    with pytest.raises(ValueError, match=r"features must be finite: rows \[3, 17, 20\] hold NaN or infinite"):
        index.add(bad, batch_size=8)  # rows of the second and third batches are named too
    assert len(index) == 0
    with pytest.raises(ValueError, match=r"queries must be finite: rows \[3, 17, 20\] hold NaN or infinite"):
        index.search(bad, 2)  # nothing to scan: the queries are checked all the same
    index.add(features(5, 2))
    for fast_scan in (False, True):  # the scans find the tables not finite, then the queries are named
        with pytest.raises(ValueError, match=r"queries must be finite: rows \[3, 17, 20\] hold NaN or infinite"):
            index.search(bad, 2, fast_scan=fast_scan)
    if device.type == "cpu":  # where sums overflow depends on the order a kernel adds in
        with pytest.raises(ValueError, match=r"queries rows \[0\] give tables that are not finite"):
            index.search(torch.full((1, D), 3e38), 2)  # finite, but a sub-vector's products overflow
    many = torch.full((12, D), float("nan"))
    with pytest.raises(ValueError, match=r"rows \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] and 2 more hold"):
        index.search(many, 2)


@pytest.mark.parametrize("what", ["assign_weight", "codebook", "query_scale"])
def test_a_model_that_is_not_finite_is_refused(what):
    head = OrthoPQHead(D, 5, M, K, seed=0)
    args = {"assign_weight": head.assignment_weight.detach().clone(), "codebook": head.codebook.clone(),
            "query_scale": 5.0}
    if what == "query_scale":
        args[what] = float("inf")
    else:
        args[what][1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=f"{what} must be finite \\(in float32\\): it holds NaN or infinite"):
        OPQNIndex(**args)


def test_ids_that_are_not_integers_are_refused_not_truncated():
    index, _ = make_index()
    index.add(features(5, 1))
    for call in (lambda: index.remove([1.5]), lambda: index.labels_of(torch.tensor([2.0]))):
        with pytest.raises(ValueError, match="ids must be integers, got torch.float32"):
            call()
    with pytest.raises(ValueError, match="labels must be 1 integers, got torch.bool"):
        index.add_codes(torch.zeros(1, M, dtype=torch.uint8), labels=[True])
    with pytest.raises(ValueError, match="k must be an integer, got 2.5"):
        index.search(features(1, 2), 2.5)
    assert len(index) == 5
    assert index.remove([]) == 0  # an empty list is float32 to torch.as_tensor, and still fine
    assert index.add_codes(torch.zeros(0, M, dtype=torch.uint8), ids=[], labels=[]).tolist() == []
    assert index.labels_of(torch.tensor([1, 9], dtype=torch.int32)).tolist() == [-1, -1]


def test_search_keeps_no_graph_of_queries_that_require_grad():
    # features straight from a model in training mode: the results must not hold every batch's graph
    index, _ = make_index()
    index.add(features(50, 1))
    queries = features(6, 2).requires_grad_()
    for scores, _ in (index.search(queries, 5, batch_size=4), index.search_luts(index.query_lut(queries), 5),
                      index.search_luts(torch.rand(3, M, K, requires_grad=True), 5)):
        assert not scores.requires_grad and scores.grad_fn is None
    assert not index.query_lut(queries).requires_grad


def test_ties_go_to_the_smaller_id_whatever_the_insertion_order():
    index, _ = make_index()
    codes = torch.zeros(6, M, dtype=torch.uint8)  # identical codes: every score ties
    index.add_codes(codes[:3], ids=[40, 10, 30])
    index.add_codes(codes[3:], ids=[20, 5, 60])
    _, ids = index.search(features(2, 1), 6)
    assert ids.tolist() == [[5, 10, 20, 30, 40, 60]] * 2


def test_add_and_remove_match_a_fresh_index():
    index, _ = make_index()
    db = features(2000, 1)
    index.add(db, ids=torch.arange(2000) * 3)
    assert index.remove(torch.arange(0, 6000, 9)) == 667
    assert index.remove([1, 2, 4]) == 0  # ids never present
    index.add(features(100, 5), ids=torch.arange(6000, 6100))
    fresh, _ = make_index()
    keep = (torch.arange(2000) * 3) % 9 != 0
    fresh.add(torch.cat([db[keep], features(100, 5)]),
              ids=torch.cat([(torch.arange(2000) * 3)[keep], torch.arange(6000, 6100)]))
    q = features(9, 7)
    assert all(torch.equal(a, b) for a, b in zip(index.search(q, 50), fresh.search(q, 50)))


def test_small_adds_fill_spare_room_without_copying_and_earlier_views_keep_their_rows(device):
    index, _ = make_index()
    index.to(device)
    codes = torch.randint(0, K, (400, M), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(400) % 13
    index.add_codes(codes[:100], labels=labels[:100])
    first = index.codes
    index.add_codes(codes[100:101], labels=labels[100:101])  # full: the rows move to a buffer half as large again
    moved = index.codes.data_ptr()
    for i in range(101, 150):  # these fit in its spare room: appended in place, nothing copied
        index.add_codes(codes[i:i + 1], labels=labels[i:i + 1])
        assert index.codes.data_ptr() == moved
    assert torch.equal(first.cpu(), codes[:100])
    index.add_codes(codes[150:], labels=labels[150:])
    assert torch.equal(index.codes.cpu(), codes) and torch.equal(index.labels, labels)
    assert torch.equal(index.ids, torch.arange(400))
    fresh, _ = make_index()
    fresh.to(device)
    fresh.add_codes(codes)
    q = features(5, 9)
    assert all(torch.equal(a, b) for a, b in zip(index.search(q, 20), fresh.search(q, 20)))


def test_out_of_order_ids_after_small_adds_are_looked_up_and_sorted_in():
    index, _ = make_index()
    codes = torch.randint(0, K, (60, M), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    for i in range(0, 40, 4):
        index.add_codes(codes[i:i + 4], ids=torch.arange(i, i + 4) * 10)
    with pytest.raises(ValueError, match=r"ids already in the index: \[390, 0\]"):
        index.add_codes(codes[40:43], ids=[395, 390, 0])
    assert len(index) == 40
    index.add_codes(codes[40:43], ids=[395, 5, 1000])
    assert index.ids.tolist() == sorted(list(range(0, 400, 10)) + [395, 5, 1000])
    assert torch.equal(index.codes[index.ids.tolist().index(5)], codes[41])
    assert index.remove([5, 5, 7, 1000, 390]) == 3  # repeats and absent ids count once or not at all
    assert 5 not in index.ids.tolist() and len(index) == 40


def test_the_fast_scan_layout_grows_with_the_index_and_is_redone_after_reordering(device):
    index, _ = make_index()
    index.to(device)
    codes = torch.randint(0, K, (300, M), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    q, start = features(4, 6), 0
    for n in (45, 7, 100, 1, 31, 64):  # partial last blocks of 32 codes, whole ones, one code
        index.add_codes(codes[start:start + n])
        start += n
        index.search(q, 3, fast_scan=True)
        assert torch.equal(index._packed().data, opqn_ext.pack_codes4(index.codes).data)
        assert index._packed().num_codes == len(index)
    index.add_codes(codes[start:start + 2], ids=[-5, 1000])  # sorted in: the layout is made anew
    index.remove([3, 77])
    fresh, _ = make_index()
    fresh.to(device)
    fresh.add_codes(index.codes, ids=index.ids)
    for a, b in zip(index.search(q, 40, fast_scan=True), fresh.search(q, 40, fast_scan=True)):
        assert torch.equal(a, b)
    assert torch.equal(index._packed().data, opqn_ext.pack_codes4(index.codes).data)


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_gives_identical_results(tmp_path, mmap):
    index, _ = make_index()
    index.add(features(5000, 1), ids=torch.arange(5000) + 10, labels=torch.arange(5000) % 11)
    path = index.save(tmp_path / "db.opqn")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    loaded = OPQNIndex.load(path, mmap=mmap)
    assert (loaded.mapped_codes is not None) == mmap
    if mmap:
        assert loaded.codes.data_ptr() == loaded.mapped_codes.ctypes.data  # scans read the mapping
    q = features(20, 2)
    assert all(torch.equal(a, b) for a, b in zip(index.search(q, 25), loaded.search(q, 25)))
    assert torch.equal(loaded.labels, index.labels) and loaded.settings == {"note": "test"}
    assert loaded.query_scale == index.query_scale
    loaded.add(features(3, 3))  # a mapped index can still grow (its codes move to memory)
    assert len(loaded) == 5003 and loaded.mapped_codes is None


def test_threads_saving_indexes_to_one_path_each_write_a_whole_file(tmp_path):
    """Each save writes a temporary file of its own (per process and thread), so saves from two
    threads to one path never remove or rename each other's: the file ends whole, one of the two."""
    indexes = [make_index()[0] for _ in range(2)]
    for i, index in enumerate(indexes):
        index.add(features(20_000 + 10_000 * i, i))
    path, errors = tmp_path / "db.opqn", []

    def save_often(index):
        for _ in range(30):
            try:
                index.save(path)
            except OSError as err:
                errors.append(err)
    threads = [threading.Thread(target=save_often, args=(index,)) for index in indexes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(OPQNIndex.load(path)) in (20_000, 30_000)
    assert [p.name for p in tmp_path.iterdir()] == ["db.opqn"]


def test_empty_index_round_trips(tmp_path):
    index, _ = make_index()
    loaded = OPQNIndex.load(index.save(tmp_path / "e.opqn"))
    assert len(loaded) == 0 and loaded.codes.shape == (0, M)


def test_an_index_of_the_codeword_assignment_round_trips(tmp_path):
    """The head's assignment weights are its codebook itself ("codeword" assignment): the file holds
    both (safetensors refuses one storage under two names)."""
    head = OrthoPQHead(D, 5, M, K, assignment="codeword", seed=0)
    index = OPQNIndex.from_head(head)
    assert index.assign_weight.data_ptr() == index.codebook.data_ptr()
    index.add(features(50, 1))
    loaded = OPQNIndex.load(index.save(tmp_path / "c.opqn"))
    assert torch.equal(loaded.assign_weight, head.codebook) and torch.equal(loaded.codebook, head.codebook)
    assert all(torch.equal(a, b) for a, b in zip(loaded.search(features(5, 2), 3), index.search(features(5, 2), 3)))


def test_a_learned_codebook_is_searched_as_the_model_scores_it(tmp_path):
    """A codebook learned away from orthonormality: query tables are the inner products of the
    soft-quantized query with the codewords (the head's query_lut), not the probabilities."""
    head = OrthoPQHead(D, 5, M, K, learn_codebook=True, seed=0)
    with torch.no_grad():
        head.codebook.add_(0.1 * torch.randn(head.codebook.shape, generator=torch.Generator().manual_seed(3)))
    index = OPQNIndex.from_head(head)
    db, queries = features(300, 1), features(20, 2)
    index.add(db)
    want = opqn_ext.adc_topk(head.query_lut(queries), head.encode(db), 10)
    assert not index.orthonormal
    assert torch.equal(index.query_lut(queries), head.query_lut(queries))
    for got in (index.search(queries, 10), OPQNIndex.load(index.save(tmp_path / "l.opqn")).search(queries, 10)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    as_probs = OPQNIndex(head.assign_weight, head.codebook, index.query_scale, orthonormal=True)
    as_probs.add(db)
    assert not torch.equal(as_probs.search(queries, 10)[1], want[1])  # the probabilities would rank otherwise
    fixed = OrthoPQHead(D, 5, M, K, seed=0)  # without a head to say so, orthonormality is detected
    assert OPQNIndex(fixed.assign_weight, fixed.codebook, 1.0).orthonormal
    assert not OPQNIndex(head.assign_weight, head.codebook, 1.0).orthonormal


@pytest.fixture
def saved(tmp_path):
    index, _ = make_index()
    index.add(features(3000, 1))
    return index.save(tmp_path / "db.opqn")


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1, -5000])
def test_truncated_files_raise_clear_errors(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:keep])
    with pytest.raises(IndexFileError, match="truncated|corrupted"):
        OPQNIndex.load(saved)


def test_flipped_bytes_in_codes_are_detected(saved):
    data = bytearray(saved.read_bytes())
    data[-100] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="corrupted"):
        OPQNIndex.load(saved, mmap=True)


def flip_a_bit_in_array(path, array):
    """Flips one bit in the middle of the bytes of ``array`` in the index file at ``path``."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8:8 + header_len])[array]["data_offsets"]
    data[8 + header_len + (begin + end) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def damaged_copies(path, folder, seed=0):
    """Damaged copies of the index file at `path`, written to `folder`: (file, whether the damage is
    in the arrays' bytes, which the CRC-32 check must catch). Structured damage of the safetensors
    header (each array's byte range, shape and dtype set to out-of-range, huge, negative and
    mistyped values; byte ranges past the end that overflow int64 when added to the header size;
    arrays emptied through a zero dimension) and of our header's members, truncations, and random
    bit flips in the header text and in the arrays."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + length]), raw[8 + length:]
    ours = json.loads(header["__metadata__"]["opqn_index"])
    rng = random.Random(seed)
    damaged = []

    def add(content, in_arrays=False):
        file = folder / f"damaged{len(damaged)}.opqn"
        file.write_bytes(content)
        damaged.append((file, in_arrays))

    def with_header(changed):
        text = json.dumps(changed).encode()
        text += b" " * (-len(text) % 8)
        add(len(text).to_bytes(8, "little") + text + data)

    values = [-1, 0, 1, 3, 2**31, 2**62, 2**63 - 1, 2**64 - 1, -2**63, 1.5, "7", None, [], {}, [[1]], True]
    for name in ("ids", "labels", "assign_weight", "codebook", "codes"):
        for field in ("data_offsets", "shape"):
            for i in range(len(header[name][field])):
                for value in values:
                    changed = copy.deepcopy(header)
                    changed[name][field][i] = value
                    with_header(changed)
            for value in (None, 3, [], [0, 0, 0], "x"):
                changed = copy.deepcopy(header)
                changed[name][field] = value
                with_header(changed)
        begin, end = header[name]["data_offsets"]
        for offsets in ([2**63 - 1 - (end - begin), 2**63 - 1], [2**63 - 8 - (end - begin), 2**63 - 8]):
            changed = copy.deepcopy(header)  # past the end: begin + header size overflows int64
            changed[name]["data_offsets"] = offsets
            with_header(changed)
        for shape in ([0, 2**40, 2**40], [0, 2**62], [2**40, 0]):
            changed = copy.deepcopy(header)  # no bytes, huge sizes
            changed[name]["shape"] = shape[:max(1, len(header[name]["shape"]))]
            changed[name]["data_offsets"] = [begin, begin]
            with_header(changed)
        for dtype in ("F64", "U8", "I64", 5, None):
            changed = copy.deepcopy(header)
            changed[name]["dtype"] = dtype
            with_header(changed)
    for key in ours:
        for value in values + ["x", {"a": 1}]:
            changed_ours = dict(ours, **{key: value})
            changed = copy.deepcopy(header)
            changed["__metadata__"]["opqn_index"] = json.dumps(changed_ours)
            with_header(changed)
    for cut in sorted(rng.sample(range(len(raw)), 40)):
        add(raw[:cut])
    for start, end, in_arrays, count in ((8, 8 + length, False, 150), (8 + length, len(raw), True, 60)):
        for _ in range(count):
            flipped = bytearray(raw)
            flipped[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
            add(bytes(flipped), in_arrays)
    return damaged


def test_damaged_index_files_are_refused_with_index_file_errors_or_load(tmp_path):
    index = OPQNIndex.from_head(OrthoPQHead(64, 10, 4, 16, seed=0))
    index.add(torch.randn(70, 64), ids=torch.arange(70) * 3 + 5, labels=torch.arange(70) % 7)
    queries = torch.randn(2, 64)
    damaged = damaged_copies(index.save(tmp_path / "gallery.opqn"), tmp_path)
    for mmap in (True, False):
        for verify in (True, False):
            for file, in_arrays in damaged:
                try:
                    loaded = OPQNIndex.load(file, mmap=mmap, verify=verify)
                except IndexFileError as err:
                    assert str(err).startswith(f"{file}: ")
                    continue
                assert not (verify and in_arrays), file  # the CRC-32 check catches every flipped bit
                loaded.search(queries, 3)
                loaded.search(queries, 3, fast_scan=True)
                loaded.range_search(queries, 0.5)


@pytest.mark.parametrize("what", ["assign_weight", "codebook", "query_scale"])
def test_a_file_whose_model_is_not_finite_is_refused(tmp_path, what):
    index, _ = make_index()
    if what == "query_scale":
        index.query_scale = float("inf")
    else:
        getattr(index, what)[1, 2, 3] = float("nan")
    path = index.save(tmp_path / "model.opqn")  # checksums match: only the model check can refuse it
    with pytest.raises(IndexFileError, match=f"^{re.escape(str(path))}: {what} must be finite"):
        OPQNIndex.load(path)


@pytest.mark.parametrize("array", ["codes", "ids", "labels", "assign_weight", "codebook"])
def test_flipped_byte_in_every_array_is_detected(saved, array):
    flip_a_bit_in_array(saved, array)
    with pytest.raises(IndexFileError, match=f"array {array} is corrupted"):
        OPQNIndex.load(saved)
    try:  # without checksums the damage may pass unnoticed, or trip a structural check
        OPQNIndex.load(saved, verify=False)
    except IndexFileError as err:
        assert "ids are not strictly increasing" in str(err)


def test_flipped_byte_in_the_header_is_detected(saved):
    data = bytearray(saved.read_bytes())
    data[20] ^= 0x40
    saved.write_bytes(bytes(data))
    with pytest.raises(IndexFileError):
        OPQNIndex.load(saved)


def rewrite_header(path, change):
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    layout = json.loads(data[8:8 + header_len])
    meta = json.loads(layout["__metadata__"]["opqn_index"])
    change(meta)
    layout["__metadata__"]["opqn_index"] = json.dumps(meta)
    body = json.dumps(layout, separators=(",", ":")).encode()  # compact, as safetensors writes it
    body += b" " * (header_len - len(body)) if len(body) <= header_len else b""
    assert len(body) == header_len
    path.write_bytes(data[:8] + body + data[8 + header_len:])


def test_wrong_format_version_is_refused(saved):
    rewrite_header(saved, lambda m: m.update(format_version=FORMAT_VERSION + 1, crc32={k: 0 for k in m["crc32"]}))
    with pytest.raises(IndexFileError, match=f"format version {FORMAT_VERSION + 1} is not supported"):
        OPQNIndex.load(saved)


def test_other_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(IndexFileError, match="not an OPQN index"):
        OPQNIndex.load(tmp_path / "other.safetensors")
    with pytest.raises(IndexFileError, match="does not exist"):
        OPQNIndex.load(tmp_path / "missing.opqn")
    (tmp_path / "text.opqn").write_text("hello, this is not an index at all")
    with pytest.raises(IndexFileError):
        OPQNIndex.load(tmp_path / "text.opqn")


def test_a_process_killed_while_saving_leaves_the_previous_index(tmp_path):
    index, _ = make_index()
    index.add(features(1000, 1))
    path = index.save(tmp_path / "db.opqn")
    before = path.read_bytes()
    child = textwrap.dedent(f"""
        import torch
        from opqn_ext.index import OPQNIndex
        index = OPQNIndex.load({str(path)!r}, mmap=False)
        index.add_codes(torch.randint(0, 16, (40_000_000, {M}), dtype=torch.uint8))
        print("saving", flush=True)
        while True:
            index.save({str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    deadline = time.time() + 60
    while not any(p.name.startswith(".db.opqn.tmp") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.001)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    loaded = OPQNIndex.load(path)  # the old index, or a complete new one; never a broken file
    assert len(loaded) in (1000, 40_001_000)
    if len(loaded) == 1000:
        assert path.read_bytes() == before


def test_fast_scan_returns_exact_scores_with_full_recall():
    index, _ = make_index()
    index.add(features(20000, 1), ids=torch.arange(20000) * 2)
    q = features(50, 2)
    exact_s, exact_i = index.search(q, 20)
    fast_s, fast_i = index.search(q, 20, fast_scan=True)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(fast_i, exact_i)) / exact_i.numel()
    assert recall >= 0.99
    # returned scores are the exact ADC scores of the returned items
    codes = index.codes[torch.searchsorted(index.ids, fast_i)]
    luts = index.query_lut(q)
    rescored = luts.gather(2, codes.long().permute(0, 2, 1)).sum(1)
    assert torch.allclose(fast_s, rescored, atol=1e-6)
    index.remove(exact_i[0, :5])  # the packed layout follows changes
    assert not set(index.search(q[:1], 20, fast_scan=True)[1][0].tolist()) & set(exact_i[0, :5].tolist())


def test_fast_scan_needs_small_codebooks():
    index = OPQNIndex.from_head(OrthoPQHead(64, 5, 2, 32, seed=0))
    index.add(features(10, 1))
    with pytest.raises(ValueError, match="fast_scan needs K <= 16"):
        index.search(features(1, 2), 3, fast_scan=True)


@pytest.mark.parametrize("growth", [(64, 16, 1024), (4, 2, 16), (1, 3, 250)], ids=["default", "to-scores", "to-all"])
@pytest.mark.parametrize("batch_bytes", [64 << 20, 4 * 3 * 7])
def test_range_search_returns_every_item_above_the_threshold_in_order(device, batch_bytes, growth, monkeypatch):
    # growth: (first k, growth factor, largest k) of the top-k scans; with (4, 2, 16) queries of more
    # than 16 results fall through to computing every score, with (1, 3, 250) k reaches every item
    monkeypatch.setattr(index_module, "RANGE_FIRST_K", growth[0])
    monkeypatch.setattr(index_module, "RANGE_GROWTH", growth[1])
    monkeypatch.setattr(index_module, "RANGE_MAX_K", growth[2])
    index, _ = make_index()
    index.to(device)
    db = features(200, 1)
    index.add(torch.cat([db, db[:50]]))  # items 200-249 repeat items 0-49: equal scores, ties by id
    queries = features(7, 2)
    luts = index.query_lut(queries)
    every = opqn_ext.adc_scores(luts, index.codes).cpu()  # [7, 250]
    counts = set()
    for threshold in (float(every.median()), float(every.quantile(0.97)), float(every.quantile(0.995))):
        lims, scores, ids = index.range_search(queries, threshold, batch_bytes=batch_bytes)
        assert lims.shape == (8,) and lims[0] == 0
        assert lims[-1] == len(scores) == len(ids) == int((every >= threshold).sum())
        for q in range(7):
            keep = (every[q] >= threshold).nonzero().flatten()
            order = sorted(keep.tolist(), key=lambda i: (-float(every[q, i]), i))
            assert ids[lims[q]:lims[q + 1]].tolist() == order
            assert torch.equal(scores[lims[q]:lims[q + 1]], every[q, order])
            counts.add(len(order))
    assert min(counts) < 4 and 16 < max(counts) < 250  # queries done by the first scan, by later ones, by scores
    all_lims, all_scores, all_ids = index.range_search(queries, float("-inf"), batch_bytes=batch_bytes)
    top_scores, top_ids = index.search(queries, 250)  # everything, as the top-k scan ranks it
    assert torch.equal(all_ids.view(7, 250), top_ids) and torch.equal(all_scores.view(7, 250), top_scores)
    none = index.range_search(queries, float(every.max()) + 1)
    assert none[0].tolist() == [0] * 8 and len(none[1]) == len(none[2]) == 0
    empty = OPQNIndex.from_head(make_index()[1]).range_search(queries, 0.0)
    assert empty[0].tolist() == [0] * 8 and len(empty[1]) == len(empty[2]) == 0
    with pytest.raises(ValueError, match="min_score must be a number, got nan"):
        index.range_search(queries, float("nan"))


def test_range_search_scans_once_when_queries_have_few_results(monkeypatch):
    index, _ = make_index()
    index.add(features(3000, 1))
    queries = features(5, 2)
    threshold = float(index.search(queries, 30)[0][:, -1].max())  # at most 30 results per query
    low = float(index.search(queries, 100)[0][:, -1].min())  # 100 or more each
    scans = []
    monkeypatch.setattr(index_module, "adc_topk", lambda *a: scans.append(a[2]) or opqn_ext.adc_topk(*a))
    monkeypatch.setattr(index_module, "adc_scores", lambda *a: scans.append("scores") or opqn_ext.adc_scores(*a))
    lims, _, _ = index.range_search(queries, threshold)
    assert scans == [64] and 0 < lims[-1] <= 5 * 30
    scans.clear()
    index.range_search(queries, low)
    assert scans == [64, 1024]


def test_a_search_among_a_subset_of_ids_returns_only_them_as_a_scan_of_them_would(device):
    index, _ = make_index()
    index.to(device)
    db = features(600, 1)
    index.add(torch.cat([db, db[:100]]), ids=torch.arange(700) * 2)  # ids 1200-1398 repeat 0-198: ties
    queries = features(9, 2)
    g = torch.Generator().manual_seed(3)
    subset = torch.randperm(1400, generator=g)[:500]  # about half of them are ids of the index
    subset = torch.cat([subset, subset[:20], torch.tensor([5001, -3])])  # repeated ids, ids the index lacks
    held = torch.unique(subset[torch.isin(subset, index.ids)])
    luts = index.query_lut(queries)
    every = opqn_ext.adc_scores(luts, index.codes).cpu()  # [9, 700]
    cols = torch.searchsorted(index.ids, held)
    for k in (1, 25, len(held)):
        scores, ids = index.search(queries, k, subset=subset)
        for q in range(9):
            order = sorted(range(len(held)), key=lambda j: (-float(every[q, cols[j]]), int(held[j])))[:k]
            assert ids[q].tolist() == held[order].tolist()
            assert torch.equal(scores[q], every[q, cols[order]])
    assert torch.equal(index.search_luts(luts, 25, subset=subset)[1], index.search(queries, 25, subset=subset)[1])
    fast = index.search(queries, 25, fast_scan=True, rerank=8, subset=subset)
    assert torch.equal(fast[1], index.search(queries, 25, subset=subset)[1])
    assert index.subset_size(subset) == len(held) and index.subset_size(None) == 700
    part = index.restricted(subset)
    assert torch.equal(part.ids, held) and torch.equal(part.labels, index.labels_of(held))
    assert torch.equal(part.codes, index.codes[cols.to(index.device)]) and part.device == index.device
    for got, want in zip(part.search(queries, 25), index.search(queries, 25, subset=subset)):
        assert torch.equal(got, want)
    part.remove(held[:3])  # a change to the part leaves the index alone
    part.add(features(2, 5), ids=[1, 3])
    assert len(index) == 700 and len(part) == len(held) - 1 and part.ids[:2].tolist() == [1, 3]
    assert index.labels_of([1, 3]).tolist() == [-1, -1]
    threshold = float(every.median())
    lims, scores, ids = index.range_search(queries, threshold, subset=subset)
    all_lims, all_scores, all_ids = index.range_search(queries, threshold)
    for q in range(9):
        keep = torch.isin(all_ids[all_lims[q]:all_lims[q + 1]], held)
        assert torch.equal(ids[lims[q]:lims[q + 1]], all_ids[all_lims[q]:all_lims[q + 1]][keep])
        assert torch.equal(scores[lims[q]:lims[q + 1]], all_scores[all_lims[q]:all_lims[q + 1]][keep])
    scores, ids = index.search(queries, len(held) + 1, subset=subset)  # one place more than the subset's items
    assert torch.equal(ids[:, :-1], index.search(queries, len(held), subset=subset)[1]) and ids[:, -1].tolist() == [-1] * 9
    scores, ids = index.search(queries, 2, subset=[1, 3])  # odd ids: none in the index
    assert ids.tolist() == [[-1, -1]] * 9 and scores.tolist() == [[float("-inf")] * 2] * 9
    for wrong, message in (([2.0, 4.0], "subset must be integers, got torch.float32"),
                           (torch.ones(700, dtype=torch.bool), "subset must be integers, got torch.bool"),
                           ("abc", "subset must be integers, got str")):
        with pytest.raises(ValueError, match=message):
            index.search(queries, 1, subset=wrong)


def test_searches_from_many_threads_at_once_return_what_one_thread_does(device):
    # a search service answers queries from a thread pool: the scans release the GIL and run at
    # once; the 4-bit layout is made lazily by whichever search needs it first
    from concurrent.futures import ThreadPoolExecutor

    index, _ = make_index()
    index.to(device)
    index.add(features(5000, 1))
    queries = [features(3, 10 + i) for i in range(24)]
    kinds = [dict(), dict(fast_scan=True, rerank=4), dict(subset=torch.arange(0, 5000, 3))]
    want = [index.search(q, 20, **kinds[i % 3]) for i, q in enumerate(queries)]
    fresh = OPQNIndex.from_head(make_index()[1]).to(device)  # no 4-bit layout yet
    fresh.add(features(5000, 1))
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: fresh.search(queries[i], 20, **kinds[i % 3]), range(len(queries))))
    for (s, i), (ws, wi) in zip(got, want):
        assert torch.equal(i, wi) and torch.equal(s, ws)


def test_reconstruct_gives_the_codewords_that_adc_scores_items_with(device):
    index, head = make_index()
    index.to(device)
    index.add(features(100, 1), ids=torch.arange(100) * 3)
    ids = torch.tensor([297, 0, 150])
    vectors = index.reconstruct(ids)  # [3, M*d]
    assert vectors.shape == (3, D) and vectors.device == index.device
    positions = ids // 3
    for m in range(M):
        words = index.codes[positions.to(index.device), m].long()
        assert torch.equal(vectors.view(3, M, -1)[:, m], index.codebook[m, :, words].T)
    queries = features(4, 2)
    soft = opqn_ext.soft_quantize(queries.to(device).view(4, M, -1), index.assign_weight, index.codebook,
                                  index.query_scale, True).quantized.reshape(4, D)
    want = opqn_ext.adc_scores(index.query_lut(queries), index.codes[positions.to(index.device)])
    torch.testing.assert_close(soft @ vectors.T, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"ids not in the index: \[1, 2\]"):
        index.reconstruct([0, 1, 2])


@pytest.mark.parametrize("mmap", [False, True])
def test_indexes_built_apart_merge_into_what_one_index_holding_every_item_is(tmp_path, device, mmap):
    db, q = features(3000, 1), features(20, 2)
    ids = torch.randperm(3000, generator=torch.Generator().manual_seed(3)) * 2
    labels = ids % 7
    whole, _ = make_index()
    whole.add(db, ids=ids, labels=labels)
    parts = []
    for rows in (slice(0, 1000), slice(1000, 2200), slice(2200, 3000)):  # interleaved ids: sorted in
        part, _ = make_index()
        part.add(db[rows], ids=ids[rows], labels=labels[rows])
        part.save(tmp_path / f"part{len(parts)}.opqn")
        parts.append(OPQNIndex.load(tmp_path / f"part{len(parts)}.opqn", mmap=mmap))
    merged = parts[0].to(device)
    before = [(p.codes.clone(), p.ids.clone()) for p in parts[1:]]
    for part in parts[1:]:
        added = merged.merge_from(part)
        assert torch.equal(added, part.ids)
    for part, (codes, part_ids) in zip(parts[1:], before):  # the others are left as they were
        assert torch.equal(part.codes, codes) and torch.equal(part.ids, part_ids)
    assert torch.equal(merged.ids, whole.ids) and torch.equal(merged.labels, whole.labels)
    assert torch.equal(merged.codes.cpu(), whole.codes)
    whole.to(device)  # a query's tables on CUDA may differ in their last bits from those on the CPU
    for kwargs in (dict(), dict(fast_scan=True, rerank=4)):
        got, want = merged.search(q, 30, **kwargs), whole.search(q, 30, **kwargs)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert merged.settings == {"note": "test"}


def test_merge_from_shifts_ids_and_refuses_clashes_and_other_models():
    a, _ = make_index()
    a.add(features(10, 1))
    b, _ = make_index()
    b.add(features(5, 2), labels=[0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"other holds ids this index holds already: \[0, 1, 2, 3, 4\]"):
        a.merge_from(b)
    assert len(a) == 10  # nothing added
    assert a.merge_from(b, id_offset=100).tolist() == [100, 101, 102, 103, 104]
    assert a.labels_of([104, 3]).tolist() == [4, -1]
    assert torch.equal(a.codes[10:], b.codes)
    many, _ = make_index()
    many.add(features(200, 3))  # 0-199: clashes with 0-9 and 100-104
    with pytest.raises(ValueError, match=r"already: \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] and 5 more$"):
        a.merge_from(many)
    other, _ = make_index(seed=1)
    with pytest.raises(ValueError, match="other cannot be merged: its assignment weights differ"):
        a.merge_from(other)
    head = OrthoPQHead(D, 5, M, K, seed=0)
    rescaled = OPQNIndex(head.assign_weight, head.codebook, 3.0)
    with pytest.raises(ValueError, match="its query tables differ"):
        a.merge_from(rescaled)
    smaller = OPQNIndex.from_head(OrthoPQHead(D, 5, M, 8, seed=0))
    with pytest.raises(ValueError, match=r"M=4 books of K=8 words \(d=16\), not M=4, K=16"):
        a.merge_from(smaller)
    assert len(a) == 15


def test_shard_files_are_found_in_rank_order_and_incomplete_or_mixed_sets_refused(tmp_path):
    index, _ = make_index()
    path = tmp_path / "db[1].opqn"  # glob characters in the name are taken literally
    assert index_module.shard_files(path) == []
    for rank in (2, 0, 1):
        index.save(tmp_path / f"db[1].opqn.shard{rank:05d}-of-00003")
    index.save(tmp_path / "db[1].opqn.shard00000-of-00003.tmp")  # not a shard file
    index.save(tmp_path / "db1.opqn.shard00000-of-00002")  # another index's
    assert [p.name for p in index_module.shard_files(path)] == [f"db[1].opqn.shard{r:05d}-of-00003" for r in range(3)]
    (tmp_path / "db[1].opqn.shard00001-of-00003").unlink()
    with pytest.raises(IndexFileError, match=r"shard files of ranks \[1\] of 3 are missing"):
        index_module.shard_files(path)
    index.save(tmp_path / "db[1].opqn.shard00001-of-00003")
    index.save(tmp_path / "db[1].opqn.shard00000-of-00002")
    with pytest.raises(IndexFileError, match="shard files of 2 and of 3 ranks; remove the set that is out of date"):
        index_module.shard_files(path)


def test_numpy_arrays_are_taken_wherever_tensors_are(device):
    # FAISS users hold features, codes and tables as NumPy arrays: the same results as tensors
    import numpy as np

    db, q = features(500, 1), features(6, 2)
    with_tensors, _ = make_index()
    with_tensors.to(device)
    with_tensors.add(db[:300], ids=torch.arange(300) * 2, labels=torch.arange(300) % 3)
    with_tensors.add_codes(with_tensors.encode(db[300:]).cpu(), ids=torch.arange(300, 500) * 2 + 1)
    with_arrays, _ = make_index()
    with_arrays.to(device)
    with_arrays.add(db[:300].double().numpy(), ids=np.arange(300) * 2, labels=np.arange(300) % 3)
    with_arrays.add_codes(with_arrays.encode(db[300:].numpy()).cpu().numpy(), ids=np.arange(300, 500) * 2 + 1)
    assert torch.equal(with_arrays.codes, with_tensors.codes) and torch.equal(with_arrays.ids, with_tensors.ids)
    assert torch.equal(with_arrays.labels, with_tensors.labels)
    luts = with_tensors.query_lut(q)
    assert torch.equal(with_arrays.query_lut(q.numpy()), luts)
    for got, want in ((with_arrays.search(q.numpy(), 7), with_tensors.search(q, 7)),
                      (with_arrays.search_luts(luts.cpu().numpy(), 7), with_tensors.search_luts(luts, 7)),
                      (with_arrays.range_search(q.numpy(), 0.9), with_tensors.range_search(q, 0.9))):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    for call, name in ((lambda: with_arrays.search("queries", 3), "queries"),
                       (lambda: with_arrays.search_luts(object(), 3), "luts"),
                       (lambda: with_arrays.add({"a": 1}), "features"),
                       (lambda: with_arrays.add_codes(object()), "codes")):
        with pytest.raises(TypeError, match=f"^{name} must be a tensor or an array, got "):
            call()
