"""Build the 15-class ImageNet-Dog subset (DAC, DCCM, MiCE) from an ILSVRC2012 folder.

The subset is the 1300 ILSVRC2012 *train* images of each of the 15 dog classes below (19,500
images), resized to ``size`` x ``size`` and written losslessly as an ImageFolder tree::

    OUT/train/00_n02085936_maltese_dog/n02085936_10074.png   (folders sort in the list's order)
    OUT/classes.txt    label, wnid and name, one class a line
    OUT/manifest.json  settings, source, per-class counts
    OUT/skipped.txt    unreadable source files (path<TAB>reason)

``configs/imagenet_dog.yaml`` reads it with ``data.source: folder`` and ``data.splits: [train]``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from fastmice.data.folder import IMAGE_EXTENSIONS
from fastmice.data.sources import DataError

# (wnid, name) in label order: the class list of DAC (Chang et al. 2017), reused by DCCM and MiCE.
IMAGENET_DOG_CLASSES: tuple[tuple[str, str], ...] = (
    ("n02085936", "Maltese dog"), ("n02086646", "Blenheim spaniel"), ("n02088238", "basset"),
    ("n02091467", "Norwegian elkhound"), ("n02097130", "giant schnauzer"),
    ("n02099601", "golden retriever"), ("n02101388", "Brittany spaniel"), ("n02101556", "clumber"),
    ("n02102177", "Welsh springer spaniel"), ("n02105056", "groenendael"), ("n02105412", "kelpie"),
    ("n02105855", "Shetland sheepdog"), ("n02107142", "Doberman"), ("n02110958", "pug"),
    ("n02112137", "chow"),
)
IMAGES_PER_CLASS = 1300  # ILSVRC2012 train images per class for all 15 classes
EXPECTED_TOTAL = IMAGES_PER_CLASS * len(IMAGENET_DOG_CLASSES)  # 19,500
RESIZE_MODES = ("crop", "squash")
# Where the <wnid> folders may live, relative to the given root (first match wins).
_LAYOUTS = ("train", ".", "ILSVRC/Data/CLS-LOC/train", "Data/CLS-LOC/train", "ILSVRC2012_img_train")


def class_folder(label: int) -> str:
    """Output folder name of class ``label``, e.g. ``00_n02085936_maltese_dog``; sorts in label order."""
    wnid, name = IMAGENET_DOG_CLASSES[label]
    return f"{label:02d}_{wnid}_{name.lower().replace(' ', '_')}"


def find_train_dir(imagenet_dir: str | Path) -> Path:
    """The folder holding the 15 ``<wnid>`` class folders; DataError naming what is missing."""
    root = Path(imagenet_dir).expanduser()
    if not root.exists():
        raise DataError(f"ImageNet folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"ImageNet folder {root} is a file; extract it first (expected a folder "
                        f"with train/<wnid>/*.JPEG, e.g. ILSVRC2012_img_train.tar extracted)")
    wnids = [w for w, _ in IMAGENET_DOG_CLASSES]
    tried = [(root / rel).resolve() if rel != "." else root.resolve() for rel in _LAYOUTS]
    found = [d for d in tried if d.is_dir() and any((d / w).is_dir() for w in wnids)]
    if not found:
        tars = [d / f"{wnids[0]}.tar" for d in tried if (d / f"{wnids[0]}.tar").is_file()]
        hint = (f"; {tars[0]} is still a tar archive: extract each <wnid>.tar into a <wnid> folder"
                if tars else "")
        raise DataError(f"no ImageNet-Dog class folder (e.g. {wnids[0]}) found under {root}; looked "
                        f"in {', '.join(str(d) for d in dict.fromkeys(tried))}{hint}")
    train = found[0]
    missing = [f"{w} ({n})" for w, n in IMAGENET_DOG_CLASSES if not (train / w).is_dir()]
    if missing:
        raise DataError(f"{train} lacks {len(missing)} of the 15 ImageNet-Dog class folders: "
                        f"{', '.join(missing)}")
    return train


def _list_class(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataError(f"class folder {folder} contains no images "
                        f"(looked for {', '.join(IMAGE_EXTENSIONS)}, any case)")
    return files


def resize_image(im: Image.Image, size: int, resize: str = "crop") -> Image.Image:
    """RGB ``size`` x ``size``: 'crop' scales the shorter side to ``size`` and centre-crops (aspect
    kept); 'squash' scales both sides to ``size``. Antialiased bicubic."""
    if im.mode != "RGB":
        im = im.convert("RGB")  # grayscale, CMYK (Adobe-inverted handled by Pillow), palette, RGBA
    w, h = im.size
    box = None
    if resize == "crop":
        c = min(w, h)  # the centred square, resampled in one step: same as resize-then-crop
        box = ((w - c) / 2, (h - c) / 2, (w + c) / 2, (h + c) / 2)
    return im.resize((size, size), Image.Resampling.BICUBIC, box=box)


def _convert_one(src: Path, dst: Path, size: int, resize: str) -> str | None:
    """Write ``dst``; None on success, else the reason ``src`` could not be read."""
    try:
        with Image.open(src) as im:
            if im.format == "JPEG":  # DCT-domain pre-scale, kept >= 2x the target: fast, no aliasing
                im.draft("RGB", (2 * size, 2 * size))
            im.load()
            out = resize_image(im, size, resize)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for malformed files
        return f"{type(e).__name__}: {e}"
    tmp = dst.with_name(f".tmp-{dst.name}")  # hidden: the folder reader never sees a partial file
    out.save(tmp, format="PNG", compress_level=6)
    os.replace(tmp, dst)
    return None


def _write_manifest(out: Path, settings: dict, status: str, counts: list[int] | None,
                    skipped: int | None) -> None:
    classes = [{"label": i, "wnid": w, "name": n, "folder": class_folder(i),
                **({"count": counts[i]} if counts else {})}
               for i, (w, n) in enumerate(IMAGENET_DOG_CLASSES)]
    doc = {"dataset": "imagenet-dog", "status": status, **settings, "format": "png",
           "layout": "train/<NN_wnid_name>/<source stem>.png", "expected_total": EXPECTED_TOTAL,
           **({"total": sum(counts), "skipped": skipped} if counts else {}), "classes": classes}
    (out / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n")


def build_imagenet_dog(imagenet_dir: str | Path, out_dir: str | Path = "data/imagenet_dog",
                       size: int = 96, resize: str = "crop", num_workers: int | None = None,
                       progress: bool = True, force: bool = False) -> Path:
    """Write the ImageNet-Dog ImageFolder tree into ``out_dir``; return ``out_dir``.

    Re-running skips PNGs already written (``force`` deletes and rebuilds the class folders).
    Unreadable source images are skipped and listed in ``out_dir/skipped.txt``.
    """
    if resize not in RESIZE_MODES:
        raise DataError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DataError(f"size must be a positive integer, got {size!r}")
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    train = find_train_dir(imagenet_dir)
    sources = [_list_class(train / w) for w, _ in IMAGENET_DOG_CLASSES]
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"output folder {out} is a file")
    settings = {"size": size, "resize": resize, "source": str(train)}
    manifest = out / "manifest.json"
    if manifest.is_file() and not force:
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = {}
        if (old.get("size"), old.get("resize")) != (size, resize):
            raise DataError(f"{out} was built with size={old.get('size')} resize={old.get('resize')}, "
                            f"not size={size} resize={resize}; pass --force to rebuild it, or choose "
                            f"another output folder")
    out.mkdir(parents=True, exist_ok=True)
    if force:
        for i in range(len(IMAGENET_DOG_CLASSES)):
            shutil.rmtree(out / "train" / class_folder(i), ignore_errors=True)
    _write_manifest(out, settings, "incomplete", None, None)
    (out / "classes.txt").write_text("".join(f"{i} {w} {n}\n"
                                             for i, (w, n) in enumerate(IMAGENET_DOG_CLASSES)))

    jobs, done = [], [0] * len(sources)  # jobs: (label, src, dst)
    for label, files in enumerate(sources):
        dst_dir = out / "train" / class_folder(label)
        dst_dir.mkdir(parents=True, exist_ok=True)
        for src in files:
            dst = dst_dir / f"{src.stem}.png"
            if dst.is_file():
                done[label] += 1
            else:
                jobs.append((label, src, dst))
    existing = sum(done)
    skipped: list[tuple[str, str]] = []
    with tqdm(total=len(jobs), desc="imagenet-dog", unit="img",
              disable=None if progress else True) as bar:
        def run(job: tuple[int, Path, Path]) -> str | None:
            return _convert_one(job[1], job[2], size, resize)

        if num_workers > 0:
            with ThreadPoolExecutor(num_workers) as pool:  # Pillow releases the GIL in decode/encode
                results = pool.map(run, jobs, chunksize=1)
                for job, err in zip(jobs, results):
                    done[job[0]] += err is None
                    if err is not None:
                        skipped.append((str(job[1]), err))
                    bar.update()
        else:
            for job in jobs:
                err = run(job)
                done[job[0]] += err is None
                if err is not None:
                    skipped.append((str(job[1]), err))
                bar.update()

    (out / "skipped.txt").write_text("".join(f"{p}\t{r}\n" for p, r in skipped))
    _write_manifest(out, settings, "complete", done, len(skipped))
    total = sum(done)
    print(f"ImageNet-Dog from {train} -> {out / 'train'} ({size}x{size} PNG, resize={resize}; "
          f"{len(jobs) - len(skipped)} written, {existing} already there)")
    print("  label  wnid       count  name")
    for i, ((w, n), c) in enumerate(zip(IMAGENET_DOG_CLASSES, done)):
        flag = "" if c == IMAGES_PER_CLASS else f"  (expected {IMAGES_PER_CLASS})"
        print(f"  {i:5d}  {w} {c:6d}  {n}{flag}")
    print(f"  total            {total:6d}")
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable image(s), listed in {out / 'skipped.txt'}: "
              f"{', '.join(Path(p).name for p, _ in skipped[:3])}{', ...' if len(skipped) > 3 else ''}",
              file=sys.stderr)
    if total != EXPECTED_TOTAL:
        print(f"note: {total} images, not the {EXPECTED_TOTAL:,} of the paper (15 x {IMAGES_PER_CLASS}); "
              f"a partial ImageNet, or unreadable files?", file=sys.stderr)
    return out
