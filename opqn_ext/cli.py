"""The ``opqn`` command line: train, eval, encode, search, index (build, add, merge, remove, info), cache,
embed and demo.

Every subcommand has ``--help``. A bad argument (K > d, a bit count that is not M * log2(K), an
unknown data set, a missing file) ends the command with one ``opqn: error: ...`` line and exit
status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from .codebooks import KINDS as CODEBOOK_KINDS
from .data import OrlDataError
from .index import IndexFileError
from .nn import ASSIGNMENTS
from .aoti_export import check_aoti, export_aoti
from .onnx_export import ExportCheck, check_onnx, export_onnx
from .train import (BACKBONES, DATASETS, PROTOCOLS, Evaluation, TrainConfig, evaluate, feature_chunks,
                    load_checkpoint, load_dataset, model_from_checkpoint, prepare_data, resolve_device, train)

_HELP = {
    "dataset": f"data set: {', '.join(DATASETS)}",
    "data_path": "image folder (root/<identity>/<image>) or feature file (.npy/.safetensors)",
    "grayscale": "read folder images as one gray channel",
    "stream": "folder: decode images batch by batch (sets larger than memory) instead of reading them all first",
    "workers": "processes decoding a folder's images (streamed: ahead of use), or threads gathering the batches "
               "of a set in memory or in a cache ahead of use; -1: none for a model on the CPU, else one per CPU, "
               "at most 8",
    "cache_dir": "folder: decode the images once into a file in this folder, which every later run and process "
                 "maps (one copy per host; a folder that changed is decoded again)",
    "protocol": "seen (queries are new images of training identities) or unseen (held-out identities)",
    "train_classes": "unseen protocol: identities used for training (0: three quarters)",
    "backbone": f"backbone: {', '.join(BACKBONES)} (mlp for feature files)",
    "width": "resnet20 base channel count (64 in the paper)",
    "num_books": "M, the number of codebooks",
    "num_words": "K, words per codebook (K <= d = feature_dim / M, K <= 256)",
    "scale": "CosFace scale (0: 20 for inputs up to 64 px, else 40)",
    "out_dir": "where checkpoint.pt and log.jsonl go",
    "device": "auto, cpu, cuda or cuda:N",
    "eval_every": "evaluate every n epochs (0: at the end only)",
    "amp": "bfloat16 autocast on CUDA",
    "cpu_amp": "bfloat16 autocast on the CPU (fast where the CPU has AVX512-BF16 or AMX; many times slower elsewhere)",
    "compile": "torch.compile the model for training (its first steps compile it; the fused ops stay in its graph)",
    "query_per_class": "queries per identity; its other items are the database",
    "split_seed": "seed of the split into training, database and query items",
    "input_size": "images are resized to input_size x input_size pixels",
    "feature_dim": "D, the feature dimension (M books of d = D / M)",
    "dropout": "dropout before the feature layer",
    "margin": "CosFace margin of the subspace-wise classification loss",
    "entropy_weight": "weight of the entropy regularizer of the soft assignments",
    "codebook_kind": "the fixed orthonormal codewords: dct (the paper's), random or hadamard (d a power of two)",
    "assignment": "learned (assignment weights trained with the model) or codeword (the codebook itself)",
    "learn_codebook": "train the codebook too (leaves orthonormality; query tables become inner products)",
    "lr": "SGD learning rate",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay",
    "lr_step": "epochs between learning-rate decays",
    "lr_gamma": "factor of each learning-rate decay",
    "warmup_epochs": "epochs of linear learning-rate warmup",
    "augment": "random crops (4-pixel padding) and horizontal flips",
    "seed": "seed of the weights, the batches and the augmentation",
    "progress": "progress bars",
}
# the configuration options whose values are one of a few names
_CHOICES = {"dataset": DATASETS, "protocol": PROTOCOLS, "backbone": BACKBONES, "codebook_kind": CODEBOOK_KINDS,
            "assignment": ASSIGNMENTS}


class CliError(Exception):
    """A user error: printed as one line."""


def _add_config_options(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    for f in dataclasses.fields(TrainConfig):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        help_text = _HELP.get(f.name, f.name.replace("_", " "))
        if f.name in ("num_books", "num_words"):  # None: not given (see --bits)
            parser.add_argument(flag, type=int, default=None, help=f"{help_text} (default: {default})")
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            shown = default if default != "" else "none"
            parser.add_argument(flag, type=type(default), default=default, choices=_CHOICES.get(f.name),
                                help=f"{help_text} (default: {shown})")
    parser.add_argument("--bits", type=int, default=None,
                        help="code length; must equal num_books * log2(num_words) (alone: 4-bit books, K = 16)")


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in given.items() if v is not None})
    if args.bits is not None:
        if args.num_books is None and args.num_words is None:
            if args.bits % 4:
                raise CliError(f"--bits {args.bits} alone means 4-bit books (K = 16); give --num-books and --num-words")
            cfg.num_books, cfg.num_words = args.bits // 4, 16
        log2k = math.log2(cfg.num_words) if cfg.num_words > 0 else float("nan")
        if not log2k.is_integer() or cfg.num_books * int(log2k) != args.bits:
            raise CliError(f"--bits {args.bits} does not equal num_books * log2(num_words) = "
                           f"{cfg.num_books} * log2({cfg.num_words})")
    try:
        cfg.validate()
    except ValueError as err:
        raise CliError(str(err)) from None
    return cfg


def format_table(evaluation: Evaluation, feature_dim: int, bits: int) -> str:
    return _metrics_table([(f"float features ({feature_dim}-d, {32 * feature_dim} bits)",
                            evaluation.float_metrics, evaluation.float_query_ms),
                           (f"OPQN codes ({bits} bits)", evaluation.code_metrics, evaluation.code_query_ms)])


def _metrics_table(rows) -> str:
    """Rows (name, RetrievalMetrics, query ms) as a table of mAP, P@5, P@10 and query time."""
    head = f"{'':38s} {'mAP':>7s} {'P@5':>7s} {'P@10':>7s} {'query ms':>9s}"
    lines = [head, "-" * len(head)]
    for name, m, ms in rows:
        lines.append(f"{name:38s} {m.map:7.4f} {m.precision_at[5]:7.4f} {m.precision_at[10]:7.4f} {ms:9.4f}")
    return "\n".join(lines)


def cmd_train(args) -> int:
    from .distributed import is_main_process

    cfg = _config_from_args(args)
    first = int(os.environ.get("RANK", "0")) == 0  # torchrun's rank: train() joins the process group later
    prepared = prepare_data(cfg, progress=cfg.progress and first)
    if first:
        print(describe_data(cfg, prepared), flush=True)
    result = train(cfg, resume=args.resume, prepared=prepared)
    if not is_main_process():
        return 0
    print(f"trained {len(result.history)} epochs in {result.seconds:.1f} s -> {Path(cfg.out_dir) / 'checkpoint.pt'}")
    if result.evaluation:
        print(format_table(result.evaluation, cfg.feature_dim, cfg.code_bits))
        _write_json(args.json, result.evaluation.summary())
    return 0


def _size_text(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def describe_data(cfg: TrainConfig, prepared) -> str:
    """One line: what the data set holds, how it is read, and the split."""
    split, inputs = prepared.split, prepared.inputs
    what = "images" if len(inputs.shape) == 4 else "feature vectors"
    if isinstance(inputs, torch.Tensor):
        size = _size_text(inputs.numel() * inputs.element_size())
        how = f"mapped from {cfg.cache_dir} ({size})" if cfg.cache_dir else f"in memory ({size})"
    else:
        how = f"streamed from their files at {inputs.shape[2]}x{inputs.shape[3]}"
    source = cfg.dataset + (f" {cfg.data_path}" if cfg.data_path else "")
    return (f"{source}: {len(prepared.labels)} {what} of {len(prepared.classes)} classes, {how}; {split.protocol} "
            f"protocol: training on {len(split.train)} items of {prepared.num_train_classes} classes, "
            f"{len(split.database)} database items, {len(split.query)} queries")


def _on_device(model, args):
    """The model moved to ``--device`` (auto: a GPU where there is one)."""
    try:
        return model.to(resolve_device(args.device))
    except (RuntimeError, ValueError) as err:
        raise CliError(f"--device {args.device}: {err}") from None


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _checkpoint_model(args):
    """(checkpoint, its model on ``--device``, its training configuration)."""
    ckpt = load_checkpoint(args.checkpoint)
    model, cfg = model_from_checkpoint(ckpt)
    return ckpt, _on_device(model, args), cfg


def _checkpoint_config(args):
    """(the checkpoint's model on ``--device``, its training configuration with the data options
    of ``args`` applied)."""
    ckpt, model, cfg = _checkpoint_model(args)
    for name in ("dataset", "data_path", "protocol", "stream", "workers", "cache_dir"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, value)
    # how training read its folder, unless this run reads other data or says otherwise
    stream, cache_dir = getattr(args, "stream", None), getattr(args, "cache_dir", None)
    if stream is None and (cfg.dataset != "folder" or cache_dir):
        cfg.stream = False
    if cache_dir is None and (cfg.dataset != "folder" or stream is not None):
        cfg.cache_dir = ""
    cfg.grayscale = ckpt["input_shape"][0] == 1
    try:
        cfg.validate()
    except ValueError as err:
        raise CliError(str(err)) from None
    return model, cfg


def _checkpoint_and_data(args):
    model, cfg = _checkpoint_config(args)
    return model, cfg, prepare_data(cfg, progress=True)  # a bar on terminals while a folder is read


def _require_matplotlib(option: str) -> None:
    """Refuses ``option`` up front where matplotlib, which draws the figures, is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError(f"{option} draws with matplotlib, which is not installed: pip install 'opqn-ext[demo]' "
                       f"(or matplotlib)") from None


