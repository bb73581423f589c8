"""OPQN training: data preparation, the training loop, evaluation and checkpoints.

``python -m opqn_ext.train --help`` (or ``opqn train``) runs it from the command line. Defaults
are the paper's (DESIGN.md section 1): SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 256,
lr halved every 35 epochs, 200 epochs, margin 0.5, entropy weight 0.1, scale 20 (32x32 inputs)
or 40 (larger). Runs on CPU or CUDA (mixed precision on CUDA). Every epoch appends a JSON line
to ``log.jsonl`` and atomically replaces ``checkpoint.pt``; ``resume=True`` continues from it and
reaches the same weights as an uninterrupted run (data order, augmentation and dropout are all
drawn from generators whose state is saved).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import data as datasets
from .codebooks import KINDS as CODEBOOK_KINDS
from .data.builtin import load_builtin
from .distributed import all_reduce_sum, convert_batchnorm, destroy_process_group, init_from_env
from .metrics import RetrievalMetrics, evaluate_codes, evaluate_features
from .nn import ASSIGNMENTS, EmbeddingMLP, FaceResNet20, OrthoPQHead
from .ops import adc_topk

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
PROGRESS_EVERY = 20  # steps between the progress bar's loss updates (each waits for the device)
DATASETS = ("orl", "fashion-mnist", "folder", "features")
BACKBONES = ("resnet20", "mlp")
PROTOCOLS = ("seen", "unseen")


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in checkpoints."""

    dataset: str = "orl"  # orl | fashion-mnist | folder | features
    data_path: str = ""  # image folder root or feature file, for "folder" / "features"
    grayscale: bool = False  # "folder": read images as one gray channel
    stream: bool = False  # "folder": decode images batch by batch instead of holding the set in memory
    workers: int = -1  # loader processes (streamed folders) or read-ahead threads (tensors); -1: see loader_workers
    cache_dir: str = ""  # "folder": decode the images once into a file here, mapped by later runs and processes
    protocol: str = "seen"  # seen | unseen (identities held out of training)
    train_classes: int = 0  # unseen protocol: identities used for training (0: 3/4 of them)
    query_per_class: int = 3
    split_seed: int = 0
    backbone: str = "resnet20"  # resnet20 | mlp (features)
    width: int = 64  # resnet20 base channels (64 in the paper)
    input_size: int = 32
    feature_dim: int = 512
    dropout: float = 0.0
    num_books: int = 8  # 8 x 16 words: 32-bit codes with d = 64
    num_words: int = 16
    scale: float = 0.0  # CosFace scale; 0: 20 for inputs up to 64 pixels, else 40
    margin: float = 0.5
    entropy_weight: float = 0.1
    codebook_kind: str = "dct"
    assignment: str = "learned"
    learn_codebook: bool = False
    epochs: int = 200
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_step: int = 35
    lr_gamma: float = 0.5
    warmup_epochs: int = 0
    augment: bool = True  # random crops (4-pixel padding) and horizontal flips
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bfloat16 autocast on CUDA
    cpu_amp: bool = False  # bfloat16 autocast on the CPU: faster where it computes bfloat16 natively (AVX512-BF16, AMX)
    compile: bool = False  # torch.compile the training step's model (the first steps compile it)
    eval_every: int = 0  # evaluate every n epochs (0: only at the end)
    out_dir: str = "runs/opqn"
    progress: bool = True

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        if self.dataset in ("folder", "features") and not self.data_path:
            raise ValueError(f"dataset {self.dataset!r} needs data_path (--data-path)")
        for name in ("stream", "cache_dir"):
            if getattr(self, name) and self.dataset != "folder":
                raise ValueError(f"{name} reads image folders (dataset 'folder'), not dataset {self.dataset!r}")
        if self.stream and self.cache_dir:
            raise ValueError("stream decodes the images batch by batch, cache_dir maps them decoded once: choose one")
        if self.workers < -1:
            raise ValueError(f"workers must be >= 0, or -1 for one per CPU, got {self.workers}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be 'seen' or 'unseen', got {self.protocol!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}: choose one of {', '.join(BACKBONES)}")
        if self.feature_dim % self.num_books:
            raise ValueError(f"feature_dim ({self.feature_dim}) must be a multiple of num_books ({self.num_books})")
        d = self.feature_dim // self.num_books
        if not 2 <= self.num_words <= min(d, 256):
            raise ValueError(f"num_words (K={self.num_words}) must be in [2, min(d, 256)] with d = "
                             f"feature_dim / num_books = {d}: orthonormal codewords need K <= d")
        if self.codebook_kind not in CODEBOOK_KINDS:
            raise ValueError(f"codebook_kind must be one of {', '.join(CODEBOOK_KINDS)}, got {self.codebook_kind!r}")
        if self.codebook_kind == "hadamard" and d & (d - 1):
            raise ValueError(f"codebook_kind 'hadamard' needs d = feature_dim / num_books a power of two, got {d}")
        if self.assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {', '.join(ASSIGNMENTS)}, got {self.assignment!r}")
        for name in ("epochs", "batch_size", "lr_step", "width", "input_size", "query_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_classes", "margin", "entropy_weight", "weight_decay", "warmup_epochs", "eval_every",
                     "scale"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (self.lr > 0 and 0 <= self.momentum < 1 and 0 < self.lr_gamma <= 1):
            raise ValueError(f"lr must be > 0, momentum in [0, 1) and lr_gamma in (0, 1], got lr={self.lr}, "
                             f"momentum={self.momentum}, lr_gamma={self.lr_gamma}")

    def loader_workers(self, model_device: torch.device | None = None) -> int:
        """``workers``; for -1, the loader processes (or, for data in memory or in a cache, the
        read-ahead threads) to use while a model runs on ``model_device`` (None: none runs, as
        while a folder is read into memory): 0 for a model on the CPU, whose
        threads the processes would compete with (a streamed epoch measured 3.0 s with 0, 4.0-4.2 s
        with 1 or 2 on 2 vCPUs, benchmarks/RESULTS.md); else the CPUs this process may use shared
        among the processes of this host (torchrun's LOCAL_WORLD_SIZE), between 1 and 8."""
        if self.workers >= 0:
            return self.workers
        if model_device is not None and torch.device(model_device).type == "cpu":
            return 0
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))

    @property
    def code_bits(self) -> int:
        return self.num_books * int(math.log2(self.num_words))

    @property
    def cosface_scale(self) -> float:
        return self.scale or (20.0 if self.input_size <= 64 else 40.0)


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), by torch's own CPU checks;
    True where this torch has none of them."""
    checks = [check for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
              if (check := getattr(torch.cpu, name, None)) is not None]
    return not checks or any(check() for check in checks)


@dataclass
class PreparedData:
    """Model-ready data: ``inputs`` are uint8 images [N, C, H, W] at the input size (a tensor, or
    :class:`~opqn_ext.data.ImageFiles` read batch by batch) or float features [N, D]."""

    inputs: torch.Tensor | datasets.ImageFiles
    labels: torch.Tensor
    classes: list[str]
    split: datasets.RetrievalSplit
    train_labels: torch.Tensor = field(init=False)  # labels of split.train remapped to 0..C_train-1

    def __post_init__(self):
        train_classes = self.labels[self.split.train].unique()
        remap = torch.full((int(self.labels.max()) + 1,), -1, dtype=torch.long)
        remap[train_classes] = torch.arange(len(train_classes))
        self.train_labels = remap[self.labels[self.split.train]]

    @property
    def num_train_classes(self) -> int:
        return int(self.train_labels.max()) + 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA GPU is available")
    return device


def images_to_inputs(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> uint8 ``[N, C, size, size]`` (antialiased resize, rounded back).

    Images stay bytes in memory, a quarter of float32's (and of the host-to-GPU copies): the model
    maps them to [-1, 1] batch by batch (:meth:`OPQNModel.features`)."""
    if images.shape[-2:] == (size, size):
        return images.contiguous()
    return torch.cat([F.interpolate(part.float(), size=(size, size), mode="bilinear", antialias=True,
                                    align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
                      for part in images.split(4096)])


def load_dataset(cfg: TrainConfig, progress: bool = False):
    """(inputs, labels, classes) of the configured data set, before any split; ``progress``: a
    progress bar while an image folder is read into memory."""
    if cfg.dataset == "features" and cfg.backbone != "mlp":
        raise ValueError("feature files need the mlp backbone (--backbone mlp)")
    if cfg.dataset != "features" and cfg.backbone == "mlp":
        raise ValueError("the mlp backbone takes feature files (--dataset features)")
    if cfg.dataset == "folder":
        folder = datasets.load_image_folder(cfg.data_path, (cfg.input_size, cfg.input_size), cfg.grayscale,
                                            cfg.stream, cfg.loader_workers(), progress, cfg.cache_dir or None)
        return folder.images, folder.labels, folder.classes  # read at the input size
    if cfg.dataset == "features":
        feats = datasets.load_features(cfg.data_path)
        return feats.features.float(), feats.labels, feats.classes
    raw = load_builtin(cfg.dataset)
    return images_to_inputs(cast(torch.Tensor, raw.images), cfg.input_size), raw.labels, raw.classes  # in memory


def prepare_data(cfg: TrainConfig, progress: bool = False) -> PreparedData:
    """Load the data set and split it by the configured protocol (Fashion-MNIST's seen protocol
    keeps its own 60k/10k train/test split)."""
    inputs, labels, classes = load_dataset(cfg, progress)
    if cfg.protocol == "seen" and cfg.dataset == "fashion-mnist":
        train = torch.arange(60000)
        split = datasets.RetrievalSplit("seen", train, train, torch.arange(60000, len(labels)))
    elif cfg.protocol == "seen":
        split = datasets.seen_split(labels, cfg.query_per_class, cfg.split_seed, classes)
    else:
        n_classes = len(labels.unique())
        train_classes = cfg.train_classes or max(1, (3 * n_classes) // 4)
        split = datasets.unseen_split(labels, train_classes, cfg.query_per_class, cfg.split_seed, classes)
    return PreparedData(inputs, labels, classes, split)


class OPQNModel(nn.Module):
    """Backbone + OPQN head; ``features(x)`` gives the [B, D] features the head quantizes. Image
    inputs may be uint8 (mapped to [-1, 1] in the dtype of the backbone's weights) or already float."""

    def __init__(self, backbone: nn.Module, head: OrthoPQHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def _float_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dtype != torch.uint8:
            return inputs
        dtype = next(self.backbone.parameters()).dtype
        return inputs.to(dtype).div_(127.5).sub_(1.0)

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.backbone(self._float_inputs(inputs))

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor):
        features = self.features(inputs)
        if features.dtype in (torch.float16, torch.bfloat16):  # autocast: the head computes in float32
            features = features.float()
        return self.head(features, labels)


def build_model(cfg: TrainConfig, in_shape: tuple[int, ...], num_classes: int) -> OPQNModel:
    """The configured backbone for inputs of shape ``in_shape`` ([C, H, W] or [D]) and the head."""
    torch.manual_seed(cfg.seed)
    backbone: nn.Module
    if cfg.backbone == "mlp":
        backbone = EmbeddingMLP(in_shape[0], cfg.feature_dim, dropout=cfg.dropout)
    else:
        backbone = FaceResNet20(cfg.feature_dim, cfg.input_size, in_shape[0], cfg.width, cfg.dropout)
    head = OrthoPQHead(cfg.feature_dim, num_classes, cfg.num_books, cfg.num_words, cfg.cosface_scale, cfg.margin,
                       cfg.entropy_weight, cfg.codebook_kind, cfg.assignment, cfg.learn_codebook, seed=cfg.seed)
    return OPQNModel(backbone, head)


def draw_augmentation(n: int, g: torch.Generator, pad: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The augmentation of ``n`` images: random crops of the ``pad``-pixel zero-padded images and
    random horizontal flips, as (row shifts, column shifts, flips), [n] each."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    return dy, dx, torch.rand(n, generator=g) < 0.5


def apply_augmentation(batch: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                       pad: int = 4) -> torch.Tensor:
    """``batch [B, C, H, W]`` cropped from its zero-padded images at shifts ``dy, dx [B]``, flipped
    where ``flip``: two gathers on the batch's device (the flip is in the column indices), with no
    host synchronization, so a GPU batch is augmented on the GPU."""
    B, C, H, W = batch.shape
    device = batch.device
    dy, dx, flip = dy.to(device), dx.to(device), flip.to(device)
    padded = F.pad(batch, (pad, pad, pad, pad), value=0 if batch.dtype == torch.uint8 else -1.0)  # black
    rows = dy[:, None] + torch.arange(H, device=device)  # [B, H]
    out = padded.gather(2, rows[:, None, :, None].expand(B, C, H, W + 2 * pad))
    columns = torch.arange(W, device=device)
    cols = dx[:, None] + torch.where(flip[:, None], W - 1 - columns, columns)  # [B, W]
    return out.gather(3, cols[:, None, None, :].expand(B, C, H, W))


@torch.no_grad()
def extract_features(model: OPQNModel, inputs: torch.Tensor | datasets.ImageFiles, device: torch.device,
                     items: torch.Tensor | None = None, batch: int = 512, workers: int = 0) -> torch.Tensor:
    """Backbone features ``[len(items), D]`` float32 on the CPU of ``inputs[items]`` (all inputs by
    default), in eval mode; ``workers``: loader processes decoding streamed images, or a thread
    gathering batches from a tensor, ahead of use (:func:`~opqn_ext.data.input_batches`)."""
    items = torch.arange(len(inputs)) if items is None else items
    was_training = model.training
    model.eval()
    batches = datasets.input_batches(inputs, items.split(batch), workers, pin_memory=device.type == "cuda")
    out = [model.features(b.to(device, non_blocking=True)).float().cpu() for b in batches]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.head.num_books * model.head.dim)


def feature_chunks(model: OPQNModel, inputs: torch.Tensor | datasets.ImageFiles, device: torch.device,
                   items: torch.Tensor, chunk: int = 65536,
                   workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(items, their features) ``chunk`` items at a time (one chunk, empty, for no items): for sets
    whose features do not fit in memory at once (3.3M x 512 float32 take 6.8 GB)."""
    for part in items.split(chunk) if len(items) else [items]:
        yield part, extract_features(model, inputs, device, part, workers=workers)


@dataclass
class Evaluation:
    float_metrics: RetrievalMetrics
    code_metrics: RetrievalMetrics
    float_query_ms: float  # per query, top-10 over the database, float cosine on the CPU
    code_query_ms: float  # per query, top-10 through adc_topk

    def summary(self) -> dict:
        return {"float": self.float_metrics.summary() | {"query_ms": self.float_query_ms},
                "opqn": self.code_metrics.summary() | {"query_ms": self.code_query_ms}}


@torch.no_grad()
def evaluate(model: OPQNModel, prepared: PreparedData, device: torch.device, workers: int = 0) -> Evaluation:
    """Float-feature (cosine) and OPQN-code retrieval under the prepared split."""
    split = prepared.split
    db_feat = extract_features(model, prepared.inputs, device, split.database, workers=workers)
    q_feat = extract_features(model, prepared.inputs, device, split.query, workers=workers)
    db_labels, q_labels = prepared.labels[split.database], prepared.labels[split.query]
    codes = model.head.encode(db_feat.to(device)).cpu()
    luts = model.head.query_lut(q_feat.to(device)).cpu()
    float_metrics = evaluate_features(q_feat, db_feat, q_labels, db_labels)
    code_metrics = evaluate_codes(luts, codes, q_labels, db_labels)
    k = min(10, len(db_labels))
    start = time.perf_counter()
    adc_topk(luts, codes, k)
    code_ms = (time.perf_counter() - start) * 1e3 / max(1, len(q_labels))
    qn, dbn = F.normalize(q_feat, dim=1), F.normalize(db_feat, dim=1)
    start = time.perf_counter()
    torch.topk(qn @ dbn.T, k, dim=1)
    float_ms = (time.perf_counter() - start) * 1e3 / max(1, len(q_labels))
    return Evaluation(float_metrics, code_metrics, float_ms, code_ms)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# how a run reads its data and reports, not what it computes: may change when a run is resumed
RUN_ONLY_FIELDS = ("progress", "out_dir", "stream", "workers", "cache_dir", "compile")


def _what_runs(config: dict) -> dict:
    return {name: value for name, value in config.items() if name not in RUN_ONLY_FIELDS}


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint written by :func:`train` (tensors and plain data only: loaded with weights_only)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


def model_from_checkpoint(ckpt: dict) -> tuple[OPQNModel, TrainConfig]:
    """Rebuild the trained model (eval mode, CPU) and its config from a checkpoint."""
    cfg = TrainConfig(**ckpt["config"])
    model = build_model(cfg, tuple(ckpt["input_shape"]), ckpt["num_train_classes"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg


@dataclass
class TrainResult:
    model: OPQNModel
    config: TrainConfig
    evaluation: Evaluation | None
    history: list[dict]
    seconds: float


def train(cfg: TrainConfig, resume: bool = False, prepared: PreparedData | None = None, stop_after: int | None = None,
          evaluate_at_end: bool = True) -> TrainResult:
    """Train OPQN as configured; ``stop_after`` ends the run after that epoch (as an interruption would).

    Under torchrun (``WORLD_SIZE > 1``) this is data-parallel training with DDP (NCCL on GPUs, gloo
    on CPUs): every rank draws the same global batch order and augmentation, trains on its slice
    of each global batch with batch norm over the whole global batch, and rank 0 logs, writes
    checkpoints and evaluates. Without dropout, the result equals a one-process run up to
    floating-point reduction order.
    """
    from tqdm.auto import tqdm

    cfg.validate()
    device = resolve_device(cfg.device)
    distributed = init_from_env(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    main = rank == 0
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    prepared = prepared or prepare_data(cfg, progress=cfg.progress and main)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_items = prepared.split.train  # batches are gathered from prepared.inputs: no copy of the training set
    input_shape = list(prepared.inputs.shape[1:])
    train_labels = prepared.train_labels
    model = build_model(cfg, tuple(input_shape), prepared.num_train_classes)
    if distributed:
        model = cast(OPQNModel, convert_batchnorm(model, device))  # OPQNModel is no batch norm: converted in place
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_step, cfg.lr_gamma)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    start_epoch, history = 0, []
    ckpt_path = out_dir / CHECKPOINT_NAME
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        if _what_runs(ckpt["config"]) != _what_runs(dataclasses.asdict(cfg)):
            raise ValueError(f"{ckpt_path} was written by a run with a different configuration")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        data_gen.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_epoch, history = ckpt["epoch"] + 1, list(ckpt["history"])
    runner: nn.Module = model
    if distributed:
        runner = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # the model itself stays as it is: checkpoints and evaluation use it
        runner = cast(nn.Module, torch.compile(runner))
    log = None  # the main process's
    if main:  # a resumed run rewrites the log from the checkpoint: lines of a lost epoch disappear
        log = open(out_dir / LOG_NAME, "w")
        for record in history:
            log.write(json.dumps(record) + "\n")
    use_amp = cfg.amp if device.type == "cuda" else cfg.cpu_amp
    if use_amp and device.type == "cpu" and not cpu_has_native_bfloat16():
        warnings.warn("cpu_amp: this CPU has neither AVX512-BF16 nor AMX, so bfloat16 is emulated; a training "
                      "step measured 14-18x slower than float32 that way (benchmarks/RESULTS.md)", stacklevel=2)
    start = time.perf_counter()
    n = len(train_labels)
    steps = max(1, math.ceil(n / cfg.batch_size))
    show = None if cfg.progress and main else True  # tqdm's None: shown on terminals only
    bar = tqdm(total=(cfg.epochs - start_epoch) * steps, unit="step", disable=show, dynamic_ncols=True)
    images = len(input_shape) == 3
    workers = cfg.loader_workers(device)
    evaluation = None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            order = torch.randperm(n, generator=data_gen)
            # batch norm needs two samples a rank: a last batch with fewer is left out
            global_batches = [(step, idx) for step, idx in enumerate(order.split(cfg.batch_size))
                              if len(idx) >= 2 * world]
            # this rank's slice of each global batch, read (or decoded, ahead of use) from prepared.inputs
            mine = [idx.tensor_split(world)[rank] for _, idx in global_batches]
            batches = datasets.input_batches(prepared.inputs, [train_items[p] for p in mine], workers,
                                             pin_memory=device.type == "cuda")
            sums = torch.zeros(4, dtype=torch.float64, device=device)  # kept on the device: no sync per step
            seen = 0
            t0 = time.perf_counter()
            bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
            bar.update(steps - len(global_batches))
            waited = 0.0  # in the loader: read (or decoded) batches not ready when a step wanted one
            for (step, idx), part in zip(global_batches, mine):
                wait = time.perf_counter()
                batch = next(batches)
                waited += time.perf_counter() - wait
                bar.update(1)
                labels = train_labels[part]
                if device.type == "cuda":  # a copy from pageable memory would wait for the GPU
                    batch, labels = batch.pin_memory(), labels.pin_memory()  # (batches read ahead come pinned)
                batch, labels = batch.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                if cfg.augment and images:  # drawn for the global batch: every rank draws the same numbers
                    dy, dx, flip = (t.tensor_split(world)[rank] for t in draw_augmentation(len(idx), data_gen))
                    batch = apply_augmentation(batch, dy, dx, flip)
                if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
                    for group in optimizer.param_groups:
                        group["lr"] = cfg.lr * (epoch * steps + step + 1) / (cfg.warmup_epochs * steps)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    out = runner(batch, labels)
                optimizer.zero_grad(set_to_none=True)
                # scaled so that DDP's gradient average is the gradient of the global batch mean
                (out.loss * (len(labels) * world / len(idx))).backward()
                optimizer.step()
                parts = torch.stack([out.loss.detach(), out.original, out.quantized, out.entropy])
                sums += parts.to(torch.float64) * len(labels)
                seen += len(labels)
                if step % PROGRESS_EVERY == 0 or step == steps - 1:  # the epoch's mean loss so far: one sync
                    bar.set_postfix(loss=f"{(sums[0] / seen).item():.3f}", refresh=False)
            scheduler.step()
            if distributed:
                sums = all_reduce_sum(sums)
            sums /= n
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "loss": sums[0].item(),
                      "loss_original": sums[1].item(), "loss_quantized": sums[2].item(), "entropy": sums[3].item(),
                      "seconds": time.perf_counter() - t0, "data_wait_seconds": waited}
            if main and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
                record["eval"] = evaluate(model, prepared, device, workers).summary()
            history.append(record)
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
                _atomic_save({"config": dataclasses.asdict(cfg), "epoch": epoch, "model": model.state_dict(),
                              "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                              "data_rng": data_gen.get_state(), "torch_rng": torch.get_rng_state(),
                              "history": history, "input_shape": input_shape,
                              "num_train_classes": prepared.num_train_classes, "classes": prepared.classes,
                              "world_size": world}, ckpt_path)
            if stop_after is not None and epoch + 1 >= stop_after:
                break
        finished = not history or history[-1]["epoch"] == cfg.epochs
        if log is not None and evaluate_at_end and finished:
            evaluation = evaluate(model, prepared, device, workers)
            log.write(json.dumps({"final": evaluation.summary()}) + "\n")
    finally:
        bar.close()
        if log:
            log.close()
    if distributed:
        dist.barrier()
    return TrainResult(model.eval(), cfg, evaluation, history, time.perf_counter() - start)


def main(argv=None) -> int:
    """``python -m opqn_ext.train ...`` (or under torchrun): the options of ``opqn train``."""
    import sys

    from .cli import main as cli_main

    code = 1
    try:
        code = cli_main(["train", *(sys.argv[1:] if argv is None else argv)])
        return code
    finally:
        if dist.is_available() and dist.is_initialized():
            if code == 0:
                destroy_process_group()
            else:  # no barrier: a rank that failed alone must exit (torchrun then stops the others)
                dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
