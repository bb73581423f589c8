"""`opqn search --montage`: the shown queries and their results drawn as a grid of images read from
the data set, image files or folder the index names (opqn_ext.item_images), framed by identity
where the query's is known."""
import json
import shutil
import sys

import pytest
import torch
from PIL import Image

from opqn_ext import plots
from opqn_ext.cli import MONTAGE_RESULTS, main
from opqn_ext.data import load_orl, scan_image_folder
from opqn_ext.item_images import TILE_SIDE, image_file, item_images
from opqn_ext.item_sources import dataset_source, files_source, folder_source

CPU = ["--device", "cpu"]


@pytest.fixture(scope="module")
def orl_run(tmp_path_factory):
    """(a run trained on ORL, an index of all 400 ORL images built with it)."""
    root = tmp_path_factory.mktemp("montage")
    assert main(["train", "--epochs", "1", "--width", "4", "--out-dir", str(root / "run"), "--no-progress"]) == 0
    assert main(["index", "build", str(root / "run"), *CPU, "--part", "all", "-o", str(root / "orl.opqn")]) == 0
    return root / "run", root / "orl.opqn"


def recorded(monkeypatch) -> list:
    """The arguments of each save_montage call, which still writes its file."""
    calls, draw = [], plots.save_montage

    def record(*args):
        calls.append(args)
        return draw(*args)

    monkeypatch.setattr(plots, "save_montage", record)
    return calls


