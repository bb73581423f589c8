"""The opqn command line: help for every subcommand, one-line errors, and train -> eval ->
encode -> search end to end on a tiny ORL run, in memory and from a streamed image folder."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from opqn_ext.cli import main
from opqn_ext.train import load_checkpoint, model_from_checkpoint
from test_decoded_cache import no_decoding

SUBCOMMANDS = ["train", "eval", "encode", "search", "demo", "index build", "index add", "index remove", "index info", "export",
               "cache", "embed"]
CPU = ["--device", "cpu"]  # results compared across batch sizes: a GPU's convolutions may round them differently


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "opqn_ext.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_has_help(sub, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*sub.split(), "--help"])
    assert exit_info.value.code == 0
    assert "usage: opqn " + sub in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--num-books", "8", "--num-words", "128"], "num_words (K=128) must be in [2, min(d, 256)] with d = feature_dim / num_books = 64"),
        (["train", "--bits", "30", "--num-books", "8", "--num-words", "16"], "--bits 30 does not equal num_books * log2(num_words) = 8 * log2(16)"),
        (["train", "--bits", "30"], "--bits 30 alone means 4-bit books"),
        (["eval", "/nonexistent/run"], "checkpoint /nonexistent/run does not exist"),
    ],
)
def test_bad_arguments_give_one_clear_line(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("opqn: error: ") and message in lines[0], proc.stderr


@pytest.mark.parametrize("option,value,names", [("--dataset", "mnist", "'orl', 'fashion-mnist', 'folder', 'features'"),
                                                 ("--codebook-kind", "pca", "'dct', 'random', 'hadamard'"),
                                                 ("--assignment", "fixed", "'learned', 'codeword'")])
def test_a_name_outside_an_options_choices_is_refused_before_anything_loads(option, value, names):
    proc = run_cli("train", option, value, "--no-progress", "--out-dir", "/nonexistent/run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert f"argument {option}: invalid choice: '{value}' (choose from {names})" in proc.stderr


def test_unknown_subcommand_is_an_argparse_error():
    proc = run_cli("frobnicate")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "invalid choice" in proc.stderr


def test_train_eval_encode_search(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--epochs", "3", "--width", "4", "--bits", "32", "--out-dir", str(run), "--no-progress",
            "--json", str(tmp_path / "train.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("orl: 400 images of 40 classes, in memory (0.4 MB); seen protocol: training on 280 items "
                          "of 40 classes, 280 database items, 120 queries\n")
    assert "OPQN codes (32 bits)" in out and "float features (512-d" in out
    assert json.loads((tmp_path / "train.json").read_text())["opqn"]["queries"] == 120

    assert main(["eval", str(run), "--json", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    trained = json.loads((tmp_path / "train.json").read_text())
    assert evaluated["opqn"]["mAP"] == pytest.approx(trained["opqn"]["mAP"])

    codes_file = tmp_path / "db.safetensors"
    assert main(["encode", str(run), "-o", str(codes_file)]) == 0
    with safe_open(str(codes_file), framework="pt") as f:
        codes, labels = f.get_tensor("codes"), f.get_tensor("labels")
        assert f.metadata()["num_words"] == "16"
    assert codes.shape == (280, 8) and int(codes.max()) < 16 and len(labels) == 280

    assert main(["search", str(run), "--codes", str(codes_file), "-k", "5", "--json", str(tmp_path / "s.json")]) == 0
    results = json.loads((tmp_path / "s.json").read_text())
    assert len(results) == 120 and len(results[0]["results"]) == 5
    scores = [r["score"] for r in results[0]["results"]]
    assert scores == sorted(scores, reverse=True)
    assert "top-5" in capsys.readouterr().out
    assert main(["search", str(run), "--codes", str(codes_file), "-k", "281", "--json", str(tmp_path / "all.json")]) == 0
    assert [len(r["results"]) for r in json.loads((tmp_path / "all.json").read_text())] == [280] * 120  # every code
    assert main(["search", str(run), "--codes", str(codes_file), "-k", "0"]) == 2
    assert "-k must be >= 1, got 0" in capsys.readouterr().err
    # 4-bit codes (K = 16): the fast scan re-scoring every code (rerank 56 x k = 5 >= 280) returns
    # what the exact scan returns (with fewer candidates, the 8-bit tables of this barely trained
    # model cannot tell apart scores 1e-4 from the top ties, so a top tie may be left out)
    assert main(["search", str(run), "--codes", str(codes_file), "-k", "5", "--fast-scan", "--rerank", "56",
                 "--json", str(tmp_path / "f.json")]) == 0
    for fast, exact in zip(json.loads((tmp_path / "f.json").read_text()), results):
        same_results(fast["results"], exact["results"])
    assert main(["search", str(run), "--codes", str(codes_file), "--fast-scan", "--rerank", "0"]) == 2
    assert "--rerank must be >= 1, got 0" in capsys.readouterr().err


def test_fast_scan_needs_4_bit_codes(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--width", "4", "--num-books", "4", "--num-words", "64", "--out-dir",
                 str(run), "--no-progress"]) == 0
    assert main(["index", "build", str(run), *CPU, "-o", str(tmp_path / "db.opqn")]) == 0
    assert main(["search", str(run), *CPU, "--index", str(tmp_path / "db.opqn"), "--fast-scan"]) == 2
    assert "--fast-scan scans 4-bit codes (K <= 16); these codes have K=64" in capsys.readouterr().err


def test_a_streamed_folder_from_training_to_search(tmp_path, capsys, orl_folder):
    """--stream: training, eval, encode and index build decode the folder batch by batch, and give
    what the folder read into memory gives."""
    run = tmp_path / "run"
    folder = ["--dataset", "folder", "--data-path", str(orl_folder), "--grayscale"]
    assert main(["train", *folder, "--stream", "--workers", "2", "--epochs", "2", "--width", "4", "--out-dir", str(run),
                 "--no-progress", "--json", str(tmp_path / "train.json")]) == 0
    assert load_checkpoint(run)["config"]["stream"] is True
    assert f"folder {orl_folder}: 400 images of 40 classes, streamed from their files at 32x32; seen" in \
        capsys.readouterr().out
    trained = json.loads((tmp_path / "train.json").read_text())
    first = None
    for how in (["--no-stream"], ["--workers", "0"], []):  # in memory; decoded here; by the 2 workers of training
        assert main(["eval", str(run), *how, "--json", str(tmp_path / "eval.json")]) == 0
        assert json.loads((tmp_path / "eval.json").read_text())["opqn"]["mAP"] == trained["opqn"]["mAP"], how
        assert main(["encode", str(run), *how, "-o", str(tmp_path / "db.safetensors")]) == 0
        with safe_open(str(tmp_path / "db.safetensors"), framework="pt") as f:
            codes = f.get_tensor("codes")
        assert codes.shape == (280, 8) and (first is None or torch.equal(codes, first)), how
        first = codes
    assert main(["index", "build", str(run), "-o", str(tmp_path / "db.opqn")]) == 0
    assert main(["eval", str(run), "--dataset", "orl"]) == 0  # trained streaming, evaluated on ORL in memory
    assert main(["eval", str(run), "--dataset", "orl", "--stream"]) == 2
    assert "stream reads image folders (dataset 'folder'), not dataset 'orl'" in capsys.readouterr().err


def test_a_cached_folder_from_training_to_eval(tmp_path, capsys, orl_folder):
    """--cache-dir: training decodes the folder once into the cache; eval maps it (as training did),
    or reads the folder another way when told."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    folder = ["--dataset", "folder", "--data-path", str(orl_folder), "--grayscale"]
    assert main(["train", *folder, "--cache-dir", str(cache), "--epochs", "2", "--width", "4", "--out-dir", str(run),
                 "--no-progress", "--json", str(tmp_path / "train.json")]) == 0
    out = capsys.readouterr().out
    assert f"folder {orl_folder}: 400 images of 40 classes, mapped from {cache} (0.4 MB); seen" in out
    assert load_checkpoint(run)["config"]["cache_dir"] == str(cache) and len(list(cache.glob("*.npy"))) == 1
    trained = json.loads((tmp_path / "train.json").read_text())
    for how in ([], ["--stream"], ["--no-stream"], ["--cache-dir", str(tmp_path / "other")]):
        assert main(["eval", str(run), *how, "--json", str(tmp_path / "eval.json")]) == 0
        assert json.loads((tmp_path / "eval.json").read_text())["opqn"]["mAP"] == trained["opqn"]["mAP"], how
    assert len(list((tmp_path / "other").glob("*.npy"))) == 1
    assert main(["eval", str(run), "--dataset", "orl"]) == 0  # trained from a cache, evaluated on ORL in memory
    assert main(["train", *folder, "--stream", "--cache-dir", str(cache), "--out-dir", str(run)]) == 2
    assert "stream decodes the images batch by batch, cache_dir maps them decoded once: choose one" in \
        capsys.readouterr().err


