"""`opqn index add / remove / info`: an index grows by a data set or by image files named on the
command line, with their identities, shrinks by id or identity, and searches name what they find
by the source each item came from; commands changing one index wait for each other."""
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from opqn_ext.cli import main
from opqn_ext.index import OPQNIndex
from opqn_ext.item_sources import files_source, identity_names, item_files, merged_classes, next_free_id

CPU = ["--device", "cpu"]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, orl_folder):
    """(a run trained on ORL identities s01-s30 as an image folder, that folder, a folder of the other
    ten identities, and an index of the thirty's 300 images)."""
    root = tmp_path_factory.mktemp("gallery")
    faces, new = root / "faces", root / "new"
    for folder in sorted(orl_folder.iterdir()):
        shutil.copytree(folder, (faces if folder.name <= "s30" else new) / folder.name)
    run = root / "run"
    assert main(["train", "--dataset", "folder", "--data-path", str(faces), "--grayscale", "--epochs", "1",
                 "--width", "4", "--out-dir", str(run), "--no-progress"]) == 0
    assert main(["index", "build", str(run), *CPU, "--part", "all", "-o", str(root / "faces.opqn")]) == 0
    return run, faces, new, root / "faces.opqn"


def search(run, index, query, tmp_path, k):
    assert main(["search", str(run), *CPU, "--index", str(index), "--query", str(query), "-k", str(k),
                 "--json", str(tmp_path / "r.json")]) == 0
    (result,) = json.loads((tmp_path / "r.json").read_text())
    return {x["item"]: x for x in result["results"]}


