"""Tests for `fastmice data imagenet-dog`: the ImageNet-Dog builder on a tiny fake ILSVRC2012 tree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmice.cli import main
from fastmice.config import load_config
from fastmice.data.imagenet_dog import (
    EXPECTED_TOTAL,
    IMAGENET_DOG_CLASSES,
    build_imagenet_dog,
    class_folder,
    find_train_dir,
    resize_image,
)
from fastmice.data.sources import DataError, load_dataset

WNIDS = [w for w, _ in IMAGENET_DOG_CLASSES]
DISTRACTORS = ("n01440764", "n02123045")  # tench, tabby cat: must be ignored
SIZES = ((40, 30), (30, 52), (24, 24))  # (w, h) of the 3 images per class


def _colour(label: int) -> tuple[int, int, int]:
    return (15 * label + 10, 200 - 10 * label, 128)


def make_imagenet(train: Path) -> None:
    """3 JPEGs per dog class (flat colour by label; class 1's third is grayscale, class 2's third
    CMYK), a corrupt file in class 3, and two distractor classes."""
    for label, wnid in enumerate(list(WNIDS) + list(DISTRACTORS)):
        d = train / wnid
        d.mkdir(parents=True)
        for j, wh in enumerate(SIZES):
            im = Image.new("RGB", wh, _colour(label % 15))
            if j == 2 and label == 1:
                im = im.convert("L")
            if j == 2 and label == 2:
                im = im.convert("CMYK")
            im.save(d / f"{wnid}_{j + 1}.JPEG", quality=95)
    (train / WNIDS[3] / f"{WNIDS[3]}_999.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (train / WNIDS[0] / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The fake tree in the usual ROOT/train layout, built at the default 96 px."""
    base = tmp_path_factory.mktemp("dog")
    make_imagenet(base / "imagenet" / "train")
    out = build_imagenet_dog(base / "imagenet", base / "out", num_workers=2, progress=False)
    return base, out


def _pngs(out: Path) -> list[Path]:
    return sorted((out / "train").rglob("*.png"))


def test_build_writes_only_the_15_classes_as_96px_rgb_png(built):
    _, out = built
    folders = sorted(p.name for p in (out / "train").iterdir())
    assert folders == [class_folder(i) for i in range(15)]
    assert folders[0] == "00_n02085936_maltese_dog" and folders[14] == "14_n02112137_chow"
    assert not any(w in f for f in folders for w in DISTRACTORS)
    for i, f in enumerate(folders):
        names = sorted(p.name for p in (out / "train" / f).iterdir())
        assert names == [f"{WNIDS[i]}_{j}.png" for j in (1, 2, 3)]  # corrupt one and notes.txt absent
    for p in _pngs(out):
        with Image.open(p) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (96, 96))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and (manifest["size"], manifest["resize"]) == (96, "crop")
    assert manifest["total"] == 45 and manifest["skipped"] == 1
    assert [c["count"] for c in manifest["classes"]] == [3] * 15
    assert [c["wnid"] for c in manifest["classes"]] == WNIDS
    lines = (out / "classes.txt").read_text().splitlines()
    assert lines[0] == "0 n02085936 Maltese dog" and len(lines) == 15
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].split("\t")[0].endswith(f"{WNIDS[3]}_999.JPEG")


def test_grayscale_and_cmyk_become_rgb(built):
    _, out = built
    gray = np.asarray(Image.open(out / "train" / class_folder(1) / f"{WNIDS[1]}_3.png"))
    assert gray.shape == (96, 96, 3) and (gray[..., 0] == gray[..., 1]).all()
    cmyk = np.asarray(Image.open(out / "train" / class_folder(2) / f"{WNIDS[2]}_3.png")).astype(int)
    assert np.abs(cmyk - np.array(_colour(2))).max() <= 8  # colours survive the CMYK round trip


def test_labels_follow_the_class_list_through_the_config(built):
    _, out = built
    cfg = load_config("imagenet_dog", [f"--data.root={out}"]).data
    assert cfg.splits == ["train"] and cfg.image_size == 96
    ds = load_dataset(cfg, progress=False)
    assert len(ds) == 45 and ds.image_size == (96, 96)
    assert ds.class_names == [class_folder(i) for i in range(15)]
    assert torch.bincount(ds.labels).tolist() == [3] * 15
    for path, label in zip(ds.paths, ds.labels.tolist()):
        assert Path(path).name.startswith(WNIDS[label])
        if not Path(path).name.endswith("_3.png") or label not in (1, 2):
            img = ds.images[ds.paths.index(path)].to(torch.int64)
            want = torch.tensor(_colour(label)).view(3, 1, 1)
            assert (img - want).abs().max() <= 4


