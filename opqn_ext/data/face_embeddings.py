"""Real 128-d face embeddings with dlib's ResNet face model (the ``faces`` extra: ``dlib-bin`` and
``face_recognition_models``), for training OPQN on top of a face recognizer's features.

The model files are located inside the ``face_recognition_models`` package without importing it
(its ``__init__`` needs pkg_resources). Per image: HOG face detection with one upsampling; the
whole image when no face is found; 5-point landmarks; the 128-d descriptor of the aligned face.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from .datasets import LabeledFeatures, LabeledImages
from .folders import scan_image_folder
from .image_files import read_image

_MODEL_FILES = {"recognition": "dlib_face_recognition_resnet_model_v1.dat",
                "landmarks": "shape_predictor_5_face_landmarks.dat"}


def face_model_files() -> dict[str, Path]:
    """Paths of dlib's face recognition and landmark models; a clear error when the extra is missing."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("dlib") is None:
        raise FileNotFoundError("face embeddings need the faces extra: pip install dlib-bin==20.0.1.post1 "
                                "face_recognition_models==0.3.0 (or pip install -e .[faces])")
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = {name: models / file for name, file in _MODEL_FILES.items()}
    for path in files.values():
        if not path.exists():
            raise FileNotFoundError(f"{path}: dlib model file missing from face_recognition_models")
    return files


class FaceEmbedder:
    """dlib's 128-d face descriptor of uint8 images ``[C, H, W]`` (C = 1 or 3)."""

    def __init__(self):
        import dlib

        files = face_model_files()
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(files["landmarks"]))
        self.recognizer = dlib.face_recognition_model_v1(str(files["recognition"]))
        self.rectangle = dlib.rectangle
        self.faces_found = 0

    def __call__(self, image: torch.Tensor) -> np.ndarray:
        channels = image.expand(3, -1, -1) if image.shape[0] == 1 else image
        rgb = np.ascontiguousarray(channels.permute(1, 2, 0).numpy())
        faces = self.detector(rgb, 1)
        if len(faces):
            self.faces_found += 1
            box = max(faces, key=lambda r: r.area())
        else:
            box = self.rectangle(0, 0, rgb.shape[1] - 1, rgb.shape[0] - 1)
        shape = self.landmarks(rgb, box)
        return np.asarray(self.recognizer.compute_face_descriptor(rgb, shape), dtype=np.float32)


def embed_faces(images: LabeledImages, progress: bool = False) -> LabeledFeatures:
    """128-d dlib embeddings of every image of a data set, with its labels and classes."""
    each = (images.images[i] for i in range(len(images)))  # a tensor's rows, or ImageFiles read one by one
    return LabeledFeatures(_embed_all(each, len(images), progress), images.labels.clone(), list(images.classes))


def embed_image_folder(root: str | Path, progress: bool = False) -> LabeledFeatures:
    """128-d dlib embeddings of every image of ``root/<identity>/`` (:func:`scan_image_folder`),
    each read at its own size when its turn comes: any size, any number of images."""
    paths, labels, classes = scan_image_folder(root)
    images = (torch.from_numpy(read_image(path, None, grayscale=False)) for path in paths)
    return LabeledFeatures(_embed_all(images, len(paths), progress), labels, classes)


def _embed_all(images: Iterable[torch.Tensor], count: int, progress: bool) -> torch.Tensor:
    from tqdm.auto import tqdm

    embed = FaceEmbedder()
    show = None if progress else True  # tqdm's None: shown on terminals only
    rows = [embed(img) for img in tqdm(images, total=count, desc="dlib face embeddings", disable=show)]
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, 128)
