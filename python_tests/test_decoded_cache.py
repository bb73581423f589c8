"""The decoded-image cache of image folders: decoded once, mapped (not read) by later loads, decoded
again when the folder changes, shared by the processes of a torchrun host."""
import errno
import fcntl
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from opqn_ext import data, file_lock
from opqn_ext.data import decoded_cache
from test_data import write_faces

SIZE = (24, 20)


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose mapping holds the tensor's data in this process (/proc/self/maps), None if none."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(a, 16) for a in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) == 6 else None
    return None


def no_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(data.image_files, "read_image", refuse)


@pytest.mark.parametrize("grayscale", [False, True])
def test_a_cached_folder_is_decoded_once_and_then_mapped(tmp_path, monkeypatch, grayscale):
    write_faces(tmp_path / "faces")
    loaded = data.load_image_folder(tmp_path / "faces", SIZE, grayscale)
    paths, _, _ = data.scan_image_folder(tmp_path / "faces")
    first, built = decoded_cache.decoded_images(tmp_path / "faces", paths, SIZE, grayscale, tmp_path / "cache",
                                                workers=2)
    assert built and torch.equal(first, loaded.images)
    images_file, manifest = decoded_cache.cache_files(tmp_path / "cache", tmp_path / "faces", SIZE, grayscale)
    assert images_file.name.startswith(f"faces-24x20-{'gray' if grayscale else 'rgb'}-") and manifest.exists()
    lock = decoded_cache.lock_file(manifest)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([images_file.name, manifest.name,
                                                                             lock.name])
    no_decoding(monkeypatch)
    cached = data.load_image_folder(tmp_path / "faces", SIZE, grayscale, cache_dir=tmp_path / "cache")
    assert torch.equal(cached.images, loaded.images) and torch.equal(cached.labels, loaded.labels)
    assert cached.classes == loaded.classes == ["alice", "bob"]
    assert mapped_file(cached.images) == str(images_file)
    cached.images[0] += 1  # copy-on-write: the file keeps the decoded bytes
    again = data.load_image_folder(tmp_path / "faces", SIZE, grayscale, cache_dir=tmp_path / "cache")
    assert torch.equal(again.images, loaded.images)


def test_a_folder_that_changed_is_decoded_again(tmp_path, monkeypatch):
    from PIL import Image

    faces, cache = tmp_path / "faces", tmp_path / "cache"
    write_faces(faces)
    data.load_image_folder(faces, SIZE, cache_dir=cache)

    def check():
        got = data.load_image_folder(faces, SIZE, cache_dir=cache)
        want = data.load_image_folder(faces, SIZE)
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)

    Image.fromarray(np.zeros((60, 50, 3), dtype=np.uint8)).save(faces / "bob" / "9.png")  # an image added
    check()
    (faces / "alice" / "1.jpg").unlink()  # one removed
    check()
    Image.fromarray(np.full((60, 50, 3), 200, dtype=np.uint8)).save(faces / "bob" / "9.png")  # one rewritten
    later = time.time() + 10
    os.utime(faces / "bob" / "9.png", (later, later))
    check()
    assert data.load_image_folder(faces, SIZE, cache_dir=cache).images[-1].unique().tolist() == [200]
    data.load_image_folder(faces, (8, 8), cache_dir=cache)  # another size: another file beside it
    assert len(list(cache.glob("faces-*.npy"))) == 2
    no_decoding(monkeypatch)
    check_cached = data.load_image_folder(faces, SIZE, cache_dir=cache)
    assert check_cached.images.shape == (5, 3, *SIZE)


def test_a_damaged_cache_file_is_decoded_again(tmp_path):
    write_faces(tmp_path / "faces")
    want = data.load_image_folder(tmp_path / "faces", SIZE).images
    data.load_image_folder(tmp_path / "faces", SIZE, cache_dir=tmp_path / "cache")
    images_file, _ = decoded_cache.cache_files(tmp_path / "cache", tmp_path / "faces", SIZE, False)
    images_file.write_bytes(images_file.read_bytes()[:-100])
    assert torch.equal(data.load_image_folder(tmp_path / "faces", SIZE, cache_dir=tmp_path / "cache").images, want)
    np.save(images_file, np.zeros((5, 3, 8, 8), dtype=np.uint8))  # a file of another shape
    assert torch.equal(data.load_image_folder(tmp_path / "faces", SIZE, cache_dir=tmp_path / "cache").images, want)