def test_an_index_grows_by_folders_and_files_and_names_what_it_finds(tmp_path, capsys, gallery):
    run, faces, new, built = gallery
    index_path = tmp_path / "faces.opqn"
    shutil.copy(built, index_path)
    assert main(["index", "add", str(run), *CPU, "--index", str(index_path), "--data-path", str(new)]) == 0
    assert f"added 100 items of folder {new} (ids 300-399) -> {index_path}: 400 items, 40 identities" in \
        capsys.readouterr().out
    assert main(["index", "add", str(run), *CPU, "--index", str(index_path), "--files", str(new / "s31" / "00.png"),
                 str(new / "s31" / "01.png"), "--identity", "carol"]) == 0
    assert main(["index", "add", str(run), *CPU, "--index", str(index_path), "--files", str(new / "s32")]) == 0
    assert main(["index", "add", str(run), *CPU, "--index", str(index_path), "--files", str(new / "s33" / "05.png"),
                 "--identity", "s33"]) == 0
    assert "added 1 image (id 412) -> " in capsys.readouterr().out.splitlines()[-1]

    index = OPQNIndex.load(index_path)
    assert len(index) == 413 and torch.equal(index.ids, torch.arange(413))
    classes = index.settings["classes"]
    assert classes == [f"s{i:02d}" for i in range(1, 41)] + ["carol"]
    assert index.labels[300:400].tolist() == [i for i in range(30, 40) for _ in range(10)]
    assert index.labels[400:].tolist() == [40, 40] + [-1] * 10 + [classes.index("s33")]
    # the codes of added items are the codes an index of that folder alone holds
    assert main(["index", "build", str(run), *CPU, "--data-path", str(new), "--part", "all",
                 "-o", str(tmp_path / "new.opqn")]) == 0
    alone = OPQNIndex.load(tmp_path / "new.opqn")
    assert torch.equal(index.codes[300:400], alone.codes)
    assert torch.equal(index.codes[400:402], alone.codes[0:2]) and torch.equal(index.codes[402:412], alone.codes[10:20])
    assert torch.equal(index.codes[412], alone.codes[25])

    found = search(run, index_path, new / "s33" / "05.png", tmp_path, k=413)
    assert len(found) == 413
    assert found[412]["identity"] == "s33" and found[412]["file"] == str(new / "s33" / "05.png")
    assert found[325] | {"score": None} == {"item": 325, "label": 32, "identity": "s33", "score": None,
                                            "file": str(new / "s33" / "05.png")}
    assert found[0]["identity"] == "s01" and found[0]["file"] == str(faces / "s01" / "00.png")
    assert found[401]["identity"] == "carol" and found[401]["file"] == str(new / "s31" / "01.png")
    assert found[405]["label"] == -1 and "identity" not in found[405] and found[405]["file"] == str(new / "s32" / "03.png")
    assert found[412]["score"] == found[325]["score"]  # one image, one code

    assert main(["index", "info", str(index_path), "--identities", "--json", str(tmp_path / "info.json")]) == 0
    out = capsys.readouterr().out
    assert "413 items, 32-bit codes (M=8 books of K=16 words, d=64)" in out
    assert "identity s01: 10 items\n" in out and "identity carol: 2 items\n" in out
    assert "identity s33: 11 items\n" in out  # its folder's ten and the file named with it
    assert "ids from 0 to 412; 41 identities, 10 items without one" in out
    assert f"source: folder {new} (100 images, ids 300-399)" in out and "source: 1 file (id 412)" in out
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["items"] == 413 and info["identities"] == 41 and info["unlabeled"] == 10 and info["orthonormal"]
    assert [(s["first_id"], s["end_id"]) for s in info["sources"]] == [(0, 300), (300, 400), (400, 402),
                                                                        (402, 412), (412, 413)]
    assert len(info["items_per_identity"]) == 41 and sum(info["items_per_identity"].values()) == 403

    (faces / "s01" / "extra.png").write_bytes((faces / "s01" / "00.png").read_bytes())  # shifts the folder's items
    found = search(run, index_path, new / "s33" / "05.png", tmp_path, k=413)
    assert "file" not in found[0] and found[0]["identity"] == "s01"
    assert found[325]["file"] == str(new / "s33" / "05.png") and found[412]["file"] == str(new / "s33" / "05.png")
    assert f"(database items without their image files: {faces} changed since its images were indexed)" in \
        capsys.readouterr().out
    assert main(["index", "info", str(index_path)]) == 0
    assert f"source: folder {faces} (300 images, ids 0-299; not named: {faces} changed since" in capsys.readouterr().out
    (faces / "s01" / "extra.png").unlink()

    assert main(["index", "remove", "--index", str(index_path), "--identity", "carol", "s33", "--ids", "0", "9999"]) == 0
    assert f"removed 14 items from {index_path}: 399 left" in capsys.readouterr().out
    index = OPQNIndex.load(index_path)
    assert 0 not in index.ids and not bool(torch.isin(index.labels, torch.tensor([32, 40])).any())
    assert main(["index", "add", str(run), *CPU, "--index", str(index_path), "--files", str(new / "s34"),
                 "--identity", "carol"]) == 0
    index = OPQNIndex.load(index_path)  # new ids follow every id a source names, removed or not
    assert index.ids[-10:].tolist() == list(range(413, 423)) and index.labels[-10:].tolist() == [40] * 10


def test_bad_index_commands_are_one_clear_line(tmp_path, capsys, gallery, orl_folder):
    run, faces, new, built = gallery
    index_path = tmp_path / "faces.opqn"
    shutil.copy(built, index_path)
    add = ["index", "add", str(run), *CPU, "--index", str(index_path)]
    other = tmp_path / "other"
    assert main(["train", "--dataset", "folder", "--data-path", str(faces), "--grayscale", "--epochs", "1",
                 "--width", "4", "--seed", "1", "--out-dir", str(other), "--no-progress"]) == 0
    codes = tmp_path / "db.safetensors"
    assert main(["encode", str(run), *CPU, "-o", str(codes)]) == 0
    assert main(["search", str(run), *CPU, "--codes", str(codes), "--query", str(new / "s31")]) == 0
    for args, message in (
            ([*add, "--data-path", str(new), "--identity", "x"], "--identity names the identity of --files"),
            ([*add, "--files", str(new / "s31"), "--data-path", str(new)], "--files names the items to add: --data-path "
                                                                            "does not apply"),
            ([*add, "--files", str(tmp_path / "none.png")], f"--files {tmp_path / 'none.png'} does not exist"),
            (["index", "add", str(run), "--index", str(tmp_path / "no.opqn"), "--files", str(new / "s31")],
             f"index {tmp_path / 'no.opqn'} does not exist (build one with `opqn index build`)"),
            (["index", "add", str(other), *CPU, "--index", str(index_path), "--files", str(new / "s31")],
             f"{index_path} holds the codes of another model ({run.resolve()}): its assignment weights or codebook "
             "differ from this checkpoint's"),
            (["search", str(other), *CPU, "--index", str(index_path), "--query", str(new / "s31")],
             f"{index_path} holds the codes of another model"),
            (["search", str(other), *CPU, "--codes", str(codes), "--query", str(new / "s31")],
             f"{codes} holds the codes of another model ({run.resolve()}): its assignment weights"),
            (["index", "remove", "--index", str(index_path)], "name the items to remove: --ids or --identity"),
            (["index", "remove", "--index", str(index_path), "--identity", "s01", "bob", "eve"],
             f"--identity: bob, eve not in {index_path}"),
            (["index", "info", str(tmp_path / "no.opqn")], f"index {tmp_path / 'no.opqn'} does not exist")):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("opqn: error: ") and message in err, (args, err)
    assert torch.equal(OPQNIndex.load(index_path).codes, OPQNIndex.load(built).codes)  # nothing changed


