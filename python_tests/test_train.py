"""Training on ORL: a short run that learns (real mAP assertions), resume equal to an
uninterrupted run, the JSON-lines log and checkpoint contents, augmentation, and runs on a
streamed image folder equal to runs in memory."""
import dataclasses
import json
import time

import pytest
import torch

from opqn_ext.data import ImageFiles
from opqn_ext.train import (TrainConfig, apply_augmentation, draw_augmentation, extract_features, images_to_inputs,
                            load_checkpoint, model_from_checkpoint, prepare_data, train)


def tiny(tmp_path, **kw):
    base = dict(dataset="orl", width=8, input_size=32, num_books=8, num_words=16, epochs=4, lr_step=20,
                out_dir=str(tmp_path / "run"), progress=False, seed=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def orl_seen():
    return prepare_data(TrainConfig(dataset="orl", input_size=32))


def test_short_orl_run_learns_to_retrieve(tmp_path, orl_seen):
    # chance mAP is ~0.04 (7 relevant among 280 database images)
    result = train(tiny(tmp_path, epochs=60), prepared=orl_seen)
    ev = result.evaluation
    assert ev.float_metrics.map > 0.6, ev.summary()
    assert ev.code_metrics.map > 0.45, ev.summary()
    assert result.history[-1]["loss"] < 0.75 * result.history[0]["loss"]
    lines = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [line["epoch"] for line in lines[:-1]] == list(range(1, 61))
    assert {"loss", "loss_original", "loss_quantized", "entropy", "lr", "data_wait_seconds"} <= set(lines[0])
    assert all(0 <= line["data_wait_seconds"] < line["seconds"] for line in lines[:-1])
    assert lines[-1]["final"]["opqn"]["mAP"] == pytest.approx(ev.code_metrics.map)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, orl_seen):
    straight = train(tiny(tmp_path / "a", dropout=0.2), prepared=orl_seen, evaluate_at_end=False)
    cfg = tiny(tmp_path / "b", dropout=0.2)
    first = train(cfg, prepared=orl_seen, stop_after=2, evaluate_at_end=False)
    assert len(first.history) == 2
    resumed = train(cfg, resume=True, prepared=orl_seen, evaluate_at_end=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]


def test_a_compiled_run_trains_as_an_eager_run_and_may_resume_either_way(tmp_path):
    """--compile: the same losses and weights up to the compiled kernels' rounding, checkpoints of the
    model itself (no torch.compile wrapper in their keys), and compile changes nothing a resume checks."""
    from opqn_ext.data import save_features

    g = torch.Generator().manual_seed(0)
    centers, labels = torch.randn(20, 32, generator=g), torch.arange(20).repeat_interleave(10)
    save_features(tmp_path / "f.safetensors", centers[labels] + 0.3 * torch.randn(200, 32, generator=g), labels,
                  [f"id{i}" for i in range(20)])
    cfg = TrainConfig(dataset="features", data_path=str(tmp_path / "f.safetensors"), backbone="mlp", epochs=2,
                      batch_size=64, progress=False, device="cpu", out_dir=str(tmp_path / "eager"))
    eager = train(cfg, evaluate_at_end=False)
    compiled_cfg = dataclasses.replace(cfg, compile=True, out_dir=str(tmp_path / "compiled"))
    torch._dynamo.reset()
    first = train(compiled_cfg, stop_after=1, evaluate_at_end=False)
    assert list(load_checkpoint(tmp_path / "compiled")["model"]) == list(eager.model.state_dict())
    resumed = train(dataclasses.replace(compiled_cfg, compile=False), resume=True, evaluate_at_end=False)
    assert len(first.history) == 1 and [h["epoch"] for h in resumed.history] == [1, 2]
    for mine, theirs in zip(resumed.history, eager.history):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    for name, value in eager.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_resume_refuses_a_different_configuration(tmp_path, orl_seen):
    train(tiny(tmp_path, epochs=1), prepared=orl_seen, evaluate_at_end=False)
    with pytest.raises(ValueError, match="different configuration"):
        train(tiny(tmp_path, epochs=1, lr=0.05), resume=True, prepared=orl_seen)


def test_checkpoint_rebuilds_the_model(tmp_path, orl_seen):
    result = train(tiny(tmp_path, epochs=1), prepared=orl_seen, evaluate_at_end=False)
    ckpt = load_checkpoint(tmp_path / "run")
    model, cfg = model_from_checkpoint(ckpt)
    assert cfg.num_books == 8 and ckpt["epoch"] == 0
    x = orl_seen.inputs[:5]
    result.model.eval()
    assert torch.equal(model.features(x), result.model.features(x))