def test_a_montage_of_data_set_queries_shows_the_data_set_images(tmp_path, monkeypatch, capsys, orl_run):
    run, index = orl_run
    calls, png, out = recorded(monkeypatch), tmp_path / "m.png", tmp_path / "r.json"
    assert main(["search", str(run), *CPU, "--index", str(index), "-k", "12", "--show", "3", "--montage", str(png),
                 "--json", str(out)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    with Image.open(png) as drawn:
        assert drawn.format == "PNG" and drawn.size[0] > drawn.size[1] > 300
    ((queries, results, correct, _, title, captions, query_captions),) = calls
    assert title == "top-10 by 32-bit OPQN codes" and MONTAGE_RESULTS == 10
    orl, found = load_orl(), json.loads(out.read_text())[:3]
    assert len(queries) == len(results) == 3
    for q, r in enumerate(found):
        assert torch.equal(queries[q], orl.images[r["query_item"]])  # 112 x 92: drawn at its own size
        assert query_captions[q] == f"query\n{orl.classes[r['query_label']]}"
        hits = r["results"][:10]
        assert len(results[q]) == len(correct[q]) == len(captions[q]) == 10
        for j, (image, hit) in enumerate(zip(results[q], hits)):
            assert torch.equal(image, orl.images[hit["item"]])
            assert correct[q][j] == (int(orl.labels[hit["item"]]) == r["query_label"])
            assert captions[q][j] == f"#{j + 1} {hit['score']:.3f}\n{orl.classes[hit['label']]}"

    assert main(["search", str(run), *CPU, "--index", str(index), "--show", "0", "--montage", str(png)]) == 2
    assert "--montage draws the first --show queries: --show must be >= 1, got 0" in capsys.readouterr().err
    sixth = [r["results"][5]["score"] for r in found]
    threshold = max(sixth)  # a query whose 6th result scores less keeps at most 5: rows of other lengths
    calls.clear()
    assert main(["search", str(run), *CPU, "--index", str(index), "-k", "12", "--show", "3", "--min-score",
                 str(threshold), "--montage", str(png), "--json", str(out)]) == 0
    kept = [r["results"] for r in json.loads(out.read_text())[:3]]
    ((_, results, correct, *_),) = calls
    assert [len(row) for row in results] == [len(row) for row in correct] == [min(10, len(r)) for r in kept]
    assert len({len(row) for row in results}) > 1 or len(set(sixth)) == 1


def test_a_montage_of_query_files_shows_the_files_and_frames_nothing(tmp_path, monkeypatch, capsys, orl_run,
                                                                    orl_folder):
    run, built = orl_run
    index = tmp_path / "orl.opqn"
    shutil.copy(built, index)
    big = tmp_path / "big.png"  # an enrolled photo larger than a tile
    with Image.open(orl_folder / "s05" / "03.png") as face:
        face.resize((300, 400)).save(big)
    assert main(["index", "add", str(run), *CPU, "--index", str(index)]) == 2  # ORL, whose source it is
    assert "the data set orl is in the index already (items of ids 0-399)" in capsys.readouterr().err
    assert main(["index", "add", str(run), *CPU, "--index", str(index), "--files", str(big), "--identity", "eve"]) == 0
    assert main(["index", "remove", "--index", str(index), "--ids", *map(str, range(4, 400))]) == 0
    capsys.readouterr()
    assert main(["index", "info", str(index)]) == 0
    assert "source: data set orl (400 images, ids 0-399)\nsource: 1 file (id 400)\n" in capsys.readouterr().out
    assert main(["search", str(run), *CPU, "--index", str(index), "--query", str(big), "-k", "5",
                 "--json", str(tmp_path / "all.json")]) == 0
    (everything,) = json.loads((tmp_path / "all.json").read_text())
    threshold = everything["results"][3]["score"]  # item 400, the query's own code, has the highest score
    calls = recorded(monkeypatch)
    assert main(["search", str(run), *CPU, "--index", str(index), "--query", str(big), "-k", "5",
                 "--min-score", str(threshold), "--montage", str(tmp_path / "m.png"),
                 "--json", str(tmp_path / "r.json")]) == 0
    ((queries, results, correct, _, _, captions, query_captions),) = calls
    (kept,) = json.loads((tmp_path / "r.json").read_text())
    items = [x["item"] for x in kept["results"]]
    assert 400 in items and 4 <= len(items) and len(results[0]) == len(correct[0]) == len(items)
    assert torch.equal(queries[0], image_file(str(big))) and query_captions == ["query\nbig.png"]
    assert correct == [[None] * len(items)]  # a file's identity is unknown: no frames
    orl = load_orl()
    for image, hit in zip(results[0], kept["results"]):
        want = image_file(str(big)) if hit["item"] == 400 else orl.images[hit["item"]]
        assert torch.equal(image, want)
    assert results[0][items.index(400)].shape == (3, TILE_SIDE, 120)  # 400 x 300 shrunk, aspect kept
    assert captions[0][items.index(400)].endswith("\neve")


def test_item_images_come_from_each_kind_of_source_or_say_why_not(tmp_path, orl_folder):
    orl = load_orl()
    faces = tmp_path / "faces"
    for name in ("s01", "s02"):
        shutil.copytree(orl_folder / name, faces / name)
    paths = scan_image_folder(faces)[0]
    sources = [dataset_source("orl", 400), folder_source(faces, 400), files_source([str(paths[3])], 420)]
    ids = torch.tensor([[7, 399, 400, 419], [420, 421, -1, 10]])
    images, why = item_images(sources, ids)
    assert why == ["1 of the items come from no source the index records (added from Python, or indexed before "
                   "opqn recorded built-in data sets)"]  # 421
    assert torch.equal(images[0][0], orl.images[7]) and torch.equal(images[0][1], orl.images[399])
    assert torch.equal(images[0][2], image_file(str(paths[0]))) and torch.equal(images[0][3], image_file(str(paths[19])))
    assert images[0][2].shape == (3, 32, 32)  # files are shown in color, at their own size
    assert torch.equal(images[1][0], image_file(str(paths[3]))) and images[1][1] is None and images[1][2] is None
    assert item_images(sources, torch.tensor([[421, 500, -1]]))[1] == [
        "2 of the items come from no source the index records (added from Python, or indexed before opqn recorded "
        "built-in data sets)"]
    (faces / "s02" / "09.png").unlink()
    sources[0] = dataset_source("orl", 401)
    images, why = item_images(sources, ids)
    assert images[0] == [None] * 4 and images[1][3] is None
    assert why[:2] == [f"{faces.resolve()} changed since its images were indexed",
                       "the data set orl has 400 images, not the 401 it had when its items were indexed"]


def test_a_montage_needs_a_model_on_images(tmp_path, capsys):
    from opqn_ext.data import save_features

    g = torch.Generator().manual_seed(0)
    save_features(tmp_path / "f.safetensors", torch.randn(40, 16, generator=g), torch.arange(4).repeat(10),
                  ["a", "b", "c", "d"])
    run = tmp_path / "run"
    assert main(["train", "--dataset", "features", "--data-path", str(tmp_path / "f.safetensors"), "--backbone", "mlp",
                 "--epochs", "1", "--out-dir", str(run), "--no-progress"]) == 0
    assert main(["index", "build", str(run), *CPU, "-o", str(tmp_path / "db.opqn")]) == 0
    assert main(["search", str(run), *CPU, "--index", str(tmp_path / "db.opqn"), "--montage",
                 str(tmp_path / "m.png")]) == 2
    assert "--montage draws images; this model takes feature vectors" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_the_demo_writes_its_report_and_figures(tmp_path, monkeypatch, capsys):
    calls = recorded(monkeypatch)
    assert main(["demo", "--epochs", "1", "--width", "4", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    assert f"wrote {tmp_path / 'montage.png'}" in capsys.readouterr().out
    report = json.loads((tmp_path / "demo.json").read_text())["seen"]
    assert report["opqn"]["queries"] == 120 and report["opqn"]["database"] == 280
    ((queries, results, correct, *_),) = calls
    assert len(queries) == 6 and [len(row) for row in results] == [5] * 6 and tuple(correct.shape) == (6, 5)
    orl = load_orl()
    assert all(any(torch.equal(q, image) for image in orl.images) for q in queries)
    for name in ("montage.png", "pr_curve.png"):
        with Image.open(tmp_path / name) as figure:
            assert figure.format == "PNG"


@pytest.mark.parametrize("command", ["search", "eval", "demo"])
def test_figures_without_matplotlib_are_refused_before_any_work(tmp_path, monkeypatch, capsys, orl_run, command):
    run, index = orl_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails, as where it is not installed
    option, args = {"search": ("--montage", ["search", str(run), *CPU, "--index", str(index), "--montage"]),
                    "eval": ("--pr-curve", ["eval", str(run), *CPU, "--pr-curve"]),
                    "demo": ("opqn demo", ["demo", "--epochs", "1", "--out-dir"])}[command]
    assert main([*args, str(tmp_path / "f")]) == 2
    captured = capsys.readouterr()
    assert f"{option} draws with matplotlib, which is not installed: pip install 'opqn-ext[demo]'" in captured.err
    assert captured.out == "" and not (tmp_path / "f").exists()
