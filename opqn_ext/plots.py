"""Figures of a retrieval evaluation: precision-recall curves and query/result montages (PNG)."""
from __future__ import annotations

from pathlib import Path

import torch

from .metrics import RetrievalMetrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_pr_curves(curves: dict[str, RetrievalMetrics], path: str | Path, title: str = "") -> Path:
    """One precision-recall curve per entry (label -> metrics), with the mAP in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    for label, m in curves.items():
        ax.plot(m.pr_recall, m.pr_precision, marker=".", markersize=3, label=f"{label} (mAP {m.map:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def save_montage(query_images: torch.Tensor, result_images: torch.Tensor, correct: torch.Tensor, path: str | Path,
                 title: str = "") -> Path:
    """A grid: each row a query (left) and its ranked results, framed green (same identity) or red.

    query_images: ``[Q, C, H, W]`` uint8; result_images: ``[Q, k, C, H, W]`` uint8; correct: ``[Q, k]`` bool.
    """
    plt = _pyplot()
    Q, k = correct.shape
    fig, axes = plt.subplots(Q, k + 1, figsize=(1.3 * (k + 1), 1.55 * Q), dpi=110, squeeze=False)

    def show(ax, img, color=None, label=""):
        img = img.permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(color is not None)
            if color:
                spine.set_color(color)
                spine.set_linewidth(3)
        ax.set_title(label, fontsize=7)

    for q in range(Q):
        show(axes[q, 0], query_images[q], label="query")
        for j in range(k):
            show(axes[q, j + 1], result_images[q, j], "tab:green" if correct[q, j] else "tab:red", f"#{j + 1}")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