def cmd_eval(args) -> int:
    if args.pr_curve:
        _require_matplotlib("--pr-curve")
    if args.index:
        return _eval_index(args)
    if args.part is not None:
        raise CliError("--part chooses the queries that --index is evaluated with")
    model, cfg, prepared = _checkpoint_and_data(args)
    device = _device_of(model)
    evaluation = evaluate(model, prepared, device, cfg.loader_workers(device))
    what = f"{cfg.dataset}, {prepared.split.protocol} protocol"
    print(f"{what}: {len(prepared.split.query)} queries, {len(prepared.split.database)} database items")
    print(format_table(evaluation, cfg.feature_dim, cfg.code_bits))
    summary = evaluation.summary()
    summary["float"]["pr_curve"] = evaluation.float_metrics.pr_curve()
    summary["opqn"]["pr_curve"] = evaluation.code_metrics.pr_curve()
    _write_json(args.json, summary)
    _write_pr_curves(args.pr_curve, {"float features": evaluation.float_metrics,
                                     f"OPQN {cfg.code_bits}-bit": evaluation.code_metrics}, what)
    return 0


def _write_pr_curves(path, curves: dict, title: str) -> None:
    """``--pr-curve``: the precision-recall curves (label -> metrics) drawn into ``path`` (if given)."""
    if path:
        from .plots import save_pr_curves

        print(f"wrote {save_pr_curves(curves, path, title)}")


def _eval_index(args) -> int:
    """The items of a data set (its queries by default) as queries against an index: relevant are
    the index's items of the query's identity (by name); queries of identities the index holds no
    item of are left out."""
    from .metrics import evaluate_codes

    part = args.part or "query"
    if part == "all":  # no split: a probe set may hold identities of one or two images
        model, cfg = _checkpoint_config(args)
        inputs, labels, classes = load_dataset(cfg, progress=True)
        idx = torch.arange(len(labels))
    else:
        model, cfg, prepared = _checkpoint_and_data(args)
        inputs, labels, classes, idx = prepared.inputs, prepared.labels, prepared.classes, _part(prepared, part)
    index = _load_index(args.index, device=_device_of(model))
    _check_same_model(index, model, args.index)
    label_of = {name: i for i, name in enumerate(index.settings.get("classes", []))}
    query_labels = torch.tensor([label_of.get(classes[lab], -1) for lab in labels[idx].tolist()], dtype=torch.int64)
    kept = torch.isin(query_labels, index.labels[index.labels >= 0])
    if not bool(kept.any()):
        raise CliError(f"none of the {len(idx)} queries is of an identity that {args.index} holds items of")
    luts = torch.cat([index.query_lut(features).cpu() for _, features in _feature_chunks(model, cfg, inputs, idx[kept])])
    metrics = evaluate_codes(luts, index.codes, query_labels[kept], index.labels)
    start = time.perf_counter()
    index.search_luts(luts, min(10, len(index)))
    ms = (time.perf_counter() - start) * 1e3 / len(luts)  # per query, top-10, as `opqn eval` times codes
    left_out = len(idx) - int(kept.sum())
    print(f"{cfg.dataset} ({part}): {metrics.num_queries} queries against {args.index} ({len(index)} items)"
          + (f"; {_count(left_out, 'query', 'queries')} of identities without items there left out" if left_out else ""))
    print(_metrics_table([(f"OPQN codes ({index.code_bits} bits)", metrics, ms)]))
    _write_json(args.json, {"opqn": metrics.summary() | {"query_ms": ms, "pr_curve": metrics.pr_curve()},
                            "left_out": left_out})
    _write_pr_curves(args.pr_curve, {f"OPQN {index.code_bits}-bit": metrics},
                     f"{cfg.dataset} ({part}) against {Path(args.index).name}")
    return 0


