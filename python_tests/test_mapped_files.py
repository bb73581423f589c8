"""Tensors mapped from .npy files (the decoded-image cache's), and the read-ahead advice given for
the batches gathered from them."""
import gc

import numpy as np
import pytest
import torch

from opqn_ext import data
from opqn_ext.data import image_files, mapped_files


@pytest.mark.parametrize("dtype,shape", [(np.uint8, (7, 3, 5, 4)), (np.float32, (9, 6)), (np.int64, (4,))])
def test_an_npy_file_maps_as_its_array_copy_on_write(tmp_path, dtype, shape):
    want = np.arange(int(np.prod(shape))).astype(dtype).reshape(shape)
    np.save(tmp_path / "a.npy", want)
    got = mapped_files.map_npy(tmp_path / "a.npy")
    assert got.dtype == torch.from_numpy(want).dtype and torch.equal(got, torch.from_numpy(want))
    assert mapped_files.is_mapped(got)
    got[0] = 1  # stays in this process
    assert np.array_equal(np.load(tmp_path / "a.npy"), want)
    assert torch.equal(mapped_files.map_npy(tmp_path / "a.npy"), torch.from_numpy(want))


def test_a_version_2_header_and_an_empty_array(tmp_path):
    want = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    with open(tmp_path / "v2.npy", "wb") as f:
        np.lib.format.write_array(f, want, version=(2, 0))
    assert torch.equal(mapped_files.map_npy(tmp_path / "v2.npy"), torch.from_numpy(want))
    np.save(tmp_path / "empty.npy", np.zeros((0, 3, 2, 2), np.uint8))
    empty = mapped_files.map_npy(tmp_path / "empty.npy")
    assert empty.shape == (0, 3, 2, 2) and not mapped_files.is_mapped(empty)


def test_what_does_not_map(tmp_path):
    np.save(tmp_path / "fortran.npy", np.asfortranarray(np.zeros((3, 4), np.float32)))
    np.save(tmp_path / "objects.npy", np.array([{}, None], dtype=object), allow_pickle=True)
    np.save(tmp_path / "records.npy", np.zeros(3, dtype=[("a", np.uint8), ("b", np.float32)]))  # no torch dtype
    np.save(tmp_path / "dates.npy", np.zeros(3, dtype="datetime64[s]"))
    np.save(tmp_path / "short.npy", np.zeros((10, 10), np.uint8))
    (tmp_path / "short.npy").write_bytes((tmp_path / "short.npy").read_bytes()[:-1])
    (tmp_path / "text.npy").write_text("not an array")
    for name in ("fortran", "objects", "records", "dates", "short", "text", "missing"):
        assert mapped_files.map_npy(tmp_path / f"{name}.npy") is None, name


def test_a_mapping_is_forgotten_with_its_tensor(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 2), np.uint8))
    before = len(mapped_files._ROW_SPANS)
    tensor = mapped_files.map_npy(tmp_path / "a.npy")
    assert len(mapped_files._ROW_SPANS) == before + 1
    del tensor
    gc.collect()
    assert len(mapped_files._ROW_SPANS) == before
    assert not mapped_files.is_mapped(torch.zeros(4, 2, dtype=torch.uint8))


def test_will_need_takes_any_rows_of_a_mapped_tensor(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((5, 3, 7, 7), np.uint8))  # rows not page-aligned
    tensor = mapped_files.map_npy(tmp_path / "a.npy")
    mapped_files.will_need(tensor, torch.tensor([0, 4, -1, -5, 3]))
    mapped_files.will_need(tensor, torch.tensor([5, -6, 100]))  # out of range: left to the gather
    mapped_files.will_need(torch.zeros(5, 3), torch.tensor([1]))  # not mapped: nothing to do
    mapped_files.will_need(tensor, torch.tensor([], dtype=torch.int64))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_batches_of_a_mapped_tensor_are_advised_ahead_of_their_gathers(tmp_path, monkeypatch, workers):
    want = np.random.default_rng(0).integers(0, 256, (40, 3, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "a.npy", want)
    tensor = mapped_files.map_npy(tmp_path / "a.npy")
    batches = list(torch.randperm(40, generator=torch.Generator().manual_seed(0)).split(3))
    advised = []
    monkeypatch.setattr(image_files, "will_need", lambda t, rows: advised.append(rows))
    got = data.input_batches(tensor, batches, workers)
    depth = image_files._READ_AHEAD * (workers + 1)
    assert torch.equal(next(got), torch.from_numpy(want)[batches[0]])
    assert len(advised) >= depth and all(a is b for a, b in zip(advised, batches))
    rest = list(got)
    assert len(rest) == len(batches) - 1
    assert all(torch.equal(g, torch.from_numpy(want)[b]) for g, b in zip(rest, batches[1:]))
    assert len(advised) == len(batches) and all(a is b for a, b in zip(advised, batches))
    advised.clear()
    list(data.input_batches(torch.from_numpy(want), batches, workers))  # a tensor in memory: no advice
    assert advised == []