def test_commands_changing_one_index_wait_for_each_other(tmp_path, gallery):
    """An add started while another command holds the index waits for it, then adds to what that
    command saved: no command's items are lost."""
    run, faces, new, built = gallery
    index_path = tmp_path / "faces.opqn"
    shutil.copy(built, index_path)
    fd = os.open(tmp_path / ".faces.opqn.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another command, between its load and its save
    try:
        adding = subprocess.Popen([sys.executable, "-m", "opqn_ext.cli", "index", "add", str(run), *CPU,
                                   "--index", str(index_path), "--files", str(new / "s31")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        waited, deadline = "", time.monotonic() + 120
        while "waiting for" not in waited and time.monotonic() < deadline and adding.poll() is None:
            if select.select([adding.stderr], [], [], 1.0)[0]:
                waited += os.read(adding.stderr.fileno(), 4096).decode()
        assert f"waiting for another opqn command changing {index_path} (it holds " in waited, waited
        assert torch.equal(OPQNIndex.load(index_path).ids, torch.arange(300))  # nothing saved while it waits
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    out, err = adding.communicate(timeout=120)
    assert adding.returncode == 0, err
    index = OPQNIndex.load(index_path)
    assert len(index) == 310 and index.ids[-10:].tolist() == list(range(300, 310))


def test_item_sources_name_items_by_id(tmp_path):
    classes, relabel = merged_classes(["ann", "bob"], ["cy", "bob", "dee"])
    assert classes == ["ann", "bob", "cy", "dee"]
    assert relabel(torch.tensor([0, 1, 2, -1, 1])).tolist() == [2, 1, 3, -1, 1]
    assert identity_names(classes, torch.tensor([[3, -1], [7, 0]])) == [["dee", None], [None, "ann"]]
    sources = [files_source(["b.png", "c.png"], 10), files_source([str(tmp_path / "a.png")], 2)]
    assert next_free_id(torch.tensor([0, 1, 2]), {"sources": sources}) == 12
    assert next_free_id(torch.tensor([0, 40]), {"sources": sources}) == 41
    assert next_free_id(torch.zeros(0, dtype=torch.int64), {}) == 0
    files, why = item_files(sources, torch.tensor([[2, 3, 10], [11, 12, 0]]))
    assert files == [[str(tmp_path / "a.png"), None, os.path.abspath("b.png")], [os.path.abspath("c.png"), None, None]]
    assert why == []


def test_eval_of_queries_against_an_index(tmp_path, capsys, gallery):
    """`opqn eval --index`: a data set's queries against an index, relevant by identity name; the
    split's queries against an index of its database give `opqn eval`'s OPQN metrics exactly."""
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--width", "4", "--out-dir", str(run), "--no-progress"]) == 0
    assert main(["eval", str(run), *CPU, "--json", str(tmp_path / "e.json"), "--pr-curve", str(tmp_path / "e.png")]) == 0
    assert main(["index", "build", str(run), *CPU, "-o", str(tmp_path / "db.opqn")]) == 0
    assert main(["eval", str(run), *CPU, "--index", str(tmp_path / "db.opqn"), "--json", str(tmp_path / "i.json"),
                 "--pr-curve", str(tmp_path / "i.png")]) == 0
    whole, against_index = (json.loads((tmp_path / name).read_text()) for name in ("e.json", "i.json"))
    assert {k: v for k, v in against_index["opqn"].items() if k not in ("seconds", "query_ms")} == \
        {k: v for k, v in whole["opqn"].items() if k not in ("seconds", "query_ms")}  # the PR curves too
    out = capsys.readouterr().out
    assert against_index["left_out"] == 0 and "orl (query): 120 queries against" in out
    assert f"wrote {tmp_path / 'e.png'}" in out and f"wrote {tmp_path / 'i.png'}" in out
    for curve in (whole["float"]["pr_curve"], whole["opqn"]["pr_curve"]):
        assert len(curve["cutoffs"]) == len(curve["precision"]) == len(curve["recall"]) > 10
        assert curve["cutoffs"][0] == 1 and curve["cutoffs"][-1] == 280 and curve["recall"][-1] == 1.0
        assert curve["recall"] == sorted(curve["recall"]) and curve["precision"][-1] == pytest.approx(7 / 280)
    for name in ("e.png", "i.png"):
        with Image.open(tmp_path / name) as figure:
            assert figure.format == "PNG"

    gallery_run, faces, new, built = gallery
    index_path = tmp_path / "faces.opqn"
    shutil.copy(built, index_path)
    probes = ["eval", str(gallery_run), *CPU, "--index", str(index_path), "--data-path", str(new), "--part", "all"]
    assert main(probes) == 2
    assert f"none of the 100 queries is of an identity that {index_path} holds items of" in capsys.readouterr().err
    assert main(["index", "add", str(gallery_run), *CPU, "--index", str(index_path), "--files", str(new / "s31"),
                 "--identity", "s31"]) == 0
    capsys.readouterr()
    assert main([*probes, "--json", str(tmp_path / "p.json")]) == 0
    assert f"folder (all): 10 queries against {index_path} (310 items); 90 queries of identities without items " \
           "there left out" in capsys.readouterr().out
    probe = json.loads((tmp_path / "p.json").read_text())
    assert probe["left_out"] == 90 and probe["opqn"]["queries"] == 10 and probe["opqn"]["database"] == 310
    assert main(["eval", str(gallery_run), *CPU, "--part", "all"]) == 2
    assert "--part chooses the queries that --index is evaluated with" in capsys.readouterr().err


def test_search_with_a_minimum_score_may_match_no_one(tmp_path, capsys, gallery):
    run, faces, new, built = gallery
    everyone = search(run, built, new / "s40" / "00.png", tmp_path, k=300)  # the whole index, ranked
    scores = sorted({x["score"] for x in everyone.values()}, reverse=True)
    assert len(scores) > 1
    threshold = (scores[0] + scores[1]) / 2  # between the best score and the next
    assert main(["search", str(run), *CPU, "--index", str(built), "--query", str(new / "s40" / "00.png"), "-k", "300",
                 "--min-score", str(threshold), "--json", str(tmp_path / "m.json")]) == 0
    (kept,) = json.loads((tmp_path / "m.json").read_text())
    assert kept["results"] == [x for x in everyone.values() if x["score"] == scores[0]]
    capsys.readouterr()
    assert main(["search", str(run), *CPU, "--index", str(built), "--query", str(new / "s40" / "00.png"),
                 "--min-score", str(scores[0] + 1), "--json", str(tmp_path / "m.json")]) == 0
    assert f"no item scores {scores[0] + 1} or more" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text())[0]["results"] == []


def test_search_for_every_item_above_a_score(tmp_path, capsys, gallery):
    run, faces, new, built = gallery
    probes = [new / "s40" / "00.png", faces / "s07" / "03.png"]
    assert main(["search", str(run), *CPU, "--index", str(built), "--query", *map(str, probes), "-k", "300",
                 "--json", str(tmp_path / "all.json")]) == 0
    ranked = [r["results"] for r in json.loads((tmp_path / "all.json").read_text())]  # the whole index, each
    threshold = sorted(x["score"] for x in ranked[1])[-25]  # 25 or more items for one probe
    capsys.readouterr()
    assert main(["search", str(run), *CPU, "--index", str(built), "--query", *map(str, probes), "--min-score",
                 str(threshold), "--all", "--json", str(tmp_path / "range.json")]) == 0
    assert "2 queries x 300 codes, every item scoring at least" in capsys.readouterr().out
    got = [r["results"] for r in json.loads((tmp_path / "range.json").read_text())]
    assert got == [[x for x in row if x["score"] >= threshold] for row in ranked] and len(got[1]) >= 25
    assert main(["search", str(run), *CPU, "--index", str(built), "--query", *map(str, probes), "--min-score",
                 str(threshold), "--all", "--identities", "s07", "--json", str(tmp_path / "s07.json")]) == 0
    among = json.loads((tmp_path / "s07.json").read_text())[1]  # the same batch of probes: the same features
    assert among["results"] == [x for x in got[1] if x["identity"] == "s07"] != []
    for args, message in ((["--all"], "--all returns every item scoring at least --min-score: give --min-score"),
                          (["--all", "--min-score", "1", "--fast-scan"], "--all scans every code exactly: "
                                                                         "--fast-scan does not apply"),
                          (["--min-score", "nan"], "--min-score must be a number, got nan")):
        assert main(["search", str(run), *CPU, "--index", str(built), "--query", str(probes[0]), *args]) == 2
        assert message in capsys.readouterr().err


def test_search_among_some_identities_returns_only_their_items(tmp_path, capsys, gallery):
    run, faces, new, built = gallery
    probe = new / "s40" / "00.png"
    everyone = search(run, built, probe, tmp_path, k=300)  # the whole index, ranked
    among = {"s03", "s17"}
    assert main(["search", str(run), *CPU, "--index", str(built), "--query", str(probe), "-k", "20",
                 "--identities", *sorted(among), "--json", str(tmp_path / "a.json")]) == 0
    assert "1 queries x 20 codes, top-20" in capsys.readouterr().out
    (result,) = json.loads((tmp_path / "a.json").read_text())
    assert result["results"] == [x for x in everyone.values() if x["identity"] in among]  # in rank order
    assert main(["search", str(run), *CPU, "--index", str(built), "--query", str(probe), "-k", "11",
                 "--identities", "s03", "--json", str(tmp_path / "b.json")]) == 0
    (result,) = json.loads((tmp_path / "b.json").read_text())  # -k beyond the identity's 10 items: all of them
    assert result["results"] == [x for x in everyone.values() if x["identity"] == "s03"]
    for args, message in ((["--identities", "s03", "carol", "dave"], "--identities: the index holds no identity "
                                                                     "carol, dave"),
                          (["--identities", "s03", "-k", "0"], "-k must be >= 1, got 0")):
        assert main(["search", str(run), *CPU, "--index", str(built), "--query", str(probe), *args]) == 2
        assert message in capsys.readouterr().err


def test_adding_the_same_items_twice_is_refused_until_they_are_removed(tmp_path, capsys, gallery):
    run, faces, new, built = gallery
    index_path = tmp_path / "faces.opqn"
    shutil.copy(built, index_path)
    add = ["index", "add", str(run), *CPU, "--index", str(index_path)]
    assert main([*add, "--data-path", str(faces)]) == 2  # the folder the index was built of
    assert (f"the folder {faces}, unchanged since, is in the index already (items of ids 0-299): adding them again "
            f"would hold each twice (remove them first with `opqn index remove --ids`)") in capsys.readouterr().err
    photos = [new / "s31" / "00.png", new / "s31" / "01.png", new / "s32" / "00.png", new / "s32" / "01.png"]
    assert main([*add, "--files", *map(str, photos)]) == 0
    assert main([*add, "--files", str(new / "s33" / "00.png"), *map(str, photos)]) == 2
    assert (f"already in the index: {photos[0]} (id 300), {photos[1]} (id 301), {photos[2]} (id 302) and 1 more: "
            "adding them again") in capsys.readouterr().err
    assert main(["index", "remove", "--index", str(index_path), "--ids", "300", "301", "302", "303"]) == 0
    assert main([*add, "--files", str(photos[0])]) == 0  # removed: it may come back, under a new id
    assert "(id 304)" in capsys.readouterr().out
    mine = tmp_path / "mine"  # a folder of this test's own, which it may change
    for name in ("s01", "s02"):
        shutil.copytree(faces / name, mine / name)
    assert main(["index", "build", str(run), *CPU, "--data-path", str(mine), "--part", "all", "-o",
                 str(tmp_path / "mine.opqn")]) == 0
    again = ["index", "add", str(run), *CPU, "--index", str(tmp_path / "mine.opqn"), "--data-path", str(mine)]
    assert main(again) == 2 and "is in the index already (items of ids 0-19)" in capsys.readouterr().err
    (mine / "s02" / "10.png").write_bytes((mine / "s02" / "00.png").read_bytes())  # another set of images now
    assert main(again) == 0 and len(OPQNIndex.load(tmp_path / "mine.opqn")) == 41


def test_indexes_built_apart_merge_into_the_index_that_adding_to_one_makes(tmp_path, capsys, gallery):
    run, faces, new, built = gallery
    part, added = tmp_path / "new.opqn", tmp_path / "added.opqn"
    carol = ["--files", str(new / "s31" / "00.png"), "--identity", "carol"]
    assert main(["index", "build", str(run), *CPU, "--data-path", str(new), "--part", "all", "-o", str(part)]) == 0
    assert main(["index", "add", str(run), *CPU, "--index", str(part), *carol]) == 0
    shutil.copy(built, added)  # the same items added to the gallery one after the other
    assert main(["index", "add", str(run), *CPU, "--index", str(added), "--data-path", str(new)]) == 0
    assert main(["index", "add", str(run), *CPU, "--index", str(added), *carol]) == 0
    capsys.readouterr()

    merged = tmp_path / "merged.opqn"
    assert main(["index", "merge", str(built), str(part), "-o", str(merged)]) == 2
    assert (f"{part} holds ids that the indexes before it hold too (0, 1, 2, 3, 4, ...); --renumber gives each "
            f"index's items ids after those before it") in capsys.readouterr().err
    assert main(["index", "merge", str(built), str(part), "-o", str(merged), "--renumber"]) == 0
    out = capsys.readouterr().out
    assert f"{part}: ids 0-100 -> ids 300-400\nmerged 2 indexes -> {merged}: 401 items, 41 identities" in out
    got, want = OPQNIndex.load(merged), OPQNIndex.load(added)
    for name in ("codes", "ids", "labels"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.settings == want.settings  # identities by name, sources with their new ids, the model's settings
    found = search(run, merged, new / "s33" / "05.png", tmp_path, k=401)
    assert found[325]["file"] == str(new / "s33" / "05.png") and found[325]["identity"] == "s33"
    assert found[400]["file"] == str(new / "s31" / "00.png") and found[400]["identity"] == "carol"

    halves = [tmp_path / "database.opqn", tmp_path / "query.opqn"]  # disjoint ids of one folder: kept
    for half, name in zip(halves, ("database", "query")):
        assert main(["index", "build", str(run), *CPU, "--part", name, "-o", str(half)]) == 0
    assert main(["index", "merge", *map(str, halves), "-o", str(merged)]) == 0
    got, want = OPQNIndex.load(merged), OPQNIndex.load(built)  # built: --part all
    for name in ("codes", "ids", "labels"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.settings == want.settings
    assert main(["index", "merge", str(merged), str(part), "-o", str(merged), "--renumber"]) == 0  # in place
    assert len(OPQNIndex.load(merged)) == 401

    sharded = tmp_path / "sharded.opqn"  # what ShardedIndex.save on 2 ranks writes: shard files only
    for rank, half in enumerate(halves):
        shutil.copy(half, f"{sharded}.shard{rank:05d}-of-00002")
    assert main(["index", "info", str(sharded)]) == 2
    assert (f"index {sharded} does not exist, but the shard files of 2 ranks do: make one index of them with "
            f"`opqn index merge {sharded}.shard*-of-00002 -o {sharded}`") in capsys.readouterr().err
    assert main(["index", "merge", *sorted(map(str, tmp_path.glob("sharded.opqn.shard*-of-00002"))),
                 "-o", str(sharded)]) == 0
    assert main(["index", "info", str(sharded)]) == 0 and "300 items" in capsys.readouterr().out


def test_indexes_that_cannot_be_merged_are_refused_with_the_reason(tmp_path, capsys, gallery):
    run, faces, new, built = gallery
    part = tmp_path / "new.opqn"
    assert main(["index", "build", str(run), *CPU, "--data-path", str(new), "--part", "all", "-o", str(part)]) == 0
    other = OPQNIndex.load(built)
    other.assign_weight = torch.randn_like(other.assign_weight)
    other.save(tmp_path / "other.opqn")
    unnamed = OPQNIndex.load(part)
    unnamed.settings = {}
    unnamed.save(tmp_path / "unnamed.opqn")
    short = OPQNIndex.load(part)
    short.settings["classes"] = short.settings["classes"][:3]  # items of labels 3-9 have no name
    short.save(tmp_path / "short.opqn")
    shrunk = OPQNIndex.load(built)
    shrunk.remove(torch.arange(100))  # ids 100-299 left; the folder's source still names 0-299
    shrunk.save(tmp_path / "shrunk.opqn")
    merged = str(tmp_path / "merged.opqn")
    for inputs, message in (
            ([built, tmp_path / "other.opqn"], f"{tmp_path / 'other.opqn'} cannot be merged with {built}: its "
                                               f"assignment weights differ (another model made its codes)"),
            ([built, tmp_path / "unnamed.opqn", "--renumber"], "one index names its identities and the other does "
                                                               "not, so their labels cannot be matched"),
            ([built, tmp_path / "short.opqn", "--renumber"], f"{tmp_path / 'short.opqn'}: labels 3 and above have "
                                                             f"no identity name"),
            ([tmp_path / "shrunk.opqn", part], f"{part}: its items of ids 0-99 come from another source than those "
                                               f"of ids 0-299 before it; --renumber gives each index's items ids"),
            ([built, tmp_path / "none.opqn"], f"index {tmp_path / 'none.opqn'} does not exist")):
        assert main(["index", "merge", *map(str, inputs), "-o", merged]) == 2
        assert message in capsys.readouterr().err
        assert not os.path.exists(merged)


def test_a_command_scans_each_folder_it_names_items_of_once(tmp_path, monkeypatch, capsys, gallery):
    from opqn_ext import item_sources

    run, faces, new, built = gallery
    scanned, scan = [], item_sources.scan_image_folder

    def counted(root):
        scanned.append(str(root))
        return scan(root)

    monkeypatch.setattr(item_sources, "scan_image_folder", counted)
    searches = (["--query", str(new / "s33" / "05.png")],  # names the results, then shows them
                ["--data-path", str(faces), "--show", "2"])  # and shows the data set's own queries
    for args in searches:
        scanned.clear()
        assert main(["search", str(run), *CPU, "--index", str(built), *args, "-k", "3",
                     "--montage", str(tmp_path / "m.png"), "--json", str(tmp_path / "r.json")]) == 0
        assert scanned == [str(faces)], args
        found = json.loads((tmp_path / "r.json").read_text())[0]["results"]
        assert all(x["file"].startswith(str(faces)) for x in found)
    scanned.clear()
    assert main(["index", "info", str(built)]) == 0 and main(["index", "info", str(built)]) == 0
    assert scanned == [str(faces), str(faces)]  # one per command: a later command sees the folder as it is then


def test_a_folder_named_by_a_relative_path_is_listed_once_by_its_absolute_one(tmp_path, monkeypatch, orl_folder):
    from opqn_ext import item_sources

    shutil.copytree(orl_folder / "s01", tmp_path / "faces" / "s01")
    monkeypatch.chdir(tmp_path)
    with item_sources.folder_listings():
        source = item_sources.folder_source("faces")
        paths, why = item_sources.folder_paths(source)
    assert why == "" and source["root"] == str(tmp_path / "faces") and len(paths) == source["count"] == 10
    assert paths[0] == str(tmp_path / "faces" / "s01" / "00.png")  # absolute, as without the scope
    assert source == item_sources.folder_source(tmp_path / "faces")  # the fingerprint: whichever path names it
