"""The opqn command line: help for every subcommand, one-line errors, and train -> eval ->
encode -> search end to end on a tiny ORL run, in memory and from a streamed image folder."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from opqn_ext.cli import main
from opqn_ext.train import load_checkpoint, model_from_checkpoint
from test_decoded_cache import no_decoding

SUBCOMMANDS = ["train", "eval", "encode", "search", "demo", "index build"]


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
        (["train", "--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["eval", "/nonexistent/run"], "checkpoint /nonexistent/run does not exist"),
    ],
)
def test_bad_arguments_give_one_clear_line(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("opqn: error: ") and message in lines[0], proc.stderr


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
    assert main(["search", str(run), "--codes", str(codes_file), "-k", "281"]) == 2
    assert "-k must be in [1, 280]" in capsys.readouterr().err


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
    for how in (["--no-stream"], ["--workers", "0"], []):  # in memory; decoded here; by the 2 workers of training
        assert main(["eval", str(run), *how, "--json", str(tmp_path / "eval.json")]) == 0
        assert json.loads((tmp_path / "eval.json").read_text())["opqn"]["mAP"] == trained["opqn"]["mAP"], how
        assert main(["encode", str(run), *how, "-o", str(tmp_path / "db.safetensors")]) == 0
        with safe_open(str(tmp_path / "db.safetensors"), framework="pt") as f:
            codes = f.get_tensor("codes")
        assert codes.shape == (280, 8) and (how == ["--no-stream"] or torch.equal(codes, first)), how
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
    import os
    import signal
    import time

    import torch

    from opqn_ext.train import load_checkpoint, model_from_checkpoint

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
        assert main(["encode", str(run), "-o", str(out / "db.safetensors")]) == 0
        assert main(["index", "build", str(run), "-o", str(out / "db.opqn")]) == 0
        assert main(["search", str(run), "--index", str(out / "db.opqn"), "-k", "5", "--json", str(out / "r.json")]) == 0
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
