"""Tests for the data sources layer: readers, the folder cache, and `fastmice data`."""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmice.data import folder as folder_mod
from fastmice.data import prepare
from fastmice.data.prepare import add_data_arguments, channel_stats, run_data_command
from fastmice.data.sources import (
    CIFAR10_CLASSES,
    CIFAR100_SUPERCLASS,
    CIFAR100_SUPERCLASS_NAMES,
    DataError,
    DataSourceConfig,
    ImageDataset,
    load_cifar,
    load_dataset,
    load_digits,
    load_image_folder,
    load_stl10,
)

REAL_CIFAR_JPEG = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpeg"

# CIFAR-100 fine names in label order, and the official superclass membership, written out
# independently of CIFAR100_SUPERCLASS so the table is checked against a second source.
FINE_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
    "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup "
    "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
    "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid "
    "otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road "
    "rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower "
    "sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale "
    "willow_tree wolf woman worm"
).split()
SUPERCLASS_MEMBERS = {
    "aquatic_mammals": "beaver dolphin otter seal whale",
    "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip",
    "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe",
    "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk",
    "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman",
    "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train",
    "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}


def reference_coarse() -> list[int]:
    sup_ids = {name: i for i, name in enumerate(SUPERCLASS_MEMBERS)}
    of_fine = {f: sup_ids[s] for s, members in SUPERCLASS_MEMBERS.items() for f in members.split()}
    return [of_fine[f] for f in FINE_NAMES]


# ----------------------------------------------------------------------------------------------
# fixture writers


def rng_images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, h, w), dtype=np.uint8)


def write_pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar10(root: Path, per_batch: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Fake cifar-10-batches-py; returns the images (N, 3, 32, 32) and labels in load order."""
    base = root / "cifar-10-batches-py"
    xs, ys = [], []
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        x = rng_images(per_batch, seed=k)
        y = [(k + j) % 10 for j in range(per_batch)]
        write_pickle(base / name, {b"batch_label": name.encode(), b"labels": y,
                                   b"data": x.reshape(per_batch, -1)})
        xs.append(x)
        ys += y
    return np.concatenate(xs), np.array(ys)


def make_cifar100(root: Path, fine_by_split: dict[str, list[int]], meta: bool = True,
                  coarse: list[int] | None = None) -> None:
    base = root / "cifar-100-python"
    coarse = coarse or reference_coarse()
    for k, (split, fine) in enumerate(fine_by_split.items()):
        write_pickle(base / split, {b"fine_labels": fine, b"coarse_labels": [coarse[f] for f in fine],
                                    b"data": rng_images(len(fine), seed=10 + k).reshape(len(fine), -1)})
    if meta:
        write_pickle(base / "meta", {b"fine_label_names": [n.encode() for n in FINE_NAMES],
                                     b"coarse_label_names": [n.encode() for n in SUPERCLASS_MEMBERS]})


def save_image(path: Path, arr: np.ndarray, fmt: str | None = None, mode: str = "RGB") -> None:
    """``arr`` is (H, W, 3) or (H, W) uint8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path, format=fmt)


def hwc(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def labelled_folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """root/{cat,dog}/ with PNGs (lossless, so pixels can be compared) and mixed-case extensions."""
    root = tmp_path / "imgs"
    pixels = {}
    for i, rel in enumerate(["dog/b.png", "dog/a.PNG", "cat/x.png", "cat/nested/y.png", "cat/z.Png"]):
        pixels[rel] = hwc(8, 8, i)
        save_image(root / rel, pixels[rel], fmt="PNG")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "._a.png").write_bytes(b"macos resource fork")  # hidden: ignored, not "corrupt"
    return root, pixels


# ----------------------------------------------------------------------------------------------
# ImageDataset


def test_image_dataset_subset_keeps_alignment() -> None:
    imgs = torch.from_numpy(rng_images(5, 4, 4))
    ds = ImageDataset(imgs, torch.arange(5), ["a"] * 5, "t", [f"p{i}" for i in range(5)])
    assert len(ds) == 5 and ds.num_classes == 5
    for idx, expect in (([3, 1], [3, 1]), (torch.tensor([3, 1]), [3, 1]), (np.array([3, 1]), [3, 1]),
                        (torch.tensor([False, True, False, True, False]), [1, 3])):
        sub = ds.subset(idx)
        assert sub.labels.tolist() == expect
        assert sub.paths == [f"p{i}" for i in expect]
        assert torch.equal(sub.images, imgs[expect])
    assert ImageDataset(imgs, None, None, "u").num_classes is None
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(imgs.float(), None, None, "bad")
    with pytest.raises(DataError, match="labels"):
        ImageDataset(imgs, torch.arange(4), None, "bad")


