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


@needs_faces
def test_a_folder_of_mixed_sizes_is_embedded_image_by_image(tmp_path, capsys):
    """Face photos come in many sizes: each is read and embedded at its own (no common size, nothing
    held in memory but one image); the same image in memory gives the same descriptor."""
    from PIL import Image

    from opqn_ext.cli import main

    orl = load_orl()
    for i, item in enumerate([0, 1, 10, 11, 12]):
        folder = tmp_path / "faces" / orl.classes[int(orl.labels[item])]
        folder.mkdir(parents=True, exist_ok=True)
        face = Image.fromarray(orl.images[item, 0].numpy())
        (face if i % 2 == 0 else face.resize((92 + 20 * i, 112 + 24 * i))).save(folder / f"{i}.png")
    feats = face_embeddings.embed_image_folder(tmp_path / "faces")
    assert feats.features.shape == (5, 128) and feats.labels.tolist() == [0, 0, 1, 1, 1]
    assert feats.classes == ["s1", "s2"]
    native = face_embeddings.embed_faces(orl.subset(torch.tensor([0, 10, 12])))
    torch.testing.assert_close(feats.features[[0, 2, 4]], native.features, rtol=0, atol=1e-6)
    assert main(["embed", "--dataset", "folder", "--data-path", str(tmp_path / "faces"), "-o",
                 str(tmp_path / "emb.safetensors"), "--no-progress"]) == 0
    assert "embedded 5 images (2 identities)" in capsys.readouterr().out