def test_a_cache_made_ahead_is_what_training_maps(tmp_path, capsys, orl_folder, monkeypatch):
    cache = tmp_path / "cache"
    ahead = ["cache", "--data-path", str(orl_folder), "--cache-dir", str(cache), "--grayscale", "--no-progress"]
    assert main(ahead) == 0
    file = next(cache.glob("*.npy"))
    assert f"{orl_folder}: 400 images of 40 classes at 32x32 (0.4 MB) decoded into {file} (" in capsys.readouterr().out
    assert main(ahead) == 0
    assert f"already in {file}, which matches the folder" in capsys.readouterr().out
    no_decoding(monkeypatch)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data-path", str(orl_folder), "--grayscale", "--cache-dir",
                 str(cache), "--epochs", "1", "--width", "4", "--out-dir", str(run), "--no-progress"]) == 0
    assert f"mapped from {cache} (0.4 MB)" in capsys.readouterr().out
    for bad, message in ((["--input-size", "0"], "--input-size must be >= 1, got 0"),
                         (["--workers", "-2"], "--workers must be >= 0, or -1 for one per CPU, got -2")):
        assert main([*ahead, *bad]) == 2
        assert message in capsys.readouterr().err
    assert main(["cache", "--data-path", str(tmp_path / "missing"), "--cache-dir", str(cache)]) == 2
    assert "image folder" in capsys.readouterr().err