# ----------------------------------------------------------------------------------------------
# CIFAR


def test_superclass_table() -> None:
    assert len(CIFAR100_SUPERCLASS) == 100
    assert np.bincount(CIFAR100_SUPERCLASS, minlength=20).tolist() == [5] * 20
    assert CIFAR100_SUPERCLASS[0] == 4 and CIFAR100_SUPERCLASS_NAMES[4] == "fruit_and_vegetables"
    assert CIFAR100_SUPERCLASS[1] == 1 and CIFAR100_SUPERCLASS_NAMES[1] == "fish"
    assert CIFAR100_SUPERCLASS[19] == 11
    assert CIFAR100_SUPERCLASS[58] == 18 and CIFAR100_SUPERCLASS_NAMES[18] == "vehicles_1"
    assert tuple(SUPERCLASS_MEMBERS) == CIFAR100_SUPERCLASS_NAMES
    assert list(CIFAR100_SUPERCLASS) == reference_coarse()


def test_cifar10_layout_and_orientation(tmp_path: Path) -> None:
    x, y = make_cifar10(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        ds = load_cifar(root, "cifar10")
        assert ds.images.shape == (12, 3, 32, 32) and ds.images.dtype == torch.uint8
        assert np.array_equal(ds.images.numpy(), x)  # rows are R, G, B planes, row-major
        assert ds.labels.tolist() == y.tolist()
        assert ds.class_names == list(CIFAR10_CLASSES) and ds.name == "cifar10"


def test_cifar100_fine_and_superclasses(tmp_path: Path) -> None:
    fine = {"train": [0, 1, 19, 58, 99], "test": [2, 3]}
    make_cifar100(tmp_path, fine)
    ds = load_cifar(tmp_path, "cifar100")
    assert ds.labels.tolist() == [0, 1, 19, 58, 99, 2, 3]
    assert ds.class_names[:2] == ["apple", "aquarium_fish"] and len(ds.class_names) == 100
    ds20 = load_cifar(tmp_path / "cifar-100-python", "cifar100_20")
    assert ds20.labels.tolist() == [4, 1, 11, 18, 13, 14, 8]  # equals the fixture's coarse_labels
    assert ds20.class_names == list(CIFAR100_SUPERCLASS_NAMES) and ds20.num_classes == 20
    (tmp_path / "cifar-100-python" / "meta").unlink()
    assert load_cifar(tmp_path, "cifar100").class_names[:3] == ["0", "1", "2"]


def test_cifar100_inconsistent_coarse_labels(tmp_path: Path) -> None:
    wrong = reference_coarse()
    wrong[0] = 7
    make_cifar100(tmp_path, {"train": [0], "test": [1]}, coarse=wrong)
    with pytest.raises(DataError, match="coarse_labels"):
        load_cifar(tmp_path, "cifar100_20")


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_cifar(tmp_path / "nope", "cifar10")
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_cifar(tmp_path, "cifar10")
    with pytest.raises(DataError, match="unknown CIFAR"):
        load_cifar(tmp_path, "cifar1000")
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar(tmp_path, "cifar10")
    # A pickle that references a callable is refused instead of being executed.
    write_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_3", {b"data": os.getcwd})
    with pytest.raises(DataError, match="refusing"):
        load_cifar(tmp_path, "cifar10")


# ----------------------------------------------------------------------------------------------
# STL-10


def make_stl10(root: Path, n_train: int = 2, n_test: int = 3) -> tuple[np.ndarray, np.ndarray]:
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    xs, ys = [], []
    for k, (split, n) in enumerate([("train", n_train), ("test", n_test)]):
        x = rng_images(n, 96, 96, seed=20 + k)  # random: not symmetric, so a wrong transpose shows
        y = np.arange(n) % 10 + 1
        # The file stores each image column-major, i.e. the (3, W, H) array in C order.
        (base / f"{split}_X.bin").write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes())
        (base / f"{split}_y.bin").write_bytes(y.astype(np.uint8).tobytes())
        xs.append(x)
        ys.append(y - 1)
    return np.concatenate(xs), np.concatenate(ys)