def _feature_chunks(model, cfg: TrainConfig, inputs, idx: torch.Tensor):
    """(items, their features on the CPU) a chunk at a time, computed where the model is."""
    device = _device_of(model)
    return feature_chunks(model, inputs, device, idx, workers=cfg.loader_workers(device))


def _part(prepared, part: str) -> torch.Tensor:
    split = prepared.split
    return {"database": split.database, "query": split.query, "all": torch.arange(len(prepared.labels))}[part]


def _naming(cfg: TrainConfig, classes, count: int) -> dict:
    """What an index or code file keeps so that searches can name (and show) the items they find
    (:mod:`~opqn_ext.item_sources`): the data set's identity names and, for an image folder or a
    built-in data set of ``count`` images, the data set as the source of items 0, 1, ..."""
    from .item_sources import dataset_source, folder_source

    if cfg.dataset == "folder":
        sources = [folder_source(cfg.data_path)]
    else:
        sources = [] if cfg.dataset == "features" else [dataset_source(cfg.dataset, count)]
    return {"classes": list(classes), "sources": sources}


def cmd_encode(args) -> int:
    from .safetensors_files import save_file

    model, cfg, prepared = _checkpoint_and_data(args)
    idx = _part(prepared, args.part)
    chunks = _feature_chunks(model, cfg, prepared.inputs, idx)
    codes = torch.cat([model.head.encode(features.to(_device_of(model))).cpu() for _, features in chunks])
    meta = {"num_books": str(model.head.num_books), "num_words": str(model.head.num_words),
            "dataset": cfg.dataset, "part": args.part, "model": _model_fingerprint(model.head.assignment_weight, model.head.codebook),
            "checkpoint": str(Path(args.checkpoint).resolve())}
    meta |= {k: json.dumps(v) for k, v in _naming(cfg, prepared.classes, len(prepared.labels)).items()}
    save_file({"codes": codes.contiguous(), "labels": prepared.labels[idx].contiguous(), "items": idx.contiguous()},
              args.output, metadata=meta)
    print(f"encoded {len(idx)} items into {codes.shape[1]} x {model.head.num_words}-word codes "
          f"({cfg.code_bits} bits) -> {args.output}")
    return 0


