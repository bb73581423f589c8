"""Figures of a retrieval evaluation: precision-recall curves and query/result montages (PNG)."""
from __future__ import annotations

from collections.abc import Sequence
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


def save_montage(query_images: Sequence[torch.Tensor | None], result_images: Sequence[Sequence[torch.Tensor | None]],
                 correct: torch.Tensor | Sequence[Sequence[bool | None]] | None, path: str | Path, title: str = "",
                 captions: Sequence[Sequence[str]] | None = None, query_captions: Sequence[str] | None = None) -> Path:
    """A grid: each row a query (left) and its ranked results, framed green (same identity), red
    (another) or not at all (unknown: ``correct`` or its entry None).

    query_images: Q uint8 ``[C, H, W]`` images (a ``[Q, C, H, W]`` tensor or a list); result_images:
    Q rows of results (a ``[Q, k, C, H, W]`` tensor, or lists that may be shorter than the longest
    row); an image None is drawn as a gray tile saying so. correct: ``[Q, k]`` bools. captions: a
    title per result (default ``#rank``); query_captions: a title per query (default ``query``).
    """
    plt = _pyplot()
    rows = len(query_images)
    cols = max([len(r) for r in result_images], default=0) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.55 * rows), dpi=110, squeeze=False)

    def show(ax, img, color=None, label=""):
        ax.set_xticks([])
        ax.set_yticks([])
        if img is None:
            ax.set_facecolor("0.85")
            ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=6, transform=ax.transAxes)
        else:
            img = img.permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        for spine in ax.spines.values():
            spine.set_visible(color is not None)
            if color:
                spine.set_color(color)
                spine.set_linewidth(3)
        ax.set_title(label, fontsize=7)

    for q in range(rows):
        show(axes[q, 0], query_images[q], label="query" if query_captions is None else query_captions[q])
        for j in range(cols - 1):
            if j >= len(result_images[q]):
                axes[q, j + 1].axis("off")
                continue
            same = None if correct is None else correct[q][j]
            color = None if same is None else "tab:green" if bool(same) else "tab:red"
            show(axes[q, j + 1], result_images[q][j], color, f"#{j + 1}" if captions is None else captions[q][j])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