def test_stl10(tmp_path: Path) -> None:
    x, y = make_stl10(tmp_path)
    ds = load_stl10(tmp_path)
    assert ds.images.shape == (5, 3, 96, 96) and ds.images.is_contiguous()
    assert np.array_equal(ds.images.numpy(), x)
    assert ds.labels.tolist() == y.tolist() and ds.class_names[0] == "airplane"
    (tmp_path / "stl10_binary" / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    assert load_stl10(tmp_path / "stl10_binary").class_names[9] == "c9"


def test_stl10_errors(tmp_path: Path) -> None:
    make_stl10(tmp_path)
    xp = tmp_path / "stl10_binary" / "test_X.bin"
    xp.write_bytes(xp.read_bytes()[:-10])
    with pytest.raises(DataError, match="test_X.bin.*multiple"):
        load_stl10(tmp_path)
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="expected stl10_binary/train_X.bin"):
        load_stl10(tmp_path / "other")
    (tmp_path / "stl10_binary" / "test_y.bin").unlink()
    with pytest.raises(DataError, match="missing file .*test_y.bin"):
        load_stl10(tmp_path)


# ----------------------------------------------------------------------------------------------
# digits


def test_digits() -> None:
    ds = load_digits()
    assert ds.images.shape == (1797, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert int(ds.images.max()) == 255 and torch.equal(ds.images[:, 0], ds.images[:, 2])
    assert sorted(ds.labels.unique().tolist()) == list(range(10)) and ds.num_classes == 10
    big = load_digits(16)
    assert big.images.shape == (1797, 3, 16, 16) and torch.equal(big.labels, ds.labels)


# ----------------------------------------------------------------------------------------------
# image folders


def test_folder_labelled(labelled_folder) -> None:
    root, pixels = labelled_folder
    ds = load_image_folder(root, progress=False)
    assert ds.class_names == ["cat", "dog"] and ds.name == f"folder:{root.resolve()}"
    rels = [str(Path(p).relative_to(root.resolve())) for p in ds.paths]
    assert sorted(rels) == sorted(pixels) and len(ds) == 5
    for i, rel in enumerate(rels):
        assert ds.labels[i] == (0 if rel.startswith("cat") else 1)
        assert np.array_equal(ds.images[i].permute(1, 2, 0).numpy(), pixels[rel])
    assert ds.skipped == []


def test_folder_grayscale_rgba_jpeg(tmp_path: Path) -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    save_image(tmp_path / "a" / "g.png", gray, mode="L")
    save_image(tmp_path / "a" / "rgba.png", hwc(8, 8, 1), mode="RGBA")
    save_image(tmp_path / "b" / "p.JPEG", hwc(8, 8, 2), fmt="JPEG")
    save_image(tmp_path / "b" / "q.bmp", hwc(8, 8, 3))
    save_image(tmp_path / "b" / "r.webp", hwc(8, 8, 4), fmt="WEBP")
    ds = load_image_folder(tmp_path, progress=False)
    assert ds.images.shape == (5, 3, 8, 8) and ds.labels.tolist() == [0, 0, 1, 1, 1]
    g = ds.images[0]
    assert torch.equal(g[0], torch.from_numpy(gray)) and torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])


def test_folder_splits_and_roots_unify_classes(tmp_path: Path) -> None:
    for rel in ["train/b/1.png", "train/c/1.png", "test/a/1.png", "test/c/1.png", "test/c/2.png"]:
        save_image(tmp_path / "r1" / rel, hwc(6, 6, len(rel)))
    save_image(tmp_path / "r2" / "train" / "d" / "1.png", hwc(6, 6, 0))
    save_image(tmp_path / "r2" / "test" / "a" / "1.png", hwc(6, 6, 0))
    ds = load_image_folder(tmp_path / "r1", splits=["train", "test"], progress=False)
    assert ds.class_names == ["a", "b", "c"]
    assert [Path(p).parent.parent.name for p in ds.paths] == ["train"] * 2 + ["test"] * 3
    assert ds.labels.tolist() == [1, 2, 0, 2, 2]
    both = load_image_folder([tmp_path / "r1", tmp_path / "r2"], splits=["train", "test"], progress=False)
    assert both.class_names == ["a", "b", "c", "d"] and len(both) == 7
    assert both.labels.tolist()[-2:] == [3, 0]
    with pytest.raises(DataError, match="split folder.*val.*does not exist"):
        load_image_folder(tmp_path / "r1", splits=["train", "val"], progress=False)


