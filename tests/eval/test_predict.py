"""`fastmice predict` and the notebook API on a tiny trained run: files, folder trees, corrupt files, alignment."""
import argparse
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import tiny_overrides, tiny_run, write_digit_folder
from fastmice.api import Clustering
from fastmice.cli import main
from fastmice.data.sources import DataError, load_digits
from fastmice.eval.predict import NpyRowWriter, add_predict_arguments, list_images, predict
from fastmice.eval.run import load_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def image_tree(run_dir, tmp_path_factory):
    """26 readable images in nested folders (mixed case, other sizes, JPEG, BMP), one corrupt file,
    a hidden file and a text file (both ignored), and one image outside given as a file."""
    src = sorted((run_dir.parent / "images").rglob("*.png"))
    root = tmp_path_factory.mktemp("tree") / "photos"
    for i, f in enumerate(src[:22]):
        sub = root / ["", "a", "a/b", "c"][i % 4]
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, sub / (f.stem + (".PNG" if i % 5 == 0 else ".png")))
    big = Image.open(src[22]).resize((40, 30), Image.Resampling.NEAREST)  # any size: resized like training
    big.save(root / "a" / "big.png")
    big.convert("RGB").save(root / "c" / "photo.JPG", quality=95)
    Image.open(src[23]).save(root / "a" / "b" / "bitmap.bmp")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    shutil.copy(src[24], root / "a" / ".hidden.png")
    (root / "c" / "notes.txt").write_text("not an image")
    extra = root.parent / "extra.png"
    shutil.copy(src[25], extra)
    return root, extra


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_listing_is_recursive_sorted_and_case_insensitive(image_tree):
    root, extra = image_tree
    files = list_images([root, extra, root / "a" / "big.png"])  # a file inside a listed folder: once
    names = [Path(f).name for f in files]
    assert len(files) == 27 and files[-1] == str(extra) and names.count("big.png") == 1
    assert "photo.JPG" in names and "bitmap.bmp" in names and "broken.png" in names
    assert ".hidden.png" not in names and "notes.txt" not in names
    assert all(Path(f).is_absolute() for f in files)
    with pytest.raises(FileNotFoundError, match="no/such"):
        list_images([root / "no/such"])
    empty = root.parent / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images found"):
        list_images([empty])


