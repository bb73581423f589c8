"""Files written through safetensors (index, code and feature files) get the permissions of any new
file of the process, or keep those of the file they replace: safetensors 0.8 alone makes them
0600 (readable by their owner only)."""
import os
import stat

import pytest
import torch

from opqn_ext import orthonormal_codebooks
from opqn_ext.data import load_features, save_features
from opqn_ext.index import OPQNIndex
from opqn_ext.safetensors_files import new_file_mode, process_umask


@pytest.fixture
def umask():
    """Sets the process umask for the test (returns the setter); restores it after."""
    before = os.umask(0o022)
    yield os.umask
    os.umask(before)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_umask_is_read_without_changing_it(umask):
    umask(0o027)
    assert process_umask() == 0o027 and new_file_mode() == 0o640
    assert os.umask(0o027) == 0o027  # unchanged by the reads


def test_index_and_feature_files_are_readable_as_other_new_files(tmp_path, umask):
    codebook = orthonormal_codebooks(2, 8, 4)
    index = OPQNIndex(torch.randn(2, 8, 4), codebook, query_scale=1.0)
    index.add(torch.randn(10, 16))
    path = index.save(tmp_path / "faces.opqn")
    assert mode(path) == 0o644
    os.chmod(path, 0o640)  # a rewrite keeps what the owner chose
    index.add(torch.randn(3, 16))
    index.save(path)
    assert mode(path) == 0o640 and len(OPQNIndex.load(path)) == 13

    umask(0o007)
    save_features(tmp_path / "f.safetensors", torch.randn(4, 16), torch.arange(4))
    assert mode(tmp_path / "f.safetensors") == 0o660
    assert torch.equal(load_features(tmp_path / "f.safetensors").labels, torch.arange(4))