def test_folder_split_folders_without_splits_warns(tmp_path: Path) -> None:
    for rel in ["test/a/1.png", "train/a/1.png", "train/b/1.png"]:
        save_image(tmp_path / rel, hwc(4, 4, 0))
    with pytest.warns(UserWarning, match=r"look like splits; pass splits=\['train', 'test'\]"):
        ds = load_image_folder(tmp_path, progress=False)
    assert ds.class_names == ["test", "train"]  # still loads as asked, with the warning


def test_folder_unlabelled_nested(tmp_path: Path) -> None:
    save_image(tmp_path / "u" / "top.png", hwc(5, 5, 0))
    save_image(tmp_path / "u" / "deeper" / "more" / "x.jpg", hwc(5, 5, 1), fmt="JPEG")
    with pytest.warns(UserWarning, match="UNLABELLED"):
        ds = load_image_folder(tmp_path / "u", progress=False)
    assert len(ds) == 2 and ds.labels is None and ds.class_names is None and ds.num_classes is None
    flat = tmp_path / "flat"
    save_image(flat / "a.png", hwc(5, 5, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no subfolders with images: no warning
        assert load_image_folder(flat, progress=False).labels is None
    with pytest.raises(DataError, match="cannot mix labelled and unlabelled"):
        load_image_folder([flat, tmp_path / "u" / "deeper"], progress=False)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing_dir does not exist"):
        load_image_folder(tmp_path / "missing_dir", progress=False)
    f = tmp_path / "file.png"
    save_image(f, hwc(4, 4, 0))
    with pytest.raises(DataError, match="is a file"):
        load_image_folder(f, progress=False)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images found"):
        load_image_folder(empty, progress=False)
    save_image(tmp_path / "cls" / "a" / "1.png", hwc(4, 4, 0))
    (tmp_path / "cls" / "b_empty").mkdir()
    save_image(tmp_path / "cls" / "c" / "1.png", hwc(4, 4, 0))
    with pytest.raises(DataError, match=r"b_empty contains no images.*shift the label ids"):
        load_image_folder(tmp_path / "cls", progress=False)
    with pytest.raises(DataError, match="on_corrupt"):
        load_image_folder(tmp_path / "cls", on_corrupt="ignore")


def test_folder_corrupt(tmp_path: Path) -> None:
    for i in range(3):
        save_image(tmp_path / "a" / f"{i}.png", hwc(4, 4, i))
    bad = tmp_path / "a" / "1_bad.jpg"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_image_folder(tmp_path, progress=False)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "skipped 1 unreadable" in msgs[0] and "1_bad.jpg" in msgs[0]
    assert len(ds) == 3 and [p for p, _ in ds.skipped] == [str(bad.resolve())]
    assert all("bad" not in p for p in ds.paths)
    # Truncated PNG also counts as unreadable.
    good = (tmp_path / "a" / "2.png").read_bytes()
    (tmp_path / "a" / "3_trunc.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"1_bad\.jpg"):
        load_image_folder(tmp_path, on_corrupt="error", progress=False)
    with pytest.warns(UserWarning, match="skipped 2"):
        assert len(load_image_folder(tmp_path, progress=False)) == 3


def test_folder_sizes_and_resize(tmp_path: Path) -> None:
    save_image(tmp_path / "a" / "1.png", hwc(8, 8, 0))
    save_image(tmp_path / "a" / "2.png", hwc(8, 8, 1))
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :20, 0] = 255
    wide[:, 20:40, 1] = 255  # the centre square is pure green
    wide[:, 40:, 2] = 255
    save_image(tmp_path / "b" / "wide.png", wide)
    with pytest.raises(DataError, match=r"wide\.png is 60x20.*1\.png \(8x8\).*image_size"):
        load_image_folder(tmp_path, progress=False)
    ds = load_image_folder(tmp_path, image_size=10, progress=False)
    assert ds.images.shape == (3, 3, 10, 10)
    w = ds.images[2, :, :, 1:-1].int()  # the edge columns blend in a little of the neighbours
    assert (w[1] > 240).all() and (w[0] < 15).all() and (w[2] < 15).all()


def test_folder_threads_match_serial(labelled_folder) -> None:
    root, _ = labelled_folder
    a = load_image_folder(root, progress=False)
    b = load_image_folder(root, num_workers=2, progress=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.paths == b.paths


def test_folder_cache(tmp_path: Path, labelled_folder, monkeypatch) -> None:
    root, _ = labelled_folder
    cache = tmp_path / "cache"
    first = load_image_folder(root, cache_dir=cache, progress=False)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"

    def no_decode(*a, **k):
        raise AssertionError("cache should have been used")

    with monkeypatch.context() as m:
        m.setattr(folder_mod, "decode_image", no_decode)
        again = load_image_folder(root, cache_dir=cache, progress=False)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert again.paths == first.paths and again.class_names == first.class_names
    # A different image_size or a changed file is a different key.
    load_image_folder(root, image_size=4, cache_dir=cache, progress=False)
    p = root / "dog" / "b.png"
    save_image(p, hwc(8, 8, 99))
    os.utime(p, ns=(1, 1))
    changed = load_image_folder(root, cache_dir=cache, progress=False)
    assert len(list(cache.glob("*.npz"))) == 3 and not torch.equal(changed.images, first.images)
    # Skipped files are remembered by the cache, and on_corrupt="error" still refuses them.
    (root / "cat" / "bad.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipped 1"):
        load_image_folder(root, cache_dir=cache, progress=False)
    with pytest.raises(DataError, match="bad.png"):
        load_image_folder(root, cache_dir=cache, on_corrupt="error", progress=False)
    # A damaged cache file is rebuilt, not fatal.
    for f in cache.glob("*.npz"):
        f.write_bytes(b"junk")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = load_image_folder(root, cache_dir=cache, progress=False)
    assert "unreadable cache" in str(caught[0].message) and len(rebuilt) == 5
    assert not list(cache.glob(".tmp-*"))


@pytest.mark.skipif(not REAL_CIFAR_JPEG.is_dir(),
                    reason=f"real CIFAR-10 JPEG copy not found at {REAL_CIFAR_JPEG}")
def test_real_cifar10_jpeg_test_split() -> None:
    ds = load_image_folder(REAL_CIFAR_JPEG, splits=["test"], num_workers=2, progress=False)
    assert ds.images.shape == (10000, 3, 32, 32) and ds.skipped == []
    assert ds.class_names == list(CIFAR10_CLASSES)
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    mean, std = channel_stats(ds)
    assert np.allclose(mean, (0.4914, 0.4822, 0.4465), atol=0.02)
    assert np.allclose(std, (0.2470, 0.2435, 0.2616), atol=0.03)


# ----------------------------------------------------------------------------------------------
# config + dispatcher


def test_config_validate() -> None:
    DataSourceConfig().validate()
    with pytest.raises(DataError, match="valid sources: digits, cifar10"):
        DataSourceConfig(source="mnist").validate()
    with pytest.raises(DataError, match="data.root is required for source 'cifar10'"):
        DataSourceConfig(source="cifar10").validate()
    with pytest.raises(DataError, match="on_corrupt"):
        DataSourceConfig(on_corrupt="ignore").validate()
    with pytest.raises(DataError, match="splits only applies"):
        DataSourceConfig(source="cifar10", root="x", splits=["train"]).validate()
    with pytest.raises(DataError, match="list of roots"):
        DataSourceConfig(source="stl10", root=["a", "b"]).validate()
    with pytest.raises(DataError, match="image_size"):
        DataSourceConfig(image_size=0).validate()
    with pytest.raises(DataError, match="num_workers"):
        DataSourceConfig(num_workers=-1).validate()
    DataSourceConfig(source="folder", root=["a", "b"], splits=["train"]).validate()


def test_load_dataset_dispatch(tmp_path: Path, labelled_folder) -> None:
    assert load_dataset(DataSourceConfig()).images.shape == (1797, 3, 8, 8)
    make_cifar10(tmp_path / "c")
    ds = load_dataset(DataSourceConfig(source="cifar10", root=str(tmp_path / "c"), image_size=16))
    assert ds.images.shape == (12, 3, 16, 16)
    root, _ = labelled_folder
    ds = load_dataset(DataSourceConfig(source="folder", root=str(root)), progress=False)
    assert ds.class_names == ["cat", "dog"]


# ----------------------------------------------------------------------------------------------
# `fastmice data`


def test_channel_stats_streaming() -> None:
    x = torch.from_numpy(rng_images(37, 5, 7, seed=3))
    mean, std = channel_stats(x, chunk_elems=200)  # forces many small chunks
    ref = x.double().permute(1, 0, 2, 3).reshape(3, -1) / 255
    assert np.allclose(mean, ref.mean(1).numpy(), atol=1e-12)
    assert np.allclose(std, ref.std(1, unbiased=False).numpy(), atol=1e-9)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastmice")
    add_data_arguments(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_check(tmp_path: Path, capsys) -> None:
    for rel in ["train/a/1.png", "train/b/1.png", "test/a/2.png"]:
        save_image(tmp_path / "r" / rel, np.full((4, 4, 3), 51, np.uint8))
    (tmp_path / "r" / "test" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    args = parse(["data", "check", "folder", str(tmp_path / "r"), "--splits", "train,test",
                  "--no-progress"])
    assert args.func is run_data_command
    assert run_data_command(args) == 0
    out, err = capsys.readouterr()
    assert "images    3  (3 x 4 x 4 uint8" in out
    assert "classes   2" in out and "      0       2  a" in out and "      1       1  b" in out
    assert "skipped   1" in out and "broken.jpg" in out and "warning: skipped 1" in err
    assert "mean      [0.2000, 0.2000, 0.2000]" in out and "std       [0.0000, 0.0000, 0.0000]" in out

    assert run_data_command(parse(["data", "check", "digits", "--image-size", "12"])) == 0
    assert "images    1797  (3 x 12 x 12" in capsys.readouterr().out

    assert run_data_command(parse(["data", "check", "cifar10", str(tmp_path / "none")])) == 1
    assert "error: data root" in capsys.readouterr().err
    assert run_data_command(parse(["data", "check", "stl10"])) == 1
    assert "data.root is required" in capsys.readouterr().err


def tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_cli_download(tmp_path: Path, monkeypatch, capsys) -> None:
    make_cifar10(tmp_path / "src")
    src = tmp_path / "src" / "cifar-10-batches-py"
    archive = tar_gz({f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in src.iterdir()})
    urls, _, folder = prepare.DOWNLOADS["cifar10"]
    monkeypatch.setitem(prepare.DOWNLOADS, "cifar10", (urls, hashlib.md5(archive).hexdigest(), folder))
    seen = []

    def fake_urlopen(url, timeout=None):
        seen.append(url)
        return FakeResponse(archive)

    monkeypatch.setattr(prepare.urllib.request, "urlopen", fake_urlopen)
    dest = tmp_path / "dl"
    assert run_data_command(parse(["data", "download", "cifar10", str(dest), "--no-progress"])) == 0
    assert seen == [urls[0]] and not list(dest.glob("*.tar.gz"))
    assert len(load_cifar(dest, "cifar10")) == 12
    assert run_data_command(parse(["data", "download", "cifar10", str(dest)])) == 0
    assert "already exists" in capsys.readouterr().out and len(seen) == 1

    # Path traversal inside the archive is refused.
    evil = tar_gz({"../evil.txt": b"x"})
    monkeypatch.setitem(prepare.DOWNLOADS, "cifar10", (urls, hashlib.md5(evil).hexdigest(), folder))
    monkeypatch.setattr(prepare.urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(evil))
    assert run_data_command(parse(["data", "download", "cifar10", str(tmp_path / "d2"), "--no-progress"])) == 1
    assert "unsafe archive member '../evil.txt'" in capsys.readouterr().err
    assert not (tmp_path / "evil.txt").exists()

    def offline(url, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(prepare.urllib.request, "urlopen", offline)
    assert run_data_command(parse(["data", "download", "stl10", str(tmp_path / "d3"), "--no-progress"])) == 1
    err = capsys.readouterr().err
    assert "No network?" in err and "stl10_binary.tar.gz" in err and "Name or service" in err
