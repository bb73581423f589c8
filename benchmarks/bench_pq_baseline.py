"""OPQN codes against post-hoc product quantization of the same network's features, at the same
code length: what the jointly trained orthonormal head buys over quantizing afterwards.

For a trained checkpoint: the backbone's features of the database and query images, then
  float      cosine similarity of the features (the upper bound of any code),
  OPQN       the checkpoint's own codes and query tables (adc_scores),
  PQ         FAISS ProductQuantizer trained on the L2-normalized database features, with as many
             bits as the OPQN codes, as M x 8 bits and as OPQN's own M x log2(K),
  OPQ+PQ     the same after a FAISS OPQ rotation (an orthonormal matrix: cosines are unchanged).
PQ layouts are trained only where the database has FAISS's 39 points per centroid. Database items
get the nearest centroid per subspace; a query's table holds the inner products of
its normalized sub-vectors with the centroids (asymmetric distance, inner product). Every method is
ranked over the whole database and scored by opqn_ext.metrics (ties by database index).

    python benchmarks/bench_pq_baseline.py RUN_DIR_OR_CHECKPOINT [--json PATH]
"""
import argparse
import json
import math
import os
import time

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from opqn_ext.metrics import evaluate_codes, evaluate_features
from opqn_ext.train import extract_features, load_checkpoint, model_from_checkpoint, prepare_data


# FAISS's k-means asks for this many training points per centroid (and its OPQ training crashed
# here on a few hundred points).
MIN_POINTS_PER_CENTROID = 39


def pq_codes_and_tables(db: np.ndarray, queries: np.ndarray, books: int, bits: int, opq: bool):
    """(query tables [nq, books, 2^bits], database codes [N, books] uint8) of a PQ trained on db."""
    D = db.shape[1]
    if opq:
        rotation = faiss.OPQMatrix(D, books)
        rotation.train(db)
        db, queries = rotation.apply_py(db), rotation.apply_py(queries)
    pq = faiss.ProductQuantizer(D, books, bits)
    pq.train(db)
    centroids = torch.from_numpy(faiss.vector_to_array(pq.centroids).reshape(books, 2 ** bits, D // books))
    db_sub = torch.from_numpy(db).view(len(db), books, D // books).transpose(0, 1)  # [books, N, dsub]
    codes = torch.cdist(db_sub, centroids).argmin(2).T.to(torch.uint8).contiguous()  # nearest centroid
    q_sub = torch.from_numpy(queries).view(len(queries), books, D // books)
    tables = torch.einsum("qmd,mkd->qmk", q_sub, centroids)
    return tables, codes


def row(name: str, bits: int, metrics, seconds: float) -> dict:
    return {"method": name, "bits": bits, "mAP": metrics.map, "P@5": metrics.precision_at[5],
            "P@10": metrics.precision_at[10], "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint.pt or the run folder holding it")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    path = os.path.join(args.checkpoint, "checkpoint.pt") if os.path.isdir(args.checkpoint) else args.checkpoint
    model, cfg = model_from_checkpoint(load_checkpoint(path))
    prepared = prepare_data(cfg)
    split = prepared.split
    cpu = torch.device("cpu")
    db_feat = extract_features(model, prepared.inputs[split.database], cpu)
    q_feat = extract_features(model, prepared.inputs[split.query], cpu)
    db_labels, q_labels = prepared.labels[split.database], prepared.labels[split.query]
    bits = cfg.num_books * int(math.log2(cfg.num_words))

    rows = []
    start = time.perf_counter()
    rows.append(row("float features", 32 * db_feat.shape[1], evaluate_features(q_feat, db_feat, q_labels, db_labels),
                    time.perf_counter() - start))
    start = time.perf_counter()
    with torch.no_grad():
        opqn = evaluate_codes(model.head.query_lut(q_feat), model.head.encode(db_feat), q_labels, db_labels)
    rows.append(row(f"OPQN {cfg.num_books}x{int(math.log2(cfg.num_words))}", bits, opqn, time.perf_counter() - start))
    db_np = F.normalize(db_feat, dim=1).numpy().astype(np.float32)
    q_np = F.normalize(q_feat, dim=1).numpy().astype(np.float32)
    layouts = []
    for books, book_bits in sorted({(bits // 8, 8), (cfg.num_books, int(math.log2(cfg.num_words)))}):
        if len(db_np) >= MIN_POINTS_PER_CENTROID * 2 ** book_bits:
            layouts.append((books, book_bits))
        else:
            print(f"skipped PQ {books}x{book_bits}: {len(db_np)} database items to train {2 ** book_bits} "
                  f"centroids, FAISS wants {MIN_POINTS_PER_CENTROID} per centroid")
    for opq in (False, True):
        for books, book_bits in layouts:
            start = time.perf_counter()
            tables, codes = pq_codes_and_tables(db_np, q_np, books, book_bits, opq)
            metrics = evaluate_codes(tables, codes, q_labels, db_labels)
            name = f"{'OPQ+PQ' if opq else 'PQ'} {books}x{book_bits}"
            rows.append(row(name, books * book_bits, metrics, time.perf_counter() - start))

    print(f"{cfg.dataset}, {split.protocol} protocol: {len(q_labels)} queries x {len(db_labels)} database items, "
          f"features of {path}")
    print(f"{'method':<16} {'bits':>6} | {'mAP':>7} {'P@5':>7} {'P@10':>7} | {'seconds':>7}")
    for r in rows:
        print(f"{r['method']:<16} {r['bits']:>6} | {r['mAP']:>7.4f} {r['P@5']:>7.4f} {r['P@10']:>7.4f} | "
              f"{r['seconds']:>7.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": path, "dataset": cfg.dataset, "protocol": split.protocol, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
