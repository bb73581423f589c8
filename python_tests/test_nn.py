"""OrthoPQHead and the backbones: the loss against an independent computation of DESIGN.md's
formulas, where gradients go, encoding and query tables, and argument errors."""
import math

import pytest
import torch

import opqn_ext
from opqn_ext.nn import EmbeddingMLP, FaceResNet20, OrthoPQHead


def independent_loss(f, y, A, C, W, assign_scale, s, mg, mu):
    """L = 0.5 (L_x + L_s) + mu * mean H, one book and one sample at a time from the formulas."""
    B = f.shape[0]
    M, d, K = A.shape
    total_x = total_s = total_h = 0.0
    for m in range(M):
        for b in range(B):
            x = f[b, m * d:(m + 1) * d]
            logits = assign_scale * (x @ A[m])
            p = torch.exp(logits - logits.max())
            p = p / p.sum()
            sq = C[m] @ p
            total_h += -(p * torch.log(p)).sum()
            for v, which in ((x, "x"), (sq, "s")):
                cos = torch.stack([torch.dot(v, W[m, c]) / (v.norm() * W[m, c].norm()) for c in range(W.shape[1])])
                z = s * (cos - mg * torch.nn.functional.one_hot(y[b], W.shape[1]).double())
                ce = torch.logsumexp(z, 0) - z[y[b]]
                if which == "x":
                    total_x += ce
                else:
                    total_s += ce
    n = M * B
    return 0.5 * (total_x / n + total_s / n) + mu * total_h / n, total_x / n, total_s / n, total_h / n


@pytest.mark.parametrize("M,D,K,classes", [(2, 16, 8, 5), (4, 32, 4, 3), (1, 8, 8, 7)])
@pytest.mark.parametrize("assignment", ["learned", "codeword"])
def test_loss_equals_the_formulas(M, D, K, classes, assignment):
    head = OrthoPQHead(D, classes, M, K, scale=7.0, margin=0.3, entropy_weight=0.2, assignment=assignment,
                       assign_scale=1.5, seed=1).double()
    g = torch.Generator().manual_seed(2)
    f = torch.randn(6, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (6,), generator=g)
    out = head(f, y)
    A = head.assign_weight if assignment == "learned" else head.codebook
    want = independent_loss(f, y, A.detach(), head.codebook, head.class_weight.detach(), 1.5, 7.0, 0.3, 0.2)
    for got, exp in zip(out, want):
        assert float(got.detach()) == pytest.approx(float(exp), rel=1e-10)


def test_gradients_reach_backbone_assignment_and_classes_but_not_the_codebook():
    backbone = FaceResNet20(64, 16, 1, width=4)
    head = OrthoPQHead(64, 5, 4, 8, seed=0)
    images = torch.randn(6, 1, 16, 16)
    out = head(backbone(images), torch.tensor([0, 1, 2, 3, 4, 0]))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())
    assert head.assign_weight.grad.abs().sum() > 0 and head.class_weight.grad.abs().sum() > 0
    assert not head.codebook.requires_grad and head.codebook.grad is None
    assert "codebook" not in dict(head.named_parameters()) and "codebook" in dict(head.named_buffers())


def test_learnable_codebook_variant_trains_the_codebook():
    head = OrthoPQHead(32, 4, 2, 8, learn_codebook=True, seed=0)
    assert "codebook" in dict(head.named_parameters())
    head(torch.randn(5, 32), torch.tensor([0, 1, 2, 3, 0])).loss.backward()
    assert head.codebook.grad.abs().sum() > 0
    lut = head.query_lut(torch.randn(3, 32))  # inner products <s_m, c_mk>
    assert lut.shape == (3, 2, 8)


def test_codebook_is_orthonormal_and_fixed_by_kind():
    head = OrthoPQHead(64, 4, 2, 16, codebook_kind="dct")
    eye = torch.einsum("mdk,mdj->mkj", head.codebook, head.codebook)
    assert torch.allclose(eye, torch.eye(16).expand(2, 16, 16), atol=1e-5)
    assert torch.equal(head.codebook, opqn_ext.orthonormal_codebooks(2, 32, 16, kind="dct"))


def test_encode_and_query_lut():
    head = OrthoPQHead(48, 4, 3, 8, seed=3)
    f = torch.randn(10, 48)
    codes = head.encode(f)
    logits = torch.einsum("bmd,mdk->bmk", f.reshape(10, 3, 16), head.assign_weight.detach())
    assert torch.equal(codes, logits.argmax(-1).to(torch.uint8))
    lut = head.query_lut(f)
    assert lut.dtype == torch.float32 and torch.allclose(lut.sum(-1), torch.ones(10, 3))
    # orthonormal codewords: the table is the inner product of the soft-quantized query with each word
    sq = opqn_ext.soft_quantize(f, head.assign_weight.detach(), head.codebook, float(head.feature_norm), True)
    assert torch.allclose(lut, torch.einsum("bmd,mdk->bmk", sq.quantized, head.codebook), atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(seed=3), dict(seed=3, codebook_kind="random", learn_codebook=True),
                                    dict(seed=3, assignment="codeword", codebook_kind="hadamard")])