def test_two_folders_of_one_name_have_their_own_files(tmp_path):
    write_faces(tmp_path / "a" / "faces")
    write_faces(tmp_path / "b" / "faces", count=(1, 1))
    a = data.load_image_folder(tmp_path / "a" / "faces", SIZE, cache_dir=tmp_path / "cache")
    b = data.load_image_folder(tmp_path / "b" / "faces", SIZE, cache_dir=tmp_path / "cache")
    assert len(a.images) == 5 and len(b.images) == 2 and len(list((tmp_path / "cache").glob("*.npy"))) == 2


def test_cache_errors(tmp_path, monkeypatch):
    write_faces(tmp_path / "faces")
    with pytest.raises(ValueError, match="stream=True decodes .* cache_dir maps .*: choose one"):
        data.load_image_folder(tmp_path / "faces", SIZE, stream=True, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"cache_dir needs size=\(height, width\)"):
        data.load_image_folder(tmp_path / "faces", cache_dir=tmp_path / "cache")
    (tmp_path / "faces" / "bob" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg: unreadable image"):
        data.load_image_folder(tmp_path / "faces", SIZE, workers=2, cache_dir=tmp_path / "cache")
    _, manifest = decoded_cache.cache_files(tmp_path / "cache", tmp_path / "faces", SIZE, False)
    lock = decoded_cache.lock_file(manifest)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [lock.name]  # no manifest, no half-written file
    (tmp_path / "faces" / "bob" / "broken.jpg").unlink()

    class Usage:
        free = 5 * 3 * 24 * 20 - 1

    monkeypatch.setattr(decoded_cache.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(ValueError, match=r"cache_dir .*cache has 0\.0 GB free; the 5 images need 0\.0 GB decoded at "
                                         r"24x20"):
        data.load_image_folder(tmp_path / "faces", SIZE, cache_dir=tmp_path / "cache")


class HeldLock:
    """The cache's lock held as another job decoding it (on this host or on another one sharing the
    cache folder) would hold it: flock locks of two open files conflict within one process too."""

    def __init__(self, tmp_path):
        _, self.manifest = decoded_cache.cache_files(tmp_path / "cache", tmp_path / "faces", SIZE, False)
        self.manifest.parent.mkdir(exist_ok=True)
        self.fd = os.open(decoded_cache.lock_file(self.manifest), os.O_RDWR | os.O_CREAT)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def decode_in_thread(tmp_path, paths):
    """decoded_images of the faces on a thread (a process of another job); its result in .result."""
    thread = threading.Thread(target=lambda: setattr(thread, "result", decoded_cache.decoded_images(
        tmp_path / "faces", paths, SIZE, False, tmp_path / "cache", progress=True)))
    thread.start()
    return thread


def test_a_second_job_waits_for_the_one_decoding_the_cache_and_maps_its_file(tmp_path, capfd):
    write_faces(tmp_path / "faces")
    paths, _, _ = data.scan_image_folder(tmp_path / "faces")
    held = HeldLock(tmp_path)
    other = decode_in_thread(tmp_path, paths)
    time.sleep(1.5)
    assert other.is_alive() and not list((tmp_path / "cache").glob("*.npy"))  # waiting, not decoding
    assert "waiting for another process decoding the images into" in capfd.readouterr().err
    images_path, manifest = decoded_cache.cache_files(tmp_path / "cache", tmp_path / "faces", SIZE, False)
    # the holder decodes meanwhile, then lets go
    decoded_cache._build(paths, SIZE, False, images_path, 0, False)
    manifest.write_text(json.dumps(decoded_cache._manifest(tmp_path / "faces", SIZE, False, len(paths),
                                                           decoded_cache.folder_fingerprint(tmp_path / "faces", paths))))
    held.release()
    other.join(timeout=30)
    images, decoded = other.result
    assert not decoded and mapped_file(images) == str(images_path)
    assert torch.equal(images, data.load_image_folder(tmp_path / "faces", SIZE).images)


def test_a_job_decodes_the_cache_itself_when_the_holder_stops_without_it(tmp_path):
    write_faces(tmp_path / "faces")
    paths, _, _ = data.scan_image_folder(tmp_path / "faces")
    held = HeldLock(tmp_path)
    other = decode_in_thread(tmp_path, paths)
    time.sleep(1)
    held.release()  # the holder failed (or was killed: the kernel releases its lock)
    other.join(timeout=30)
    images, decoded = other.result
    assert decoded and torch.equal(images, data.load_image_folder(tmp_path / "faces", SIZE).images)


def test_waiting_for_the_lock_times_out(tmp_path):
    write_faces(tmp_path / "faces")
    paths, _, _ = data.scan_image_folder(tmp_path / "faces")
    held = HeldLock(tmp_path)
    try:
        with pytest.raises(TimeoutError, match=r"waited 1 s for another process decoding the images into .*faces-24x20"
                                               r".* \(it holds .*\.faces-24x20-rgb-\w+\.lock locked\)"):
            decoded_cache.decoded_images(tmp_path / "faces", paths, SIZE, False, tmp_path / "cache", timeout=1)
    finally:
        held.release()


def test_without_locks_on_the_file_system_the_cache_is_still_decoded(tmp_path, monkeypatch):
    write_faces(tmp_path / "faces")
    paths, _, _ = data.scan_image_folder(tmp_path / "faces")

    def unsupported(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(file_lock.fcntl, "flock", unsupported)
    images, decoded = decoded_cache.decoded_images(tmp_path / "faces", paths, SIZE, False, tmp_path / "cache")
    assert decoded and torch.equal(images, data.load_image_folder(tmp_path / "faces", SIZE).images)


WAITER = """
import sys, torch
from opqn_ext import data, file_lock
images = data.load_image_folder(sys.argv[1], (24, 20), cache_dir=sys.argv[2]).images
print(int(images.sum()), len(images))
"""


def start_waiter(tmp_path):
    """A process of the same torchrun host as this one, LOCAL_RANK 1: it waits for LOCAL_RANK 0."""
    env = dict(os.environ, LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    return subprocess.Popen([sys.executable, "-c", WAITER, str(tmp_path / "faces"), str(tmp_path / "cache")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_other_processes_of_a_host_wait_for_local_rank_0(tmp_path, monkeypatch):
    write_faces(tmp_path / "faces")
    waiter = start_waiter(tmp_path)
    time.sleep(3)  # the waiter polls for the manifest meanwhile
    assert waiter.poll() is None
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    images = data.load_image_folder(tmp_path / "faces", SIZE, cache_dir=tmp_path / "cache").images
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    assert out.split() == [str(int(images.sum())), "5"]


def test_a_failure_of_local_rank_0_ends_the_waiting_processes(tmp_path, monkeypatch):
    write_faces(tmp_path / "faces")
    (tmp_path / "faces" / "bob" / "broken.jpg").write_bytes(b"not a jpeg")
    waiter = start_waiter(tmp_path)
    time.sleep(3)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"broken\.jpg: unreadable image"):
        data.load_image_folder(tmp_path / "faces", SIZE, cache_dir=tmp_path / "cache")
    _, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 1
    assert "RuntimeError: LOCAL_RANK 0 failed to decode the images into" in err and "broken.jpg: unreadable" in err


def test_a_waiting_process_times_out_and_ignores_an_earlier_jobs_failure(tmp_path, monkeypatch):
    write_faces(tmp_path / "faces")
    paths, _, _ = data.scan_image_folder(tmp_path / "faces")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    _, manifest = decoded_cache.cache_files(tmp_path / "cache", tmp_path / "faces", SIZE, False)
    failure = decoded_cache._failure_file(manifest)
    failure.parent.mkdir()
    failure.write_text("ValueError: an earlier job's")
    os.utime(failure, (time.time() - 60, time.time() - 60))
    with pytest.raises(TimeoutError, match=r"waited 1 s for LOCAL_RANK 0 to decode the images into .*faces-24x20"):
        decoded_cache.decoded_images(tmp_path / "faces", paths, SIZE, False, tmp_path / "cache", timeout=1)
    failure.touch()
    with pytest.raises(RuntimeError, match="LOCAL_RANK 0 failed to decode .*: ValueError: an earlier job's"):
        decoded_cache.decoded_images(tmp_path / "faces", paths, SIZE, False, tmp_path / "cache", timeout=1)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun restarted the job: a new attempt
    with pytest.raises(TimeoutError, match="waited 1 s"):
        decoded_cache.decoded_images(tmp_path / "faces", paths, SIZE, False, tmp_path / "cache", timeout=1)