def test_rerun_is_idempotent_and_force_rebuilds(built, capsys):
    base, out = built
    before = {p: p.stat().st_mtime_ns for p in _pngs(out)}
    build_imagenet_dog(base / "imagenet", out, num_workers=0, progress=False)
    text = capsys.readouterr()
    assert "0 written, 45 already there" in text.out
    assert {p: p.stat().st_mtime_ns for p in _pngs(out)} == before
    assert "skipped 1 unreadable" in text.err and f"not the {EXPECTED_TOTAL:,}" in text.err
    with pytest.raises(DataError, match="size=96.*--force"):
        build_imagenet_dog(base / "imagenet", out, size=32, progress=False)
    stale = out / "train" / class_folder(0) / "stale.png"
    Image.new("RGB", (96, 96)).save(stale)
    build_imagenet_dog(base / "imagenet", out, force=True, num_workers=2, progress=False)
    assert not stale.exists() and len(_pngs(out)) == 45
    assert "45 written, 0 already there" in capsys.readouterr().out


@pytest.mark.parametrize("layout", ["", "ILSVRC/Data/CLS-LOC/train"])
def test_other_layouts_are_found(tmp_path, layout, capsys):
    root = tmp_path / "ILSVRC2012"
    make_imagenet(root / layout if layout else root)
    want = (root / layout if layout else root).resolve()
    assert find_train_dir(root) == want
    out = build_imagenet_dog(root, tmp_path / "out", size=8, resize="squash", num_workers=0,
                             progress=False)
    assert len(_pngs(out)) == 45
    assert "total                45" in capsys.readouterr().out


def test_cli_builds_and_reports(tmp_path, capsys):
    make_imagenet(tmp_path / "in" / "train")
    rc = main(["data", "imagenet-dog", str(tmp_path / "in"), str(tmp_path / "out"), "--size", "16",
               "--resize", "squash", "--workers", "2", "--no-progress"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "ready:" in text.out and "Maltese dog" in text.out and "skipped.txt" in text.err
    pngs = _pngs(tmp_path / "out")
    assert len(pngs) == 45 and all(Image.open(p).size == (16, 16) for p in pngs)
    assert main(["data", "imagenet-dog", str(tmp_path / "nowhere")]) == 1
    assert str(tmp_path / "nowhere") in capsys.readouterr().err


def test_missing_and_empty_class_folders(tmp_path):
    train = tmp_path / "in" / "train"
    make_imagenet(train)
    for wnid in (WNIDS[4], WNIDS[14]):
        for f in (train / wnid).iterdir():
            f.unlink()
    with pytest.raises(DataError, match=f"{WNIDS[4]}.*contains no images"):
        build_imagenet_dog(tmp_path / "in", tmp_path / "out", size=8, progress=False)
    (train / WNIDS[4]).rmdir()
    (train / WNIDS[14]).rmdir()
    with pytest.raises(DataError, match=f"2 of the 15.*{WNIDS[4]} \\(giant schnauzer\\).*{WNIDS[14]}"):
        build_imagenet_dog(tmp_path / "in", tmp_path / "out", size=8, progress=False)
    with pytest.raises(DataError, match="does not exist"):
        build_imagenet_dog(tmp_path / "missing", tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="no ImageNet-Dog class folder"):
        build_imagenet_dog(tmp_path, tmp_path / "out", progress=False)


def test_resize_modes():
    wide = Image.new("RGB", (60, 20), (0, 0, 255))
    wide.paste((255, 0, 0), (20, 0, 40, 20))  # red centre square, blue sides
    crop = np.asarray(resize_image(wide, 10, "crop")).astype(int)
    assert crop.shape == (10, 10, 3)  # edge columns see a little blue through the bicubic kernel
    assert (crop[:, 1:-1, 0] == 255).all() and (crop[:, 1:-1, 2] == 0).all() and (crop[..., 0] > 200).all()
    squash = np.asarray(resize_image(wide, 10, "squash"))
    assert (squash[:, 0, 2] > 240).all() and (squash[:, 5, 0] > 240).all()
    assert resize_image(Image.new("L", (5, 9)), 4).mode == "RGB"