def test_a_head_made_on_the_meta_device_gets_the_values_of_a_head_made_directly(kwargs):
    """FSDP2's recipe: build on the meta device, to_empty, then reset_parameters every module."""
    want = OrthoPQHead(64, 7, 4, 16, **kwargs).state_dict()
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 64), OrthoPQHead(64, 7, 4, 16, **kwargs))
    model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    got = model[1].state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_reset_parameters_restores_the_initial_values_after_training():
    head = OrthoPQHead(64, 7, 4, 16, seed=5)
    initial = {k: v.clone() for k, v in head.state_dict().items()}
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    head(torch.randn(9, 64), torch.randint(0, 7, (9,))).loss.backward()
    optimizer.step()
    assert not torch.equal(head.assign_weight, initial["assign_weight"])
    head.reset_parameters()
    for name, value in head.state_dict().items():
        assert torch.equal(value, initial[name]), name


@pytest.mark.parametrize("training", [False, True])
def test_per_sample_gradients_of_the_head_equal_one_backward_per_sample(training):
    """torch.func over the whole head (vmap(grad) of functional_call), as DP-SGD and influence
    methods use it: each sample's gradients equal an ordinary backward of that sample alone."""
    from torch.func import functional_call, grad, vmap

    head = OrthoPQHead(64, 7, 4, 16, seed=0).train(training)
    params = {name: p.detach() for name, p in head.named_parameters()}
    norm_before = head.feature_norm.clone()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 64, generator=g, dtype=torch.float32), torch.randint(0, 7, (5,), generator=g)

    def loss(p, features, labels):
        return functional_call(head, p, (features.unsqueeze(0), labels.unsqueeze(0))).loss

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    assert torch.equal(head.feature_norm, norm_before)  # not updated under the transform
    for b in range(5):
        head.zero_grad()
        head(x[b:b + 1], y[b:b + 1]).loss.backward()
        for name, p in head.named_parameters():
            torch.testing.assert_close(per_sample[name][b], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_feature_norm_tracks_training_features():
    head = OrthoPQHead(16, 3, 2, 4)
    for _ in range(500):
        head(torch.randn(8, 16) * 3.0, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    assert float(head.feature_norm) == pytest.approx(3.0 * math.sqrt(8), rel=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_training_step_of_the_head_on_cuda_never_waits_for_the_gpu():
    head = OrthoPQHead(512, 1000, 8, 64).cuda()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    features = torch.randn(256, 512, device="cuda", requires_grad=True)
    labels = torch.randint(0, 1000, (256,), device="cuda")
    for sync_mode in ("default", "error"):  # the first step warms up; the second raises on any sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            out = head(features, labels)
            out.loss.backward()
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss).item()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(feature_dim=64, num_classes=4, num_books=4, num_words=32), r"num_words must be in \[1, min\(d, 256\)\]"),
        (dict(feature_dim=65, num_classes=4, num_books=4, num_words=4), "must be a positive multiple of num_books"),
        (dict(feature_dim=64, num_classes=1, num_books=4, num_words=4), "num_classes must be >= 2"),
        (dict(feature_dim=64, num_classes=4, num_books=4, num_words=4, assignment="x"), "assignment must be one of"),
        (dict(feature_dim=64, num_classes=4, num_books=4, num_words=4, codebook_kind="x"), "kind"),
    ],
)
def test_head_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OrthoPQHead(**kwargs)


def test_head_rejects_wrong_feature_width():
    with pytest.raises(ValueError, match=r"features must be \[B, 64\]"):
        OrthoPQHead(64, 4, 4, 4)(torch.randn(2, 63), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "labels,match",
    [
        (torch.tensor([0, 1, 2]), r"labels must be int64 \[4\] \(one class index per feature row\), got torch.int64 \[3\]"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), r"labels must be int64 \[4\].*got torch.float32"),
        (torch.tensor([0, 1, 2, 3], dtype=torch.int32), r"labels must be int64 \[4\].*got torch.int32"),
        (torch.tensor([0, 1, 2, 5]), r"labels must lie in \[0, num_classes=5\), got \[0, 5\]"),
        (torch.tensor([0, -1, 2, 3]), r"labels must lie in \[0, num_classes=5\), got \[-1, 3\]"),
    ],
)
def test_head_rejects_bad_labels_naming_them(labels, match):
    with pytest.raises(ValueError, match=match):
        OrthoPQHead(64, 5, 4, 4)(torch.randn(4, 64), labels)


@pytest.mark.parametrize("size,channels,spatial", [(32, 1, 4), (112, 3, 7), (28, 1, 4)])
def test_face_resnet20_shapes_and_depth(size, channels, spatial):
    net = FaceResNet20(128, size, channels, width=4)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20
    assert net.head[3].in_features == 32 * spatial * spatial
    assert net(torch.randn(2, channels, size, size)).shape == (2, 128)


def test_embedding_mlp():
    net = EmbeddingMLP(128, 64, hidden=32)
    assert net(torch.randn(4, 128)).shape == (4, 64)