def _model_fingerprint(assign_weight: torch.Tensor, codebook: torch.Tensor) -> str:
    """sha256 (hex) of what makes codes: the assignment weights and codebook (float32)."""
    digest = hashlib.sha256()
    for weights in (assign_weight, codebook):
        digest.update(weights.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _refuse_another_model(path, fingerprint: str, built: str | None, head) -> None:
    """Refuses codes (of an index or code file ``path``) that another model made: they would not
    compare with this model's queries."""
    if fingerprint != _model_fingerprint(head.assignment_weight, head.codebook):
        raise CliError(f"{path} holds the codes of another model{f' ({built})' if built else ''}: its assignment "
                       f"weights or codebook differ from this checkpoint's, so their codes do not compare")


def _index_from_code_file(path: str, model):
    """An OPQNIndex holding the codes of a file written by `opqn encode` (ids = data set items)."""
    from safetensors import safe_open

    from .index import OPQNIndex

    if not Path(path).exists():
        raise CliError(f"code file {path} does not exist (write one with `opqn encode`)")
    with safe_open(path, framework="pt") as f:
        codes, labels, items = f.get_tensor("codes"), f.get_tensor("labels"), f.get_tensor("items")
        meta = f.metadata() or {}
    if codes.shape[1] != model.head.num_books:
        raise CliError(f"{path} has {codes.shape[1]} books but the model has {model.head.num_books}")
    if "model" in meta:
        _refuse_another_model(path, meta["model"], meta.get("checkpoint"), model.head)
    naming = {k: json.loads(meta[k]) for k in ("classes", "sources") if k in meta}
    index = OPQNIndex.from_head(model.head, settings=naming)
    index.add_codes(codes, ids=items, labels=labels)
    return index


def _checkpoint_only(args, option: str, what: str):
    """The model, its training configuration and input shape, for ``what`` named on the command line
    by ``option`` (no data set)."""
    for flag in ("--dataset", "--data-path", "--protocol", "--part", "--stream", "--cache-dir"):
        if getattr(args, flag[2:].replace("-", "_"), None) is not None:
            raise CliError(f"{option} names the {what}: {flag} does not apply")
    ckpt, model, cfg = _checkpoint_model(args)
    if args.workers is not None:
        cfg.workers = args.workers
    return model, cfg, ckpt["input_shape"]


def _files_inputs(args, option: str, what: str):
    """(model, configuration, a name per input, the inputs) of the files named by ``option``."""
    from .input_files import input_paths, inputs_of

    model, cfg, input_shape = _checkpoint_only(args, option, what)
    features = len(input_shape) == 1
    try:
        names, inputs = inputs_of(input_paths(getattr(args, option[2:]), features, option), cfg.dataset, input_shape,
                                  option)
    except ValueError as err:
        raise CliError(str(err)) from None
    return model, cfg, names, inputs


def _check_same_model(index, model, path) -> None:
    """Refuses an index whose codes another model made: they would not compare with this model's."""
    head = model.head
    if (index.num_books, index.dim, index.num_words) != (head.num_books, head.dim, head.num_words):
        raise CliError(f"{path} holds M={index.num_books}, d={index.dim}, K={index.num_words} codes; the "
                       f"model makes M={head.num_books}, d={head.dim}, K={head.num_words}")
    _refuse_another_model(path, _model_fingerprint(index.assign_weight, index.codebook),
                          index.settings.get("checkpoint"), head)


def _result_names(index, ids: torch.Tensor):
    """(the identity of each found item, its image file: each None where the index cannot name it;
    why the files of some items cannot be named)."""
    from .item_sources import identity_names, item_files

    names = identity_names(index.settings.get("classes", []), index.labels_of(ids))
    files, why = item_files(index.settings.get("sources", []), ids)
    return names, files, why


MONTAGE_RESULTS = 10  # results per query that `opqn search --montage` draws, at most


def _caption(name: str | None, fallback: str) -> str:
    return (fallback if name is None else name)[:16]


def _search_montage(args, cfg: TrainConfig, index, prepared, idx: torch.Tensor, query_names, results) -> Path:
    """``opqn search --montage``: the shown queries and their first results as a grid of images."""
    from .item_images import image_file, item_images
    from .plots import save_montage

    shown = results[: args.show]
    queries = idx[: len(shown)]
    if prepared is None:
        query_images: list[torch.Tensor | None] = [image_file(query_names[q]) for q in queries.tolist()]
        query_identities: list[str | None] = [None] * len(shown)
        query_captions = [f"query\n{_caption(Path(query_names[q]).name, '')}" for q in queries.tolist()]
        why: list[str] = []
    else:  # the data set's items: shown from the data set's own source
        own_sources = _naming(cfg, prepared.classes, len(prepared.labels))["sources"]
        images, why = item_images(own_sources, queries[:, None])
        query_images = [row[0] for row in images]
        query_identities = [prepared.classes[r["query_label"]] for r in shown]
        query_captions = [f"query\n{_caption(name, '')}" for name in query_identities]
    found = [r["results"][:MONTAGE_RESULTS] for r in shown]
    width = max([len(row) for row in found], default=0)
    padded = torch.tensor([[x["item"] for x in row] + [-1] * (width - len(row)) for row in found],
                          dtype=torch.int64).reshape(len(found), width)  # -1: an id no source names
    result_images, result_why = item_images(index.settings.get("sources", []), padded)
    correct = [[None if known is None or "identity" not in x else x["identity"] == known for x in row]
               for known, row in zip(query_identities, found)]
    captions = [[f"#{j + 1} {x['score']:.3f}\n{_caption(x.get('identity'), 'id ' + str(x['item']))}"
                 for j, x in enumerate(row)] for row in found]
    for reason in dict.fromkeys(why + result_why):
        print(f"(--montage: {reason})")
    return save_montage(query_images, [row[: len(hits)] for row, hits in zip(result_images, found)], correct,
                        args.montage, (f"items scoring at least {args.min_score}" if args.all else
                                       f"top-{min(args.k, MONTAGE_RESULTS)}") + f" by {index.code_bits}-bit OPQN codes",
                        captions, query_captions)


def _identity_items(index, names) -> torch.Tensor:
    """The ids of the items of the identities ``names``, which the index must know."""
    classes = index.settings.get("classes", [])
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise CliError(f"--identities: the index holds no identity {', '.join(unknown)}")
    labels = torch.tensor([classes.index(name) for name in names], dtype=torch.int64)
    return index.ids[torch.isin(index.labels, labels)]


def cmd_search(args) -> int:
    from .index import OPQNIndex

    if args.montage:
        _require_matplotlib("--montage")
        if args.show < 1:
            raise CliError(f"--montage draws the first --show queries: --show must be >= 1, got {args.show}")
    if args.query:
        model, cfg, query_names, inputs = _files_inputs(args, "--query", "queries")
        prepared, idx = None, torch.arange(len(query_names))
    else:
        model, cfg, prepared = _checkpoint_and_data(args)
        inputs, idx, query_names = prepared.inputs, _part(prepared, args.part or "query"), []
    if args.montage and cfg.dataset == "features":
        raise CliError("--montage draws images; this model takes feature vectors")
    if args.index:
        index = OPQNIndex.load(args.index, mmap=True, device=_device_of(model))
        _check_same_model(index, model, args.index)
    else:
        index = _index_from_code_file(args.codes, model)
    if args.identities:  # the index of their items, made once for every chunk of queries
        index = index.restricted(_identity_items(index, args.identities))
    scanned = len(index)
    if args.min_score is not None and math.isnan(args.min_score):
        raise CliError("--min-score must be a number, got nan")
    if args.all and args.min_score is None:
        raise CliError("--all returns every item scoring at least --min-score: give --min-score")
    if args.all and args.fast_scan:
        raise CliError("--all scans every code exactly: --fast-scan does not apply")
    if not args.all and args.k < 1:
        raise CliError(f"-k must be >= 1, got {args.k}")
    if args.fast_scan and index.num_words > 16:
        raise CliError(f"--fast-scan scans 4-bit codes (K <= 16); these codes have K={index.num_words}")
    if args.rerank < 1:
        raise CliError(f"--rerank must be >= 1, got {args.rerank}")
    found_scores, found_ids, ms = [], [], 0.0  # per query: [n] each
    for _, features in _feature_chunks(model, cfg, inputs, idx):
        start = time.perf_counter()
        if args.all:
            lims, scores, ids = index.range_search(features, args.min_score)
            counts = lims.diff().tolist()
            found_scores += scores.split(counts)
            found_ids += ids.split(counts)
        else:
            scores, ids = index.search(features, args.k, fast_scan=args.fast_scan, rerank=args.rerank)
            found_scores += list(scores[:, :scanned])  # -k beyond the codes: every code, no padding
            found_ids += list(ids[:, :scanned])
        ms += (time.perf_counter() - start) * 1e3
    every_id = torch.cat(found_ids) if found_ids else torch.zeros(0, dtype=torch.int64)  # all queries' results
    labels = index.labels_of(every_id).tolist()
    names, files, why_no_files = _result_names(index, every_id[None])
    results, at = [], 0
    for q, scores, ids in zip(idx.tolist(), found_scores, found_ids):
        query = {"query": query_names[q]} if prepared is None else {"query_item": q,
                                                                    "query_label": int(prepared.labels[q])}
        found = []
        for j, (score, item) in enumerate(zip(scores.tolist(), ids.tolist()), start=at):
            entry = {"item": item, "label": labels[j], "score": score}
            found.append(entry | ({"identity": names[0][j]} if names[0][j] is not None else {})
                         | ({"file": files[0][j]} if files[0][j] is not None else {}))
        at += len(ids)
        if args.min_score is not None:  # open set: a query may match no one
            found = [entry for entry in found if entry["score"] >= args.min_score]
        results.append(query | {"results": found})
    for r in results[: args.show]:
        shown = ", ".join(f"{x['item']}({x.get('identity', x['label'])})" + (f" {x['file']}" if "file" in x else "")
                          + f" {x['score']:.3f}" for x in r["results"]) or f"no item scores {args.min_score} or more"
        what = r["query"] if prepared is None else f"{r['query_item']} (label {r['query_label']})"
        print(f"query {what}: {shown}")
    for why in why_no_files:
        print(f"(database items without their image files: {why})")
    what = f"every item scoring at least {args.min_score}" if args.all else f"top-{args.k}"
    print(f"{len(idx)} queries x {scanned} codes, {what} in {ms:.2f} ms")
    _write_json(args.json, results)
    if args.montage:
        print(f"wrote {_search_montage(args, cfg, index, prepared, idx, query_names, results)}")
    return 0


def _changing_index(path):
    """The lock of the index ``path`` (on ``.<name>.lock`` beside it) for a load-change-save: two
    commands adding at once would each save the index without the other's items."""
    from .file_lock import exclusive_lock

    lock = Path(path).with_name(f".{Path(path).name}.lock")
    return exclusive_lock(lock, f"another opqn command changing {path}", progress=True)


def cmd_index_build(args) -> int:
    from .index import OPQNIndex

    model, cfg, prepared = _checkpoint_and_data(args)
    idx = _part(prepared, args.part)
    settings = {"config": dataclasses.asdict(cfg), "checkpoint": str(Path(args.checkpoint).resolve())}
    index = OPQNIndex.from_head(model.head, settings=settings | _naming(cfg, prepared.classes, len(prepared.labels)))
    for part, features in _feature_chunks(model, cfg, prepared.inputs, idx):  # bounded memory: features of one chunk
        index.add(features, ids=part, labels=prepared.labels[part])
    with _changing_index(args.output):
        index.save(args.output)
    print(f"indexed {len(index)} items of {cfg.dataset} ({args.part}) as {cfg.code_bits}-bit codes -> {args.output}")
    return 0


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _id_span(start: int, end: int) -> str:
    """The ids ``start`` to ``end - 1`` in words."""
    return f"id {start}" if end == start + 1 else f"ids {start}-{end - 1}"


def _load_index(path, **kwargs):
    from .index import OPQNIndex, shard_files

    if not Path(path).exists():
        shards = shard_files(path)
        if shards:
            raise CliError(f"index {path} does not exist, but the shard files of {len(shards)} ranks do: make one "
                           f"index of them with `opqn index merge {path}.shard*-of-{len(shards):05d} -o {path}`")
        raise CliError(f"index {path} does not exist (build one with `opqn index build`)")
    return OPQNIndex.load(path, **kwargs)


def _refuse_repeats(index, sources) -> None:
    """Refuses to add the items of ``sources`` that the index holds already (the same folder
    unchanged, the same built-in data set, files named before)."""
    from .item_sources import repeated_items

    for source in sources:
        repeated = repeated_items(index.settings.get("sources", []), source, index.contains)
        if repeated:
            raise CliError(f"{repeated}: adding them again would hold each twice (remove them first with "
                           f"`opqn index remove --ids`)")


def cmd_index_add(args) -> int:
    from .item_sources import files_source, merged_classes, next_free_id

    if args.files:
        model, cfg, names, inputs = _files_inputs(args, "--files", "items to add")
        classes = [] if args.identity is None else [args.identity]
        labels = torch.full((len(names),), -1 if args.identity is None else 0, dtype=torch.int64)
        naming = {"classes": classes, "sources": [files_source(names, 0)]}
        what = _count(len(names), "feature row" if cfg.dataset == "features" else "image")
    else:
        if args.identity is not None:
            raise CliError("--identity names the identity of --files; a data set's items have their own")
        model, cfg = _checkpoint_config(args)
        inputs, labels, classes = load_dataset(cfg, progress=True)
        naming = _naming(cfg, classes, len(labels))
        what = f"{len(labels)} items of {cfg.dataset}" + (f" {cfg.data_path}" if cfg.data_path else "")
    before = _load_index(args.index, verify=False)
    _check_same_model(before, model, args.index)
    _refuse_repeats(before, naming["sources"])  # before encoding; again under the lock
    codes = torch.cat([model.head.encode(features.to(_device_of(model))).cpu()
                       for _, features in _feature_chunks(model, cfg, inputs, torch.arange(len(labels)))])
    with _changing_index(args.index):  # from here to the save: no other command changes the index
        index = _load_index(args.index)
        _check_same_model(index, model, args.index)
        _refuse_repeats(index, naming["sources"])
        first = next_free_id(index.ids, index.settings)
        index.settings["classes"], to_index_label = merged_classes(index.settings.get("classes", []), naming["classes"])
        index.add_codes(codes, ids=torch.arange(first, first + len(codes)), labels=to_index_label(labels))
        index.settings["sources"] = index.settings.get("sources", []) + [s | {"first_id": first}
                                                                         for s in naming["sources"]]
        index.save(args.index)
    print(f"added {what} ({_id_span(first, first + len(codes))}) -> {args.index}: {_count(len(index), 'item')}, "
          f"{_count(len(index.settings['classes']), 'identity', 'identities')}")
    return 0


def _merged_labels(merged, part, path) -> torch.Tensor:
    """The labels of ``part``'s items in ``merged``, whose identity names (``classes``) it extends:
    an identity both know keeps ``merged``'s label. Indexes that name no identities keep their
    label numbers; one that names them and one that does not cannot be matched."""
    from .item_sources import merged_classes

    mine, theirs = merged.settings.get("classes"), part.settings.get("classes")
    if mine is None and theirs is None:
        return part.labels
    if mine is None or theirs is None:
        raise CliError(f"{path}: one index names its identities and the other does not, so their labels cannot "
                       f"be matched")
    if bool((part.labels >= len(theirs)).any()):
        raise CliError(f"{path}: labels {len(theirs)} and above have no identity name")
    merged.settings["classes"], to_merged = merged_classes(mine, theirs)
    return to_merged(part.labels)


def _merged_sources(merged, part, path, shift: int) -> None:
    """Adds ``part``'s item sources to ``merged``'s, their ids moved by ``shift``; a source ``merged``
    has already (shards of one index, builds of one data set's parts) is kept once. Sources whose
    ids overlap would name each other's items: refused."""
    from .item_sources import source_end

    sources = merged.settings.setdefault("sources", [])
    for source in part.settings.get("sources", []):
        source = source | {"first_id": source["first_id"] + shift}
        if source in sources:
            continue
        for other in sources:
            if source["first_id"] < source_end(other) and other["first_id"] < source_end(source):
                raise CliError(f"{path}: its items of ids {source['first_id']}-{source_end(source) - 1} come from "
                               f"another source than those of ids {other['first_id']}-{source_end(other) - 1} before "
                               f"it; --renumber gives each index's items ids after those before it")
        sources.append(source)


def cmd_index_merge(args) -> int:
    from .index import OPQNIndex
    from .item_sources import next_free_id

    with _changing_index(args.output):
        parts = [(path, _load_index(path, verify=args.verify)) for path in args.indexes]
        first = parts[0][1]
        merged = OPQNIndex(first.assign_weight, first.codebook, first.query_scale, copy.deepcopy(first.settings),
                           first.orthonormal)
        merged.merge_from(first)
        for path, part in parts[1:]:
            why = merged.model_mismatch(part)
            if why:
                raise CliError(f"{path} cannot be merged with {args.indexes[0]}: {why}")
            starts = [int(part.ids[0])] if len(part) else []
            starts += [source["first_id"] for source in part.settings.get("sources", [])]
            shift = next_free_id(merged.ids, merged.settings) - min(starts) if args.renumber and starts else 0
            ids = part.ids + shift
            clash = merged.contains(ids)
            if bool(clash.any()):
                raise CliError(f"{path} holds ids that the indexes before it hold too "
                               f"({', '.join(map(str, ids[clash][:5].tolist()))}"
                               f"{', ...' if int(clash.sum()) > 5 else ''}); --renumber gives each index's items "
                               f"ids after those before it")
            part.labels = _merged_labels(merged, part, path)
            _merged_sources(merged, part, path, shift)
            merged.merge_from(part, id_offset=shift)
            if shift and len(part):
                print(f"{path}: {_id_span(int(part.ids[0]), int(part.ids[-1]) + 1)} -> "
                      f"{_id_span(int(part.ids[0]) + shift, int(part.ids[-1]) + 1 + shift)}")
        merged.save(args.output)
    identities = len(torch.unique(merged.labels[merged.labels >= 0]))
    print(f"merged {_count(len(parts), 'index', 'indexes')} -> {args.output}: {_count(len(merged), 'item')}, "
          f"{_count(identities, 'identity', 'identities')}")
    return 0


def cmd_index_remove(args) -> int:
    if not args.ids and not args.identity:
        raise CliError("name the items to remove: --ids or --identity")
    with _changing_index(args.index):
        index = _load_index(args.index)
        ids = torch.tensor(args.ids or [], dtype=torch.int64)
        if args.identity:
            classes = index.settings.get("classes", [])
            unknown = [name for name in args.identity if name not in classes]
            if unknown:
                raise CliError(f"--identity: {', '.join(unknown)} not in {args.index}")
            labels = torch.tensor([classes.index(name) for name in args.identity])
            ids = torch.cat([ids, index.ids[torch.isin(index.labels, labels)]])
        removed = index.remove(ids)
        if removed:
            index.save(args.index)
    print(f"removed {_count(removed, 'item')} from {args.index}: {len(index)} left")
    return 0


def cmd_index_info(args) -> int:
    from .item_sources import folder_paths, source_end

    index = _load_index(args.index, verify=args.verify)
    bits = index.code_bits
    info = {"items": len(index), "bits": bits, "num_books": index.num_books, "dim": index.dim,
            "num_words": index.num_words, "orthonormal": index.orthonormal, "bytes": Path(args.index).stat().st_size,
            "ids": [int(index.ids[0]), int(index.ids[-1])] if len(index) else None,
            "identities": len(torch.unique(index.labels[index.labels >= 0])),
            "unlabeled": int((index.labels < 0).sum()), "checkpoint": index.settings.get("checkpoint"), "sources": []}
    if args.identities:
        labels, counts = torch.unique(index.labels[index.labels >= 0], return_counts=True)
        classes = index.settings.get("classes", [])
        info["items_per_identity"] = {classes[lab] if lab < len(classes) else f"label {lab}": count
                                      for lab, count in zip(labels.tolist(), counts.tolist())}
    for source in index.settings.get("sources", []):
        entry = {"first_id": source["first_id"], "end_id": source_end(source)}
        if "files" in source:
            entry |= {"files": len(source["files"])}
        elif "dataset" in source:
            entry |= {"dataset": source["dataset"], "images": source["count"]}
        else:
            entry |= {"folder": source["root"], "images": source["count"], "unnamed": folder_paths(source)[1] or None}
        info["sources"].append(entry)
    codebook = "" if index.orthonormal else ", a codebook learned away from orthonormality"
    print(f"{args.index}: {_count(len(index), 'item')}, {bits}-bit codes (M={index.num_books} books of "
          f"K={index.num_words} words, d={index.dim}{codebook}), {_size_text(info['bytes'])}")
    if len(index):
        print(f"ids from {info['ids'][0]} to {info['ids'][1]}; {_count(info['identities'], 'identity', 'identities')}"
              + (f", {_count(info['unlabeled'], 'item')} without one" if info["unlabeled"] else ""))
    if info["checkpoint"]:
        print(f"built with {info['checkpoint']}")
    for entry in info["sources"]:
        span = _id_span(entry["first_id"], entry["end_id"])
        if "files" in entry:
            print(f"source: {_count(entry['files'], 'file')} ({span})")
        elif "dataset" in entry:
            print(f"source: data set {entry['dataset']} ({_count(entry['images'], 'image')}, {span})")
        else:
            unnamed = f"; not named: {entry['unnamed']}" if entry["unnamed"] else ""
            print(f"source: folder {entry['folder']} ({_count(entry['images'], 'image')}, {span}{unnamed})")
    for name, count in info.get("items_per_identity", {}).items():
        print(f"identity {name}: {_count(count, 'item')}")
    _write_json(args.json, info)
    return 0


def cmd_export(args) -> int:
    suffix = Path(args.output).suffix
    if suffix not in (".onnx", ".pt2"):
        raise CliError(f"-o must name an .onnx file (an ONNX graph) or a .pt2 file (an AOTInductor package), "
                       f"got {args.output}")
    ckpt = load_checkpoint(args.checkpoint)
    model, cfg = model_from_checkpoint(ckpt)
    shape = tuple(ckpt["input_shape"])
    check: ExportCheck | None  # None: not checked (ONNX without onnxruntime)
    if suffix == ".pt2":
        export_aoti(model, shape, args.output)
        check, checker = check_aoti(model, shape, args.output), "torch._inductor.aoti_load_package"
    else:
        try:
            export_onnx(model, shape, args.output)
        except ImportError as err:
            raise CliError(str(err)) from None
        check, checker = check_onnx(model, shape, args.output), "ONNX Runtime"
    head = model.head
    inputs = f"images [B, {', '.join(map(str, shape))}] uint8" if len(shape) == 3 else f"features [B, {shape[0]}] float32"
    print(f"exported {inputs} -> codes [B, {head.num_books}] uint8 ({cfg.code_bits}-bit database codes), "
          f"tables [B, {head.num_books}, {head.num_words}] float32 (query tables) -> {args.output} "
          f"({_size_text(Path(args.output).stat().st_size)})")
    if check is None:
        print("not checked: onnxruntime is not installed")
    else:
        total = check.rows * head.num_books
        print(f"checked with {checker} on {check.rows} random inputs: {total - check.codes_differing} of {total} "
              f"codes equal the model's, tables within {check.table_error:.1e}")
    return 0


def cmd_embed(args) -> int:
    from .data import load_orl, save_features
    from .data.face_embeddings import embed_faces, embed_image_folder

    if args.dataset == "folder" and not args.data_path:
        raise CliError("--dataset folder needs --data-path root/<identity>/<image>")
    start = time.perf_counter()
    if args.dataset == "orl":
        feats = embed_faces(load_orl(), progress=args.progress)
    else:  # one image at a time, each at its own size
        feats = embed_image_folder(args.data_path, progress=args.progress)
    save_features(args.output, feats.features, feats.labels, feats.classes)
    print(f"embedded {len(feats)} images ({len(feats.classes)} identities) into 128-d dlib descriptors in "
          f"{time.perf_counter() - start:.0f} s -> {args.output}")
    return 0


def cmd_cache(args) -> int:
    from .data import scan_image_folder
    from .data.decoded_cache import cache_files, decoded_images

    if args.input_size < 1:
        raise CliError(f"--input-size must be >= 1, got {args.input_size}")
    if args.workers < -1:
        raise CliError(f"--workers must be >= 0, or -1 for one per CPU, got {args.workers}")
    size = (args.input_size, args.input_size)
    workers = TrainConfig(workers=args.workers).loader_workers()
    start = time.perf_counter()
    paths, _, classes = scan_image_folder(args.data_path)
    images, decoded = decoded_images(args.data_path, paths, size, args.grayscale, args.cache_dir, workers,
                                     args.progress)
    file, _ = cache_files(args.cache_dir, args.data_path, size, args.grayscale)
    what = (f"{len(images)} images of {len(classes)} classes at {args.input_size}x{args.input_size} "
            f"({_size_text(images.numel())})")
    done = f"decoded into {file}" if decoded else f"already in {file}, which matches the folder"
    print(f"{args.data_path}: {what} {done} ({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    _require_matplotlib("opqn demo")  # its figures come after minutes of training
    run_demo(out_dir=Path(args.out_dir), epochs=args.epochs, width=args.width, unseen=args.unseen,
             progress=args.progress, seed=args.seed)
    return 0


def _write_json(path, obj) -> None:
    if path:
        Path(path).write_text(json.dumps(obj, indent=2))


def _checkpoint_parser(subparsers, name: str, help_text: str, split: bool = True) -> argparse.ArgumentParser:
    """A subcommand taking a trained checkpoint and, optionally, other data than it was trained on
    (``split``: split by a protocol)."""
    q = subparsers.add_parser(name, help=help_text, description=help_text)
    q.add_argument("checkpoint", help="checkpoint.pt or the run folder holding it")
    q.add_argument("--dataset", choices=DATASETS, help="data set (default: the training one)")
    q.add_argument("--data-path", dest="data_path", help="image folder or feature file")
    if split:
        q.add_argument("--protocol", choices=PROTOCOLS, help="split protocol (default: the training one)")
    q.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help=f"{_HELP['stream']} (default: as in training)")
    q.add_argument("--workers", type=int, help=f"{_HELP['workers']} (default: as in training)")
    q.add_argument("--cache-dir", dest="cache_dir", help=f"{_HELP['cache_dir']} (default: as in training; '': none)")
    q.add_argument("--device", default="auto", help="where the model runs, and the index scans: auto (a GPU where "
                   "there is one), cpu, cuda or cuda:N")
    return q


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opqn", description="Orthonormal Product Quantization Networks: "
                                     "train, evaluate and search compact face codes.")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{train,eval,encode,search,index,export,cache,embed,demo}")
    defaults = TrainConfig()

    p = sub.add_parser("train", help="train an OPQN model", description="Train OPQN (DESIGN.md section 1 defaults).")
    _add_config_options(p, defaults)
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    p.add_argument("--json", help="write the final evaluation here")
    p.set_defaults(func=cmd_train)

    p = _checkpoint_parser(sub, "eval", "evaluate a trained model: float features vs OPQN codes; or a data set's "
                           "items as queries against an index (--index)")
    p.add_argument("--index", help="an index file: the data set's items (--part) are the queries, the index the "
                   "database; relevant items are those of the query's identity (by name)")
    p.add_argument("--part", choices=("database", "query", "all"), help="--index: which items are queries "
                   "(default: query; all: every item, without a split)")
    p.add_argument("--json", help="write the metrics here (with each precision-recall curve's points)")
    p.add_argument("--pr-curve", dest="pr_curve", metavar="PNG", help="draw the precision-recall curves here")
    p.set_defaults(func=cmd_eval)

    p = _checkpoint_parser(sub, "encode", "encode data into OPQN codes (a .safetensors file)")
    p.add_argument("--output", "-o", required=True, help="output .safetensors (codes, labels, items)")
    p.add_argument("--part", choices=("database", "query", "all"), default="database")
    p.set_defaults(func=cmd_encode)

    p = _checkpoint_parser(sub, "search", "search an index (or a code file) with query images or features")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--index", help="an index file from `opqn index build` / `add` (memory-mapped)")
    source.add_argument("--codes", help="a code file from `opqn encode`")
    p.add_argument("-k", type=int, default=10, help="results per query (at most every code searched)")
    p.add_argument("--fast-scan", action="store_true", help="K <= 16: the 4-bit scan (tables of bytes looked up in "
                   "registers, --rerank x k candidates re-scored exactly; on CUDA an exact scan of 4-bit codes)")
    p.add_argument("--rerank", type=int, default=2, help="--fast-scan: candidates re-scored per result (default 2)")
    p.add_argument("--min-score", dest="min_score", type=float, help="only results scoring at least this (of the top "
                   "k): a query of someone the index does not hold may get none (scores are sums over the M books "
                   "of probabilities, in [0, M] for an orthonormal codebook)")
    p.add_argument("--all", action="store_true", help="with --min-score: every item scoring at least it, however "
                   "many (a range search), instead of the top k")
    p.add_argument("--part", choices=("database", "query", "all"), help="which items of the data set are queries "
                   "(default: query)")
    p.add_argument("--query", nargs="+", metavar="PATH", help="query images, or folders of them (any layout, no "
                   "identities needed), or for a model on features, feature files; instead of a data set's queries")
    p.add_argument("--identities", nargs="+", metavar="NAME", help="search only among the items of these "
                   "identities (is the probe one of these people, and which photo?)")
    p.add_argument("--show", type=int, default=5, help="queries to print (and to draw with --montage)")
    p.add_argument("--montage", metavar="PNG", help=f"draw the first --show queries and their first "
                   f"{MONTAGE_RESULTS} results here (image, rank, score, identity; framed green or red where the "
                   "query's identity is known), the images read from the files, folders or data sets the index "
                   "names")
    p.add_argument("--json", help="write every query's results here")
    p.set_defaults(func=cmd_search)

    index = sub.add_parser("index", help="build, grow, shrink, merge and describe OPQN index files",
                           description="Build, grow, shrink, merge and describe OPQN index files.")
    index_sub = index.add_subparsers(dest="index_command", required=True, metavar="{build,add,merge,remove,info}")
    p = _checkpoint_parser(index_sub, "build", "encode a data set with a trained model into an OPQN index file")
    p.add_argument("--part", choices=("database", "query", "all"), default="database", help="which items to index")
    p.add_argument("--output", "-o", required=True, help="the index file to write")
    p.set_defaults(func=cmd_index_build)

    p = _checkpoint_parser(index_sub, "add", "encode more items with the index's model and add them to the index "
                           "(every item of a data set, or image files)", split=False)
    p.add_argument("--index", required=True, help="the index file to grow (rewritten in place, atomically)")
    p.add_argument("--files", nargs="+", metavar="PATH", help="image files, or folders of them (any layout), or for "
                   "a model on features, feature files (a row per item); instead of a data set")
    p.add_argument("--identity", help="--files: the identity they show (new, or one the index knows); default: none")
    p.set_defaults(func=cmd_index_add)

    p = index_sub.add_parser("merge", help="merge index files of one model into one",
                             description="Merge index files made with one model (parts of a gallery built apart, "
                             "the shard files of a sharded index) into one index file. Items keep their ids, "
                             "identities are matched by name, and the items' sources (files, folders, data sets) "
                             "are kept, so that searches of the merged index name and show them.")
    p.add_argument("indexes", nargs="+", metavar="INDEX", help="the index files, in order")
    p.add_argument("--output", "-o", required=True, help="the index file to write (may be one of the inputs)")
    p.add_argument("--renumber", action="store_true", help="give the items of each index after the first new ids, "
                   "following those before it (as `index add` does), instead of keeping theirs: for indexes whose "
                   "ids clash, such as two `index build` runs")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check every array's checksum while reading")
    p.set_defaults(func=cmd_index_merge)

    p = index_sub.add_parser("remove", help="remove items from an index, by id or identity",
                             description="Remove items from an index file, by id or identity.")
    p.add_argument("--index", required=True, help="the index file (rewritten in place, atomically)")
    p.add_argument("--ids", nargs="+", type=int, metavar="ID", help="item ids")
    p.add_argument("--identity", nargs="+", metavar="NAME", help="every item of these identities")
    p.set_defaults(func=cmd_index_remove)

    p = index_sub.add_parser("info", help="what an index holds", description="Describe an index file: items, "
                             "code size, identities, the model and where its items come from.")
    p.add_argument("index", help="the index file")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check every array's checksum (one read of the file)")
    p.add_argument("--identities", action="store_true", help="also list each identity with its item count")
    p.add_argument("--json", help="write the description here")
    p.set_defaults(func=cmd_index_info)

    p = sub.add_parser("export", help="a trained model as an ONNX graph or an AOTInductor package: inputs -> "
                                      "codes and query tables",
                       description="Export a trained model for deployment: from its inputs (uint8 images, or feature "
                                   "vectors for the MLP backbone; any batch size) to the database codes and the query "
                                   "tables of every row. model.onnx: one ONNX graph in standard operators (ONNX "
                                   "Runtime, TensorRT), checked with ONNX Runtime when it is installed; needs onnx and "
                                   "onnxscript (pip install 'opqn-ext[export]'). model.pt2: an AOTInductor package "
                                   "compiled for the CPU, calling the fused ops, for torch._inductor.aoti_load_package "
                                   "or C++ (AOTIModelPackageLoader with the opqn_ext_ops library); checked by running it.")
    p.add_argument("checkpoint", help="checkpoint.pt or the run folder holding it")
    p.add_argument("-o", "--output", required=True, help="the file to write: .onnx or .pt2")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("embed", help="128-d dlib face embeddings of a data set (the faces extra)",
                       description="Compute dlib's 128-d face descriptors of ORL or an image folder and write a "
                                   "feature file for `opqn train --dataset features --backbone mlp`.")
    p.add_argument("--dataset", choices=("orl", "folder"), default="orl")
    p.add_argument("--data-path", dest="data_path", help="image folder root/<identity>/<image>")
    p.add_argument("--output", "-o", required=True, help="feature file (.safetensors or .npy)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("cache", help="decode an image folder into a cache ahead of `opqn train --cache-dir`",
                       description="Decode every image of a folder once, at the input size, into a cache file "
                                   "that `opqn train --cache-dir` (and eval, encode, search, index build) then map; "
                                   "a cache that matches the folder is left as it is.")
    p.add_argument("--data-path", dest="data_path", required=True, help="image folder root/<identity>/<image>")
    p.add_argument("--cache-dir", dest="cache_dir", required=True, help="where the cache file goes")
    p.add_argument("--input-size", type=int, default=defaults.input_size,
                   help=f"the training input size (default: {defaults.input_size})")
    p.add_argument("--grayscale", action=argparse.BooleanOptionalAction, default=False, help=_HELP["grayscale"])
    p.add_argument("--workers", type=int, default=-1, help="processes decoding images (-1: one per CPU, at most 8)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("demo", help="train on ORL faces and show retrieval (a few minutes on a CPU)",
                       description="Train OPQN on ORL faces (seen protocol, 32-bit codes) and report float vs "
                                   "OPQN retrieval, a PR-curve PNG and a montage PNG.")
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--width", type=int, default=16, help="resnet20 base channels (64 in the paper)")
    p.add_argument("--unseen", action="store_true", help="also train and report the unseen-identity protocol")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .item_sources import folder_listings

    try:
        with folder_listings():  # a command scans each image folder it names items of once
            return args.func(args)
    except (CliError, ValueError, FileNotFoundError, OrlDataError, IndexFileError) as err:
        print(f"opqn: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
