"""OPQN modules: the orthonormal product-quantization head with its loss, and backbones.

``OrthoPQHead`` implements DESIGN.md section 1: per book m, soft assignment of the sub-feature
``x_m`` over fixed orthonormal codewords (``soft_quantize``), a CosFace-style margin loss on the
original sub-features and on the soft-quantized ones with class weights shared by both branches,
and an entropy penalty that pushes assignments toward one codeword.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .codebooks import orthonormal_codebooks
from .ops import encode as encode_op
from .ops import soft_quantize

ASSIGNMENTS = ("learned", "codeword")


class OPQNLoss(NamedTuple):
    """``loss = 0.5 * (original + quantized) + entropy_weight * entropy``; parts are detached floats' tensors."""

    loss: torch.Tensor
    original: torch.Tensor  # L_x: margin cross-entropy of the original sub-features
    quantized: torch.Tensor  # L_s: margin cross-entropy of the soft-quantized sub-features
    entropy: torch.Tensor  # mean entropy of the soft assignments


def margin_cross_entropy(features: torch.Tensor, class_weight: torch.Tensor, labels: torch.Tensor,
                         scale: float, margin: float) -> torch.Tensor:
    """Mean over books and samples of CE(scale * (cos(f_m, W_m) - margin * onehot(y)), y).

    features: ``[B, M, d]``; class_weight: ``[M, C, d]``; labels: ``[B]``.
    """
    B, M, _ = features.shape
    cos = torch.einsum("bmd,mcd->mbc", F.normalize(features, dim=-1), F.normalize(class_weight, dim=-1))
    classes = torch.arange(class_weight.shape[1], device=labels.device)
    target = (labels.unsqueeze(1) == classes).to(cos.dtype)  # [B, C] one-hot (F.one_hot is not vmap-able)
    logits = scale * (cos - margin * target)  # [M, B, C]
    return F.cross_entropy(logits.reshape(M * B, -1), labels.repeat(M))


def _assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)``, where ``target`` may be a DTensor (a parameter that FSDP2 shards):
    it then gets its own part of ``value`` (the first rank's value, for all ranks)."""
    if dist.is_available():
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(target, DTensor):
            value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements)
    target.copy_(value)


