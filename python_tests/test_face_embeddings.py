"""dlib face embeddings (the optional faces extra; skipped where it is not installed)."""
import importlib.util

import pytest
import torch

from opqn_ext.data import load_orl
from opqn_ext.data import face_embeddings

needs_faces = pytest.mark.skipif(
    importlib.util.find_spec("dlib") is None or importlib.util.find_spec("face_recognition_models") is None,
    reason="the faces extra (dlib-bin, face_recognition_models) is not installed")


@needs_faces
def test_orl_embeddings_separate_identities():
    orl = load_orl()
    pick = torch.cat([torch.arange(0, 5), torch.arange(10, 15), torch.arange(20, 25)])  # 3 identities x 5
    feats = face_embeddings.embed_faces(orl.subset(pick))
    assert feats.features.shape == (15, 128) and feats.features.dtype == torch.float32
    assert torch.equal(feats.labels, orl.labels[pick])
    dist = torch.cdist(feats.features, feats.features)
    same = feats.labels[:, None] == feats.labels[None, :]
    off_diagonal = ~torch.eye(15, dtype=torch.bool)
    assert dist[same & off_diagonal].max() < dist[~same].min() + 0.1
    assert dist[same & off_diagonal].mean() < 0.6 * dist[~same].mean()
    again = face_embeddings.embed_faces(orl.subset(pick[:2]))
    assert torch.equal(again.features, feats.features[:2])


@needs_faces
def test_image_without_a_face_uses_the_whole_image():
    embed = face_embeddings.FaceEmbedder()
    blank = torch.full((1, 60, 50), 128, dtype=torch.uint8)
    assert embed(blank).shape == (128,) and embed.faces_found == 0


def test_missing_extra_says_what_to_install(monkeypatch):
    monkeypatch.setattr(face_embeddings.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install dlib-bin"):
        face_embeddings.face_model_files()