def test_predict_tree_with_corrupt_file_and_aligned_embeddings(run_dir, image_tree, tmp_path, capsys):
    root, extra = image_tree
    out = tmp_path / "out" / "preds.csv"
    # chunk=7: several chunks, a corrupt file inside one, decoding one chunk ahead of inference.
    # On the CPU like the API below: on a GPU, bf16 would differ from the float32 re-embedding.
    result = predict(load_run(run_dir, "cpu"), [root, extra], out, embeddings="both", chunk=7, progress=False)
    assert "skipped 1 unreadable" in capsys.readouterr().err
    rows = read_csv(out)
    assert list(rows[0]) == ["path", "cluster", "confidence", "runner_up", "runner_up_confidence"]
    assert len(rows) == result["num_images"] == 26 and result["num_skipped"] == 1
    assert rows[-1]["path"] == str(extra) and not any("broken" in r["path"] for r in rows)
    skipped = (tmp_path / "out" / "preds.skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(str(root / "a" / "broken.png") + "\t")
    for r in rows:
        assert 0 <= int(r["cluster"]) < 10 and int(r["runner_up"]) != int(r["cluster"])
        assert 1 >= float(r["confidence"]) >= float(r["runner_up_confidence"]) >= 0
    assert sum(result["cluster_sizes"]) == 26

    gating = np.load(tmp_path / "out" / "preds.gating.npy")
    features = np.load(tmp_path / "out" / "preds.features.npy")
    assert gating.dtype == features.dtype == np.float32
    assert gating.shape == (26, 16) and features.shape[0] == 26
    np.testing.assert_allclose(np.linalg.norm(gating, axis=1), 1, atol=1e-5)
    # Row i of each .npy is the embedding of the file in CSV row i: re-embed files one at a time.
    api = Clustering.load(run_dir, device="cpu")
    for i in (0, 6, 7, 13, 25):
        alone = api.embed([rows[i]["path"]])
        np.testing.assert_allclose(alone["gating"][0], gating[i], atol=1e-4)
        np.testing.assert_allclose(alone["features"][0], features[i], rtol=1e-4, atol=1e-4)


def test_predict_matches_training_assignments(run_dir, tmp_path):
    """The same files decode to the same pixels as in training, so the clusters are the training ones."""
    out = tmp_path / "train.csv"
    predict(str(run_dir), [run_dir.parent / "images"], out, progress=False)  # on the training's device
    assigned = {r["path"]: r for r in read_csv(run_dir / "assignments.csv")}
    rows = read_csv(out)
    assert len(rows) == len(assigned) == 320
    for r in rows:
        a = assigned[r["path"]]
        assert r["cluster"] == a["cluster"] and abs(float(r["confidence"]) - float(a["confidence"])) < 1e-3


def predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmice")
    add_predict_arguments(parser.add_subparsers(dest="command"))
    return parser


def test_cli_and_api_agree(run_dir, image_tree, tmp_path, capsys):
    root, extra = image_tree
    out = tmp_path / "cli.csv"
    args = predict_parser().parse_args(["predict", str(run_dir), str(root), str(extra), "--out", str(out),
                                        "--device", "cpu", "--batch-size", "10"])
    assert args.func(args, []) == 0
    assert "26 images" in capsys.readouterr().out
    rows = read_csv(out)
    paths = [r["path"] for r in rows]
    csv_clusters = np.array([int(r["cluster"]) for r in rows])
    csv_conf = np.array([float(r["confidence"]) for r in rows])

    api = Clustering.load(run_dir, device="cpu")
    assert api.num_clusters == 10 and api.config.method.num_clusters == 10 and api.image_size == 8
    clusters, conf = api.predict(paths)
    np.testing.assert_array_equal(clusters, csv_clusters)
    np.testing.assert_allclose(conf, csv_conf, atol=1e-6)
    # The other input kinds give the same answers: PIL images, uint8 and float tensors of the decoded pixels.
    pils = [Image.open(p) for p in paths]
    np.testing.assert_array_equal(api.predict(pils)[0], csv_clusters)
    pixels = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB").resize((8, 8)))
                                        for p in paths[:4]])).permute(0, 3, 1, 2)
    c8, _ = api.predict(pixels)
    np.testing.assert_array_equal(c8, csv_clusters[:4])  # the first files are 8 px already
    np.testing.assert_array_equal(api.predict(pixels.float() / 255)[0], c8)
    np.testing.assert_array_equal(api.predict(pixels[0])[0], c8[:1])  # one (3, H, W) image
    emb = api.embed(pixels.numpy())
    assert emb["gating"].shape == (4, 16) and emb["features"].shape[0] == 4


def test_api_rejects_bad_input(run_dir, image_tree):
    root, _ = image_tree
    api = Clustering.load(run_dir, device="cpu")
    with pytest.raises(DataError, match="broken.png"):
        api.predict([str(root / "a" / "broken.png")])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        api.predict(torch.full((1, 3, 8, 8), 2.0))
    with pytest.raises(ValueError, match="N, 3, H, W"):
        api.predict(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_nothing_readable_is_an_error(run_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match="none of the 1 files"):
        predict(run_dir, [bad], tmp_path / "p.csv", progress=False)
    assert (tmp_path / "p.skipped.txt").read_text().startswith(str(bad / "x.jpg"))


def test_predict_help_text():
    help_text = predict_parser()._subparsers._group_actions[0].choices["predict"].format_help()
    for word in ("IMAGES", "--out", "--embeddings", "{gating,features,both}", "--device", "--batch-size",
                 "runner_up", "skipped.txt", "recursively"):
        assert word in help_text, word


def test_npy_row_writer(tmp_path):
    w = NpyRowWriter(tmp_path / "x.npy")
    parts = [np.random.default_rng(i).random((n, 5)) for i, n in enumerate((3, 0, 7))]
    for a in parts:
        w.append(a)
    w.close()
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.concatenate(parts).astype(np.float32))
    empty = NpyRowWriter(tmp_path / "empty.npy")
    empty.close()
    assert np.load(tmp_path / "empty.npy").shape == (0, 0)