class OrthoPQHead(nn.Module):
    """Orthonormal product quantization head (OPQN).

    Args:
        feature_dim: D = num_books * d, the backbone's feature size.
        num_classes: identities seen in training (rows of ``class_weight``).
        num_books, num_words: M and K; code length M * log2(K) bits; K <= d and K <= 256.
        scale, margin: CosFace scale s and margin of both loss branches.
        entropy_weight: mu, the weight of the mean assignment entropy.
        codebook_kind: "dct" (the paper), "random" or "hadamard" (see ``orthonormal_codebooks``).
        assignment: "learned" (Xavier-initialized ``assign_weight``, the paper's code) or
            "codeword" (similarity to the codewords themselves).
        learn_codebook: train the codebook as a parameter (the learnable-codebook baseline the
            paper compares against); it starts orthonormal but does not stay so.
        assign_scale: multiplier of the assignment logits in training (unnormalized sub-features).
        query_scale: multiplier of the query-table logits (normalized sub-features); ``None``
            uses the running mean sub-feature norm seen in training, so query tables have the
            sharpness of training assignments.
        seed: seeds the codebook ("random") and the parameter initialization.

    Buffers/parameters: ``codebook [M, d, K]`` (buffer unless ``learn_codebook``),
    ``assign_weight [M, d, K]``, ``class_weight [M, num_classes, d]``, ``feature_norm`` (running
    mean of ``||x_m||``).
    """

    codebook: torch.Tensor
    assign_weight: torch.Tensor
    feature_norm: torch.Tensor

    def __init__(self, feature_dim: int, num_classes: int, num_books: int, num_words: int, scale: float = 20.0,
                 margin: float = 0.5, entropy_weight: float = 0.1, codebook_kind: str = "dct",
                 assignment: str = "learned", learn_codebook: bool = False, assign_scale: float = 1.0,
                 query_scale: float | None = None, seed: int | None = None):
        super().__init__()
        if num_books < 1 or feature_dim < 1 or feature_dim % num_books:
            raise ValueError(f"feature_dim ({feature_dim}) must be a positive multiple of num_books ({num_books})")
        d = feature_dim // num_books
        if not 1 <= num_words <= min(d, 256):
            raise ValueError(f"num_words must be in [1, min(d, 256)] with d = feature_dim / num_books = {d}, got {num_words}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
        self.num_books, self.dim, self.num_words, self.num_classes = num_books, d, num_words, num_classes
        self.scale, self.margin, self.entropy_weight = float(scale), float(margin), float(entropy_weight)
        self.assignment, self.learn_codebook = assignment, bool(learn_codebook)
        self.assign_scale = float(assign_scale)
        self.query_scale = None if query_scale is None else float(query_scale)
        self.codebook_kind, self.seed = codebook_kind, seed
        codebook = orthonormal_codebooks(num_books, d, num_words, kind=codebook_kind, seed=seed)
        if self.learn_codebook:
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
        if assignment == "learned":
            self.assign_weight = nn.Parameter(torch.empty(num_books, d, num_words))
        self.class_weight = nn.Parameter(torch.empty(num_books, num_classes, d))
        self.register_buffer("feature_norm", torch.empty(()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initializes every parameter and buffer in place, on their device: the orthonormal
        codebook, Xavier-uniform ``assign_weight`` and ``class_weight`` (from ``seed`` when one was
        given: the same values every time), ``feature_norm = sqrt(d)``. Models made on the meta
        device and materialized with ``to_empty`` (FSDP2's recipe) call it to get their values."""
        if self.class_weight.is_meta:  # nothing to fill before to_empty
            return
        M, d, K = self.num_books, self.dim, self.num_words
        g = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        _assign(self.codebook, orthonormal_codebooks(M, d, K, kind=self.codebook_kind, seed=self.seed))
        if self.assignment == "learned":
            bound = math.sqrt(6.0 / (d + K))  # Xavier-uniform for a [d, K] matrix
            _assign(self.assign_weight, torch.empty(M, d, K, device="cpu").uniform_(-bound, bound, generator=g))
        bound = math.sqrt(6.0 / (self.num_classes + d))
        _assign(self.class_weight, torch.empty(M, self.num_classes, d, device="cpu").uniform_(-bound, bound, generator=g))
        self.feature_norm.fill_(math.sqrt(d))

    @property
    def assignment_weight(self) -> torch.Tensor:
        """``[M, d, K]``: the learned assignment weights, or the codebook for "codeword"."""
        return self.assign_weight if self.assignment == "learned" else self.codebook

    @property
    def code_bits(self) -> int:
        return self.num_books * math.ceil(math.log2(self.num_words)) if self.num_words > 1 else 0

    def _split(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.num_books * self.dim:
            raise ValueError(f"features must be [B, {self.num_books * self.dim}], got {list(features.shape)}")
        return features.reshape(features.shape[0], self.num_books, self.dim)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> OPQNLoss:
        """The OPQN loss of a batch: ``features [B, D]``, ``labels [B]`` int64 in ``[0, num_classes)``
        (the range is checked in eager mode on the CPU; on CUDA it would cost a sync per step).

        Under torch.func's transforms (per-sample gradients: ``vmap(grad(...))`` over
        ``functional_call``) the loss and its derivatives are the same, but the running feature
        norm is not updated (a transform may not change a buffer; as for BatchNorm's running
        statistics) and the label range is not checked."""
        x = self._split(features)
        self._check_labels(labels, x.shape[0])
        codebook = self.codebook.to(x.dtype)
        sq = soft_quantize(x, self.assignment_weight.to(x.dtype), codebook, self.assign_scale, False)
        if self.training and not torch._C._are_functorch_transforms_active():
            self._track_feature_norm(x.detach())
        class_weight = self.class_weight.to(x.dtype)
        original = margin_cross_entropy(x, class_weight, labels, self.scale, self.margin)
        quantized = margin_cross_entropy(sq.quantized, class_weight, labels, self.scale, self.margin)
        entropy = sq.entropy.mean()
        loss = 0.5 * (original + quantized) + self.entropy_weight * entropy
        return OPQNLoss(loss, original.detach(), quantized.detach(), entropy.detach())

    def _check_labels(self, labels: torch.Tensor, batch: int) -> None:
        if labels.dtype != torch.int64 or labels.shape != (batch,):
            raise ValueError(f"labels must be int64 [{batch}] (one class index per feature row), got "
                             f"{labels.dtype} {list(labels.shape)}")
        if (labels.device.type == "cpu" and batch and not torch.compiler.is_compiling()
                and not torch._C._are_functorch_transforms_active()
                and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes):
            raise ValueError(f"labels must lie in [0, num_classes={self.num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")

    @torch.no_grad()
    def _track_feature_norm(self, x: torch.Tensor) -> None:
        """Running mean of ``||x_m||`` over the (global, under torch.distributed) batch."""
        norms = x.norm(dim=-1)
        # the count is filled on the device: a tensor made from a Python number would be a host copy,
        # and a host copy waits for the GPU once per step
        stats = torch.stack([norms.sum(), norms.new_full((), float(norms.numel()))])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        self.feature_norm.lerp_((stats[0] / stats[1]).to(self.feature_norm.dtype), 0.01)

    @torch.no_grad()
    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Database codes ``[B, M]`` uint8: the most similar word per book."""
        x = self._split(features)
        return encode_op(x, self.assignment_weight.to(x.dtype), normalize=True)

    @torch.no_grad()
    def query_lut(self, features: torch.Tensor) -> torch.Tensor:
        """Query tables ``[B, M, K]`` float32 for ``adc_topk``: the inner products of the
        soft-quantized query with every codeword (= the assignment probabilities when the codebook
        is orthonormal)."""
        x = self._split(features)
        scale = self.query_scale if self.query_scale is not None else self.feature_norm
        sq = soft_quantize(x, self.assignment_weight.to(x.dtype), self.codebook.to(x.dtype), scale, True)
        if not self.learn_codebook:
            return sq.probs.float()
        return torch.einsum("bmd,mdk->bmk", sq.quantized, self.codebook.to(x.dtype)).float()

    def extra_repr(self) -> str:
        return (f"M={self.num_books}, d={self.dim}, K={self.num_words} ({self.code_bits} bits), "
                f"classes={self.num_classes}, scale={self.scale}, margin={self.margin}, "
                f"entropy_weight={self.entropy_weight}, codebook={self.codebook_kind}"
                f"{' (learned)' if self.learn_codebook else ''}, assignment={self.assignment}")


def _conv_bn_prelu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout))


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn_prelu(channels, channels, 1), _conv_bn_prelu(channels, channels, 1))

    def forward(self, x):
        return x + self.body(x)


class FaceResNet20(nn.Module):
    """The paper's SphereFace-style 20-layer residual face network.

    Four stages, each a strided 3x3 conv then (1, 2, 4, 1) residual blocks of two 3x3 convs
    (4 + 2 * 8 = 20 conv layers), channels (1, 2, 4, 8) * ``width`` (64 in the paper), BN + PReLU;
    head: BN -> dropout -> flatten -> FC -> BN. Strides (1, 2, 2, 2) for inputs up to 64 pixels
    (32x32 in the paper), (2, 2, 2, 2) above (112x112).
    """

    def __init__(self, feature_dim: int = 512, input_size: int | tuple[int, int] = 32, in_channels: int = 3,
                 width: int = 64, dropout: float = 0.0):
        super().__init__()
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
        strides = (1, 2, 2, 2) if max(h, w) <= 64 else (2, 2, 2, 2)
        layers: list[nn.Module] = []
        cin = in_channels
        for depth, mult, stride in zip((1, 2, 4, 1), (1, 2, 4, 8), strides):
            cout = width * mult
            layers.append(_conv_bn_prelu(cin, cout, stride))
            layers.extend(_Residual(cout) for _ in range(depth))
            cin = cout
            h, w = (h + stride - 1) // stride, (w + stride - 1) // stride
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.BatchNorm2d(cin), nn.Dropout(dropout), nn.Flatten(),
                                  nn.Linear(cin * h * w, feature_dim), nn.BatchNorm1d(feature_dim))
        self.feature_dim, self.input_size, self.in_channels = feature_dim, input_size, in_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


class EmbeddingMLP(nn.Module):
    """A small MLP for precomputed embeddings (e.g. 128-d dlib face descriptors): Linear-BN-PReLU
    blocks, then Linear -> BN to ``feature_dim``."""

    def __init__(self, in_dim: int, feature_dim: int = 512, hidden: int = 1024, layers: int = 1, dropout: float = 0.0):
        super().__init__()
        blocks, cin = [], in_dim
        for _ in range(layers):
            blocks += [nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.PReLU(hidden), nn.Dropout(dropout)]
            cin = hidden
        blocks += [nn.Linear(cin, feature_dim), nn.BatchNorm1d(feature_dim)]
        self.net = nn.Sequential(*blocks)
        self.feature_dim, self.in_dim = feature_dim, in_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)