def test_index_build_and_search_the_index(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--width", "4", "--out-dir", str(run), "--no-progress"]) == 0
    index_file = tmp_path / "orl.opqn"
    assert main(["index", "build", str(run), "-o", str(index_file)]) == 0
    assert "indexed 280 items of orl (database) as 32-bit codes" in capsys.readouterr().out
    codes_file = tmp_path / "db.safetensors"
    assert main(["encode", str(run), "-o", str(codes_file)]) == 0
    out = {}
    for source, path in (("--index", index_file), ("--codes", codes_file)):
        assert main(["search", str(run), source, str(path), "-k", "7", "--json", str(tmp_path / "r.json")]) == 0
        out[source] = json.loads((tmp_path / "r.json").read_text())
    assert out["--index"] == out["--codes"] and len(out["--index"]) == 120
    from opqn_ext.data import load_orl

    labels = load_orl().labels
    assert all(r["label"] == int(labels[r["item"]]) for q in out["--index"] for r in q["results"])
    proc = run_cli("search", str(run), "--index", str(tmp_path / "missing.opqn"))
    assert proc.returncode == 2 and "index file does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("search", str(run))
    assert proc.returncode == 2 and "one of the arguments --index --codes is required" in proc.stderr


def test_training_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path):
    import signal
    import time

    opts = ["--epochs", "6", "--width", "4", "--batch-size", "64", "--no-progress", "--dropout", "0.1"]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    straight = subprocess.run([sys.executable, "-m", "opqn_ext.cli", "train", *opts, "--out-dir", str(tmp_path / "a")],
                              capture_output=True, text=True, timeout=300, env=env)
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "opqn_ext.cli", "train", *opts, "--out-dir", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = run / "log.jsonl", time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(run)["epoch"] + 1
    assert 2 <= killed_at < 6  # the log can be one epoch ahead of the last checkpoint
    resumed = subprocess.run([sys.executable, "-m", "opqn_ext.cli", "train", *opts, "--out-dir", str(run), "--resume"],
                             capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(run)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (tmp_path / "a" / "log.jsonl").read_text().count("epoch") == log.read_text().count("epoch")


def test_a_folder_identity_too_small_for_the_split_is_named(tmp_path, orl_folder):
    import shutil

    for name in ("s01", "s02"):
        shutil.copytree(orl_folder / name, tmp_path / "faces" / name)
    for extra in sorted((tmp_path / "faces" / "s02").iterdir())[3:]:
        extra.unlink()
    proc = run_cli("train", "--dataset", "folder", "--data-path", str(tmp_path / "faces"), "--epochs", "1",
                   "--no-progress", "--out-dir", str(tmp_path / "run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("1 identity has no more than query_per_class=3 items, none left for the database: s02 (3); remove them "
            "or lower query_per_class") in proc.stderr


def test_encode_search_and_index_build_in_chunks_give_the_whole_result(tmp_path, monkeypatch, capsys):
    """The commands take features a chunk of items at a time (bounded memory for large sets):
    chunks of 37 items give what one chunk gives (up to the rounding of features computed in other
    batches, which may reorder results of equal score)."""
    import functools

    import opqn_ext.cli as cli
    from opqn_ext.index import OPQNIndex

    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--width", "4", "--out-dir", str(run), "--no-progress"]) == 0
    outputs = {}
    for chunk in (65536, 37):
        monkeypatch.setattr(cli, "feature_chunks", functools.partial(cli.feature_chunks, chunk=chunk))
        out = tmp_path / str(chunk)
        out.mkdir()
        assert main(["encode", str(run), *CPU, "-o", str(out / "db.safetensors")]) == 0
        assert main(["index", "build", str(run), *CPU, "-o", str(out / "db.opqn")]) == 0
        assert main(["search", str(run), *CPU, "--index", str(out / "db.opqn"), "-k", "5",
                     "--json", str(out / "r.json")]) == 0
        with safe_open(str(out / "db.safetensors"), framework="pt") as f:
            index = OPQNIndex.load(out / "db.opqn")
            outputs[chunk] = (f.get_tensor("codes"), index.codes, index.ids, json.loads((out / "r.json").read_text()))
    (codes, index_codes, ids, results), (codes37, index_codes37, ids37, results37) = outputs.values()
    assert codes.shape == (280, 8) and torch.equal(codes, codes37) and torch.equal(index_codes, index_codes37)
    assert torch.equal(ids, ids37) and len(results) == len(results37) == 120
    for one, chunked in zip(results, results37):
        assert one["query_item"] == chunked["query_item"]
        scores = [r["score"] for r in one["results"]]
        assert [r["score"] for r in chunked["results"]] == pytest.approx(scores, rel=1e-6)
        above_ties = {r["item"] for r in one["results"] if r["score"] > scores[-1] + 1e-4}
        assert above_ties <= {r["item"] for r in chunked["results"]}
    model, _ = model_from_checkpoint(load_checkpoint(run))
    images = torch.zeros(3, 1, 32, 32, dtype=torch.uint8)
    chunks = list(cli.feature_chunks(model, images, torch.device("cpu"), torch.arange(0)))
    assert len(chunks) == 1 and chunks[0][1].shape == (0, 512)  # no items: one empty chunk


def same_results(got, want):
    """Search results of one query computed from other batches: equal scores (to rounding), and
    every item scoring above the last place's ties in both."""
    scores = [r["score"] for r in want]
    assert [r["score"] for r in got] == pytest.approx(scores, rel=1e-5)
    above_ties = {r["item"] for r in want if r["score"] > scores[-1] + 1e-4}
    assert above_ties <= {r["item"] for r in got}


def orl_item_file(orl_folder, item):
    """The file of ORL item ``item`` in the orl_folder fixture."""
    from opqn_ext.data import load_orl

    return orl_folder / f"s{int(load_orl().labels[item]) + 1:02d}" / f"{item % 10:02d}.png"


def test_search_with_query_images_of_any_layout(tmp_path, capsys, orl_folder):
    """--query: image files and folders of them, without identity folders, read as the training set's
    images were: an image of the set gives the results its item gives as a data-set query."""
    import shutil

    from opqn_ext.data import load_orl

    run, index = tmp_path / "run", tmp_path / "db.opqn"
    assert main(["train", "--epochs", "1", "--width", "4", "--out-dir", str(run), "--no-progress"]) == 0
    assert main(["index", "build", str(run), *CPU, "--part", "all", "-o", str(index)]) == 0
    assert main(["search", str(run), *CPU, "--index", str(index), "--part", "all", "-k", "5",
                 "--json", str(tmp_path / "all.json")]) == 0
    by_item = {r["query_item"]: r["results"] for r in json.loads((tmp_path / "all.json").read_text())}
    items = [0, 13, 399]
    probes = tmp_path / "probes" / "deeper"
    probes.mkdir(parents=True)
    for name, item in zip(("a.png", "b.png"), items):
        shutil.copy(orl_item_file(orl_folder, item), probes / name)
    single = orl_item_file(orl_folder, items[2])
    capsys.readouterr()
    assert main(["search", str(run), *CPU, "--index", str(index), "--query", str(tmp_path / "probes"), str(single),
                 "-k", "5", "--json", str(tmp_path / "q.json")]) == 0
    out = capsys.readouterr().out
    assert f"query {probes / 'a.png'}: " in out and "3 queries x 400 codes, top-5" in out
    results = json.loads((tmp_path / "q.json").read_text())
    assert [r["query"] for r in results] == [str(probes / "a.png"), str(probes / "b.png"), str(single)]
    classes = load_orl().classes
    for r, item in zip(results, items):
        same_results(r["results"], by_item[item])
        assert all(x["identity"] == classes[x["label"]] and "file" not in x for x in r["results"])
    assert all(x["identity"] == classes[x["label"]] for x in by_item[0])  # data-set queries are named too

    for args, message in (
            (["--query", str(tmp_path / "missing.png")], f"--query {tmp_path / 'missing.png'} does not exist"),
            (["--query", str(tmp_path / "run")], f"--query {tmp_path / 'run'}: no images with extensions .jpg"),
            (["--query", str(index)], f"--query {index}: expected images ending in .jpg"),
            (["--query", str(single), "--dataset", "orl"], "--query names the queries: --dataset does not apply"),
            (["--query", str(single), "--part", "all"], "--query names the queries: --part does not apply")):
        assert main(["search", str(run), *CPU, "--index", str(index), *args]) == 2
        assert message in capsys.readouterr().err, args
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["search", str(run), *CPU, "--index", str(index), "--query", str(tmp_path / "broken.jpg")]) == 2
    assert "broken.jpg: unreadable image" in capsys.readouterr().err


def test_search_names_the_image_files_of_a_folder_index_while_the_folder_matches(tmp_path, capsys, orl_folder):
    import shutil

    from opqn_ext.data import scan_image_folder

    faces, run, index = tmp_path / "faces", tmp_path / "run", tmp_path / "db.opqn"
    shutil.copytree(orl_folder, faces)
    folder = ["--dataset", "folder", "--data-path", str(faces), "--grayscale"]
    assert main(["train", *folder, "--epochs", "1", "--width", "4", "--out-dir", str(run), "--no-progress"]) == 0
    assert main(["index", "build", str(run), *CPU, "--part", "all", "-o", str(index)]) == 0
    assert main(["search", str(run), *CPU, "--index", str(index), "--part", "all", "-k", "4",
                 "--json", str(tmp_path / "all.json")]) == 0
    by_item = {r["query_item"]: r["results"] for r in json.loads((tmp_path / "all.json").read_text())}
    paths, labels, classes = scan_image_folder(faces)
    query = faces / "s07" / "03.png"
    item = paths.index(str(query))
    capsys.readouterr()
    assert main(["search", str(run), *CPU, "--index", str(index), "--query", str(query), "-k", "4",
                 "--json", str(tmp_path / "q.json")]) == 0
    (result,) = json.loads((tmp_path / "q.json").read_text())
    same_results(result["results"], by_item[item])
    for x in result["results"]:
        assert x["file"] == paths[x["item"]] and x["identity"] == classes[labels[x["item"]]]
    first = result["results"][0]
    assert f"{first['item']}({first['identity']}) {first['file']} {first['score']:.3f}" in capsys.readouterr().out
    assert main(["encode", str(run), *CPU, "--part", "all", "-o", str(tmp_path / "db.safetensors")]) == 0
    assert main(["search", str(run), *CPU, "--codes", str(tmp_path / "db.safetensors"), "--query", str(query),
                 "-k", "4", "--json", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text()) == [result]  # a code file names its items too

    shutil.copy(query, faces / "s01" / "new.png")  # the folder changed: its items are no longer the index's
    assert main(["search", str(run), *CPU, "--index", str(index), "--query", str(query), "-k", "4",
                 "--json", str(tmp_path / "q.json")]) == 0
    assert f"(database items without their image files: {faces} changed since its images were indexed)" in \
        capsys.readouterr().out
    (result,) = json.loads((tmp_path / "q.json").read_text())
    assert all("file" not in x and "identity" in x for x in result["results"])


def export_an_orl_run(tmp_path, capsys, output: str):
    """A one-epoch ORL run (width 4, 32-bit codes) at ``tmp_path / "run"``, the codes of all its
    images by `opqn encode` (``tmp_path / "codes.safetensors"``), and `opqn export -o tmp_path /
    output`; returns (the run's model, its data, the exported file, what export printed)."""
    from opqn_ext.train import prepare_data

    run, path = tmp_path / "run", tmp_path / output
    assert main(["train", "--epochs", "1", "--width", "4", "--bits", "32", "--out-dir", str(run), "--no-progress",
                 "--device", "cpu"]) == 0
    assert main(["encode", str(run), "--device", "cpu", "--part", "all", "-o", str(tmp_path / "codes.safetensors")]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "-o", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("exported images [B, 1, 32, 32] uint8 -> codes [B, 8] uint8 (32-bit database codes), "
                          f"tables [B, 8, 16] float32 (query tables) -> {path}")
    model, cfg = model_from_checkpoint(load_checkpoint(str(run)))
    return model, prepare_data(cfg), path, out


def train_on_a_feature_file(tmp_path, identities: int, per_identity: int):
    """A feature file of ``identities`` clusters of 32-d vectors (ids ``id0``, ...), and a one-epoch
    MLP run trained on it at ``tmp_path / "run"``; returns the features [N, 32]."""
    from opqn_ext.data import save_features

    g = torch.Generator().manual_seed(0)
    centers, labels = torch.randn(identities, 32, generator=g), torch.arange(identities).repeat_interleave(per_identity)
    features = centers[labels] + 0.3 * torch.randn(len(labels), 32, generator=g)
    save_features(tmp_path / "f.safetensors", features, labels, [f"id{i}" for i in range(identities)])
    assert main(["train", "--dataset", "features", "--data-path", str(tmp_path / "f.safetensors"), "--backbone", "mlp",
                 "--epochs", "1", "--out-dir", str(tmp_path / "run"), "--no-progress", *CPU]) == 0
    return features


def test_search_with_query_feature_files(tmp_path, capsys):
    import numpy as np

    features = train_on_a_feature_file(tmp_path, 20, 10)
    run, index = tmp_path / "run", tmp_path / "db.opqn"
    assert main(["index", "build", str(run), *CPU, "--part", "all", "-o", str(index)]) == 0
    assert main(["search", str(run), *CPU, "--index", str(index), "--part", "all", "-k", "3",
                 "--json", str(tmp_path / "all.json")]) == 0
    by_item = {r["query_item"]: r["results"] for r in json.loads((tmp_path / "all.json").read_text())}
    np.save(tmp_path / "q.npy", features[[5, 150]].numpy())
    assert main(["search", str(run), *CPU, "--index", str(index), "--query", str(tmp_path / "q.npy"),
                 str(tmp_path / "f.safetensors"), "-k", "3", "--json", str(tmp_path / "q.json")]) == 0
    results = json.loads((tmp_path / "q.json").read_text())
    assert [r["query"] for r in results[:3]] == [f"{tmp_path / 'q.npy'}[0]", f"{tmp_path / 'q.npy'}[1]",
                                                 f"{tmp_path / 'f.safetensors'}[0]"] and len(results) == 202
    for r, item in zip(results, [5, 150, *range(200)]):
        same_results(r["results"], by_item[item])
        assert all(x["identity"] == f"id{x['label']}" for x in r["results"])
    np.save(tmp_path / "wide.npy", np.zeros((2, 33), dtype=np.float32))
    (tmp_path / "img.png").write_bytes(b"")
    for query, message in ((tmp_path / "wide.npy", "--query features have 33 dimensions, the model takes 32"),
                           (tmp_path / "img.png", "expected feature files (the model takes features) ending in .npy"),
                           (tmp_path, "the model takes features, name feature files")):
        assert main(["search", str(run), *CPU, "--index", str(index), "--query", str(query)]) == 2
        assert message in capsys.readouterr().err


def test_a_device_that_cannot_be_used_is_one_clear_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--width", "4", "--out-dir", str(run), "--no-progress"]) == 0
    bad = [("bogus", "--device bogus: ")] + ([] if torch.cuda.is_available() else
                                            [("cuda", "--device cuda: device 'cuda' requested but no CUDA GPU")])
    for device, message in bad:
        for command in (["eval", str(run)], ["encode", str(run), "-o", str(tmp_path / "c.safetensors")],
                        ["index", "build", str(run), "-o", str(tmp_path / "i.opqn")]):
            assert main([*command, "--device", device]) == 2
            assert message in capsys.readouterr().err, (command, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_checkpoint_commands_with_device_cuda_match_the_cpu(tmp_path, capsys, orl_folder):
    from opqn_ext.index import OPQNIndex

    run = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--width", "4", "--device", "cpu", "--out-dir", str(run),
                 "--no-progress"]) == 0
    codes, metrics, found = {}, {}, {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        out.mkdir()
        assert main(["eval", str(run), "--device", device, "--json", str(out / "e.json")]) == 0
        metrics[device] = json.loads((out / "e.json").read_text())
        assert main(["encode", str(run), "--device", device, "-o", str(out / "c.safetensors")]) == 0
        with safe_open(str(out / "c.safetensors"), framework="pt") as f:
            codes[device] = f.get_tensor("codes")
        assert main(["index", "build", str(run), "--device", device, "-o", str(out / "i.opqn")]) == 0
        assert main(["search", str(run), "--index", str(tmp_path / "cpu" / "i.opqn"), "--device", device, "-k", "5",
                     "--query", str(orl_item_file(orl_folder, 7)), "--json", str(out / "s.json")]) == 0
        found[device] = json.loads((out / "s.json").read_text())[0]["results"]
    # features computed by other kernels round differently: a code may rarely flip between near-equal words
    assert (codes["cpu"] == codes["cuda"]).float().mean() > 0.99
    assert metrics["cuda"]["opqn"]["mAP"] == pytest.approx(metrics["cpu"]["opqn"]["mAP"], abs=0.02)
    assert metrics["cuda"]["float"]["mAP"] == pytest.approx(metrics["cpu"]["float"]["mAP"], abs=1e-3)
    assert [r["score"] for r in found["cuda"]] == pytest.approx([r["score"] for r in found["cpu"]], abs=1e-3)
    assert OPQNIndex.load(tmp_path / "cuda" / "i.opqn").codes.shape == codes["cpu"].shape