def test_images_stay_bytes_and_the_model_maps_them_to_its_float_range(tmp_path, orl_seen):
    assert orl_seen.inputs.dtype == torch.uint8 and orl_seen.inputs.shape[1:] == (1, 32, 32)
    images = torch.randint(0, 256, (3, 1, 40, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    resized = torch.nn.functional.interpolate(images.float(), size=(32, 32), mode="bilinear", antialias=True,
                                              align_corners=False)
    assert torch.equal(images_to_inputs(images, 32), resized.round().clamp(0, 255).to(torch.uint8))
    square = images[..., :32, :32]
    assert torch.equal(images_to_inputs(square, 32), square)  # already the input size: kept as they are
    model = train(tiny(tmp_path, epochs=1), prepared=orl_seen, evaluate_at_end=False).model.eval()
    x = orl_seen.inputs[:6]
    as_float = x.float() / 127.5 - 1.0
    torch.testing.assert_close(model.features(x), model.features(as_float), rtol=0, atol=1e-6)
    model.double()  # the bytes follow the weights' dtype
    assert model.features(x).dtype == torch.float64


def test_augmenting_bytes_equals_augmenting_their_float_images():
    images = torch.randint(0, 256, (5, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    draws = draw_augmentation(len(images), torch.Generator().manual_seed(3))
    got = apply_augmentation(images, *draws)
    want = apply_augmentation(images.float() / 127.5 - 1.0, *draws)
    assert got.dtype == torch.uint8
    torch.testing.assert_close(got.float() / 127.5 - 1.0, want, rtol=0, atol=1e-6)
    assert (got == 0).any()  # crops reach into the black padding


def test_augmentation_crops_and_flips_each_image():
    images = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 1, 3, 4) + 1
    dy, dx, flip = torch.tensor([2, 4]), torch.tensor([4, 5]), torch.tensor([False, True])
    got = apply_augmentation(images, dy, dx, flip)  # padded: 4 black rows and columns on every side
    assert torch.equal(got[0, 0], torch.cat([torch.zeros(2, 4, dtype=torch.uint8), images[0, 0, :1]]))
    assert torch.equal(got[1, 0], torch.cat([images[1, 0, :, 1:], torch.zeros(3, 1, dtype=torch.uint8)], 1).flip(-1))
    dy, dx, flip = draw_augmentation(1000, torch.Generator().manual_seed(0))
    assert dy.min() == dx.min() == 0 and dy.max() == dx.max() == 8 and 400 < int(flip.sum()) < 600


def test_augmentation_on_the_batch_device_is_each_image_cropped_then_flipped(device):
    images = torch.randint(0, 256, (32, 3, 10, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    dy, dx, flip = draw_augmentation(32, torch.Generator().manual_seed(2))
    got = apply_augmentation(images.to(device), dy, dx, flip)
    assert got.device.type == device.type
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(32):
        crop = padded[i, :, dy[i]:dy[i] + 10, dx[i]:dx[i] + 7]
        assert torch.equal(got[i].cpu(), crop.flip(-1) if flip[i] else crop), i


def test_unseen_protocol_trains_on_held_in_identities_only(tmp_path):
    prepared = prepare_data(tiny(tmp_path, protocol="unseen", train_classes=30))
    assert prepared.num_train_classes == 30 and len(prepared.split.train) == 300
    assert int(prepared.train_labels.max()) == 29


@pytest.mark.parametrize("kw,match", [
    (dict(dataset="mnist"), "unknown dataset 'mnist'"),
    (dict(num_words=128), r"num_words \(K=128\) must be in \[2, min\(d, 256\)\]"),
    (dict(feature_dim=500), "must be a multiple of num_books"),
    (dict(protocol="both"), "protocol must be"),
    (dict(dataset="folder"), "needs data_path"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(stream=True), "stream reads image folders \\(dataset 'folder'\\), not dataset 'orl'"),
    (dict(cache_dir="c"), "cache_dir reads image folders \\(dataset 'folder'\\), not dataset 'orl'"),
    (dict(dataset="folder", data_path="f", stream=True, cache_dir="c"),
     "stream decodes .* cache_dir maps .*: choose one"),
    (dict(workers=-2), r"workers must be >= 0, or -1 for one per CPU, got -2"),
    (dict(codebook_kind="pca"), "codebook_kind must be one of dct, random, hadamard, got 'pca'"),
    (dict(codebook_kind="hadamard", feature_dim=480), "codebook_kind 'hadamard' needs d = feature_dim / num_books "
                                                      "a power of two, got 60"),
    (dict(assignment="fixed"), "assignment must be one of learned, codeword, got 'fixed'"),
    (dict(query_per_class=0), "query_per_class must be >= 1, got 0"),
    (dict(margin=-0.1), "margin must be >= 0, got -0.1"),
    (dict(entropy_weight=float("nan")), "entropy_weight must be >= 0, got nan"),
    (dict(warmup_epochs=-1), "warmup_epochs must be >= 0, got -1"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(lr=0.0), r"lr must be > 0, momentum in \[0, 1\) and lr_gamma in \(0, 1\], got lr=0.0"),
    (dict(lr_gamma=1.5), "lr_gamma=1.5"),
])
def test_config_errors(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(tmp_path, **kw).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_short_orl_run_on_cuda_with_mixed_precision(tmp_path, orl_seen):
    result = train(tiny(tmp_path, epochs=60, device="cuda", amp=True), prepared=orl_seen)
    assert result.evaluation.code_metrics.map > 0.45, result.evaluation.summary()


def test_short_orl_run_with_cpu_mixed_precision(tmp_path, orl_seen):
    """cpu_amp runs the backbone under bfloat16 autocast (the losses differ from float32's from the
    first epoch on) and still learns to retrieve."""
    mixed = train(tiny(tmp_path / "bf16", epochs=60, cpu_amp=True), prepared=orl_seen)
    plain = train(tiny(tmp_path / "fp32", epochs=1), prepared=orl_seen, evaluate_at_end=False)
    assert mixed.history[0]["loss"] != plain.history[0]["loss"]
    assert mixed.evaluation.code_metrics.map > 0.45, mixed.evaluation.summary()


def test_cpu_mixed_precision_warns_where_bfloat16_is_emulated(tmp_path, orl_seen, monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    with pytest.warns(UserWarning, match="bfloat16 is emulated"):
        train(tiny(tmp_path, epochs=1, cpu_amp=True), prepared=orl_seen, evaluate_at_end=False)


@pytest.mark.parametrize("how", ["streamed", "cached"])
def test_training_on_a_folder_equals_training_in_memory(tmp_path, orl_seen, orl_folder, how):
    """The folder holds ORL's 32 x 32 training bytes: decoded batch by batch by two loader processes,
    or decoded once by them into a cache file the run maps, the run (batch order, augmentation,
    weights, evaluation) is the in-memory run."""
    memory = train(tiny(tmp_path / "memory", epochs=2, dropout=0.2), prepared=orl_seen)
    read = dict(stream=True) if how == "streamed" else dict(cache_dir=str(tmp_path / "cache"))
    cfg = tiny(tmp_path / how, epochs=2, dropout=0.2, dataset="folder", data_path=str(orl_folder), grayscale=True,
               workers=2, **read)
    prepared = prepare_data(cfg)
    assert isinstance(prepared.inputs, ImageFiles if how == "streamed" else torch.Tensor)
    assert torch.equal(prepared.split.query, orl_seen.split.query)
    streamed = train(cfg, prepared=prepared)
    a, b = memory.model.state_dict(), streamed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in streamed.history] == [h["loss"] for h in memory.history]
    assert streamed.evaluation.code_metrics.map == memory.evaluation.code_metrics.map
    assert streamed.evaluation.float_metrics.map == memory.evaluation.float_metrics.map


def test_the_log_gives_the_time_spent_waiting_for_batches(tmp_path, orl_seen, monkeypatch):
    import opqn_ext.train as train_module

    real = train_module.datasets.input_batches

    def slow_batches(*args, **kwargs):  # a loader that keeps every step waiting 50 ms
        for batch in real(*args, **kwargs):
            time.sleep(0.05)
            yield batch

    monkeypatch.setattr(train_module.datasets, "input_batches", slow_batches)
    history = train(tiny(tmp_path, epochs=2, batch_size=64), prepared=orl_seen, evaluate_at_end=False).history
    assert all(0.05 * 5 <= h["data_wait_seconds"] < h["seconds"] for h in history)  # 280 items: 5 batches of 64


def test_resume_may_change_how_data_is_read(tmp_path, orl_folder):
    cfg = tiny(tmp_path, epochs=2, dropout=0.2, dataset="folder", data_path=str(orl_folder), grayscale=True)
    first = train(cfg, stop_after=1, evaluate_at_end=False)
    resumed = train(dataclasses.replace(cfg, stream=True, workers=1), resume=True, evaluate_at_end=False)
    straight = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "straight")), evaluate_at_end=False)
    assert len(first.history) == 1 and [h["epoch"] for h in resumed.history] == [1, 2]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_extract_features_of_items_equals_features_of_their_inputs(tmp_path, orl_seen, orl_folder):
    model = train(tiny(tmp_path, epochs=1), prepared=orl_seen, evaluate_at_end=False).model
    items = torch.tensor([399, 3, 150, 3])
    want = extract_features(model, orl_seen.inputs[items], torch.device("cpu"), batch=3)
    streamed = tiny(tmp_path, dataset="folder", data_path=str(orl_folder), grayscale=True, stream=True)
    files = prepare_data(streamed).inputs
    for inputs, workers in ((orl_seen.inputs, 0), (files, 0), (files, 2)):
        got = extract_features(model, inputs, torch.device("cpu"), items, batch=3, workers=workers)
        assert torch.equal(got, want), (type(inputs), workers)
    assert extract_features(model, files, torch.device("cpu"), items[:0]).shape == (0, 512)


def test_loader_workers_default_to_the_cpus_shared_by_the_ranks_of_a_host(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(20)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert TrainConfig().loader_workers() == TrainConfig().loader_workers("cuda:1") == 8
    assert TrainConfig(workers=0).loader_workers() == 0
    assert TrainConfig().loader_workers("cpu") == 0  # the model's threads would compete with them
    assert TrainConfig(workers=3).loader_workers("cpu") == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert TrainConfig().loader_workers() == 5 and TrainConfig(workers=12).loader_workers() == 12
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert TrainConfig().loader_workers(torch.device("cuda")) == 1
