"""``opqn demo``: train OPQN on ORL faces on the CPU and show what the codes retrieve.

Seen-identity protocol (7 database + 3 query images per identity), 32-bit codes (8 books x 16
words), the paper's recipe with a narrower residual net so that it trains in a few minutes on
two cores. Prints float features vs OPQN codes (mAP, P@5, P@10, query time) and writes
``pr_curve.png``, ``montage.png`` and ``demo.json`` into the output folder.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .data import load_orl
from .ops import adc_topk
from .plots import save_montage, save_pr_curves
from .train import TrainConfig, extract_features, prepare_data, train


def _run(protocol: str, out_dir: Path, epochs: int, width: int, progress: bool, seed: int):
    cfg = TrainConfig(dataset="orl", protocol=protocol, train_classes=30, width=width, epochs=epochs,
                      num_books=8, num_words=16, out_dir=str(out_dir / protocol), progress=progress, seed=seed)
    prepared = prepare_data(cfg)
    print(f"ORL, {protocol} identities: training on {len(prepared.split.train)} images of "
          f"{prepared.num_train_classes} identities; {len(prepared.split.query)} queries against "
          f"{len(prepared.split.database)} database images; {cfg.code_bits}-bit codes "
          f"({cfg.num_books} books x {cfg.num_words} words)", flush=True)
    result = train(cfg, prepared=prepared)
    return cfg, prepared, result


def run_demo(out_dir: Path = Path("runs/demo"), epochs: int = 200, width: int = 16, unseen: bool = False,
             progress: bool = True, seed: int = 0) -> dict:
    from .cli import format_table

    out_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    protocols = ["seen"] + (["unseen"] if unseen else [])
    for protocol in protocols:
        start = time.perf_counter()
        cfg, prepared, result = _run(protocol, out_dir, epochs, width, progress, seed)
        ev = result.evaluation
        print(f"\n{protocol} identities, trained {cfg.epochs} epochs in {result.seconds:.0f} s on "
              f"{'the CPU' if cfg.device in ('cpu', 'auto') and not torch.cuda.is_available() else cfg.device}:")
        print(format_table(ev, cfg.feature_dim, cfg.code_bits), flush=True)
        report[protocol] = ev.summary() | {"train_seconds": result.seconds, "total_seconds": time.perf_counter() - start}
        curves = save_pr_curves({"float features": ev.float_metrics, f"OPQN {cfg.code_bits}-bit": ev.code_metrics},
                                out_dir / f"pr_curve{'' if protocol == 'seen' else '_unseen'}.png",
                                f"ORL, {protocol} identities")
        print(f"wrote {curves}")
        if protocol == "seen":
            print(f"wrote {_montage(result.model, prepared, out_dir / 'montage.png')}")
    (out_dir / "demo.json").write_text(json.dumps(report, indent=2))
    return report


def _montage(model, prepared, path: Path, queries: int = 6, k: int = 5) -> Path:
    """Queries of six identities spread over ORL with their top-5 database images by OPQN codes."""
    split = prepared.split
    cpu = torch.device("cpu")
    codes = model.head.encode(extract_features(model, prepared.inputs[split.database], cpu))
    q_labels = prepared.labels[split.query]
    chosen = [int(torch.nonzero(q_labels == c)[0]) for c in q_labels.unique()[:: max(1, len(q_labels.unique()) // queries)][:queries]]
    q_items = split.query[chosen]
    luts = model.head.query_lut(extract_features(model, prepared.inputs[q_items], cpu))
    _, hits = adc_topk(luts, codes, k)
    db_items = split.database[hits]
    images = load_orl().images
    correct = prepared.labels[db_items] == prepared.labels[q_items][:, None]
    return save_montage(list(images[q_items]), [list(row) for row in images[db_items]], correct, path,
                        f"ORL queries and their top-{k} by {model.head.code_bits}-bit OPQN codes")
