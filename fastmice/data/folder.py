"""Image-folder reader (ImageFolder layout or a flat/nested unlabelled folder) with an on-disk cache.

Layouts, per root (or per ``root/<split>`` when splits are given):

* labelled: ``root/<class>/**/<image>``; class ids come from the class folder names, sorted, and are
  unified by name across all roots and splits;
* unlabelled: ``root`` holds image files directly; every image below it (recursively) is loaded and
  ``labels`` is None.

Hidden files and folders (leading ``.``, e.g. macOS ``._x.jpg``) and ``__MACOSX`` are ignored.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fastmice.data.dataset import DataError, ImageDataset
from fastmice.data.image_modes import to_rgb_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_CACHE_VERSION = 2   # 2: 16-bit and float images scaled, not saturated
_CHUNK = 256  # images per decode task: big enough to amortise scheduling, small for a smooth bar
_SPLIT_NAMES = ("train", "val", "valid", "validation", "test")  # suggestion order: train first


# ----------------------------------------------------------------------------------------------
# Listing


def _visible(name: str) -> bool:
    return not name.startswith(".") and name != "__MACOSX"


def _is_image(name: str) -> bool:
    return _visible(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_images(folder: Path) -> list[str]:
    """All image files below ``folder``, in a deterministic (sorted, depth-first) order."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))  # in place: prunes and orders the walk
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return found


def _check_folder(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise DataError(f"{what} {path} is a file, expected a folder of images "
                        f"(layout <root>/<class>/<image>, or images directly inside for unlabelled data)")


def _list_part(part: Path) -> tuple[dict[str, list[str]] | None, list[str]]:
    """Return ({class: files}, []) for a labelled folder or (None, files) for an unlabelled one."""
    entries = sorted(os.scandir(part), key=lambda e: e.name)
    direct = [e.name for e in entries if e.is_file() and _is_image(e.name)]
    subdirs = [Path(e.path) for e in entries if e.is_dir() and _visible(e.name)]
    if direct:
        files = scan_images(part)
        nested = [d.name for d in subdirs if scan_images(d)]
        if nested:
            warnings.warn(f"{part} holds {len(direct)} image file(s) directly, so it is read as an "
                          f"UNLABELLED folder and the images in its subfolders ({', '.join(nested[:5])}"
                          f"{', ...' if len(nested) > 5 else ''}) get no class labels; move the loose "
                          f"files out to use the subfolders as classes", stacklevel=4)
        return None, files
    classes = {d.name: scan_images(d) for d in subdirs}
    if not any(classes.values()):
        raise DataError(f"no images found in {part} (looked for {', '.join(IMAGE_EXTENSIONS)}, any "
                        f"case, directly inside or in class subfolders)")
    for name, files in classes.items():
        if not files:
            raise DataError(f"class folder {part / name} contains no images; an empty class folder is "
                            f"an error because it would shift the label ids of the classes after it "
                            f"- remove it or add images")
    if set(classes) <= set(_SPLIT_NAMES) and all(any(p.is_dir() for p in (part / c).iterdir())
                                                 for c in classes):
        names = [n for n in _SPLIT_NAMES if n in classes]
        warnings.warn(f"{part}: the class folders are named {names}, which look like splits; "
                      f"pass splits={names} (data.splits) to read them as splits", stacklevel=4)
    return classes, []


def list_folder_images(roots: Sequence[Path], splits: Sequence[str] | None
                 ) -> tuple[list[str], list[int] | None, list[str] | None]:
    """Files in load order (roots, then splits, then class, then name) with labels and class names."""
    parts: list[tuple[Path, dict[str, list[str]] | None, list[str]]] = []
    for root in roots:
        _check_folder(root, "image folder")
        for part in ([root / s for s in splits] if splits else [root]):
            if splits:
                _check_folder(part, f"split folder (splits={list(splits)})")
            parts.append((part, *_list_part(part)))
    labelled = [p for p, cls, _ in parts if cls is not None]
    if labelled and len(labelled) != len(parts):
        unl = next(p for p, cls, _ in parts if cls is None)
        raise DataError(f"cannot mix labelled and unlabelled folders: {labelled[0]} has class "
                        f"subfolders but {unl} holds images directly")
    if not labelled:
        return [f for _, _, files in parts for f in files], None, None
    class_names = sorted({c for _, cls, _ in parts for c in cls})
    ids = {c: i for i, c in enumerate(class_names)}
    files, labels = [], []
    for _, cls, _ in parts:
        for c, fs in cls.items():
            files.extend(fs)
            labels.extend([ids[c]] * len(fs))
    return files, labels, class_names


# ----------------------------------------------------------------------------------------------
# Decoding


def decode_image(path: str, size: int | None) -> np.ndarray:
    """(H, W, 3) uint8; with ``size``: shorter side to ``size``, centre crop, bilinear (antialiased)."""
    with Image.open(path) as im:
        if size is not None and im.format == "JPEG":
            im.draft("RGB", (size, size))  # DCT-domain downscale; keeps both sides >= size
        im.load()  # full decode here, so truncated files fail inside the try of the caller
        im = to_rgb_image(im)   # 16-bit, float, palette, CMYK, LAB ... scaled to 8-bit RGB (image_modes)
        w, h = im.size
        if size is not None and (w, h) != (size, size):
            c = min(w, h)
            left, top = (w - c) / 2, (h - c) / 2
            im = im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + c, top + c))
        return np.asarray(im)


def decode_range(paths: list[str], lo: int, hi: int, size: int | None, out: np.ndarray
                  ) -> list[tuple[int, str, str]]:
    """Decode paths[lo:hi] into out[lo:hi]; return problems as (index, 'corrupt' | 'size', detail)."""
    problems = []
    hw = out.shape[2:]
    for i in range(lo, hi):
        try:
            arr = decode_image(paths[i], size)
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for malformed files
            problems.append((i, "corrupt", f"{type(e).__name__}: {e}"))
            continue
        if arr.shape[:2] != hw:
            problems.append((i, "size", f"{arr.shape[1]}x{arr.shape[0]}"))
            continue
        out[i] = arr.transpose(2, 0, 1)
    return problems


def _reference_hw(paths: list[str]) -> tuple[int, int, int]:
    """(index, H, W) of the first decodable image; the size all others must match."""
    first_err = None
    for i, p in enumerate(paths):
        try:
            arr = decode_image(p, None)
            return i, arr.shape[0], arr.shape[1]
        except Exception as e:  # noqa: BLE001
            first_err = first_err or f"{p}: {type(e).__name__}: {e}"
    raise DataError(f"none of the {len(paths)} images could be read (first failure: {first_err})")


def _decode_all(paths: list[str], size: int | None, num_workers: int, progress: bool, desc: str
                ) -> tuple[np.ndarray, list[tuple[int, str, str]], str | None]:
    if size is None:
        ref_i, h, w = _reference_hw(paths)
        ref = f"{paths[ref_i]} ({w}x{h})"
    else:
        h = w = size
        ref = None
    out = np.empty((len(paths), 3, h, w), dtype=np.uint8)
    ranges = [(lo, min(lo + _CHUNK, len(paths))) for lo in range(0, len(paths), _CHUNK)]
    problems: list[tuple[int, str, str]] = []
    # disable=None turns the bar off when stderr is not a terminal (logs, CI).
    with tqdm(total=len(paths), desc=desc, unit="img", disable=None if progress else True) as bar:
        if num_workers > 0:
            # Threads, not processes: Pillow releases the GIL while decoding, and workers write
            # straight into the shared output array (no pickling of pixels back).
            with ThreadPoolExecutor(num_workers) as pool:
                futures = [pool.submit(decode_range, paths, lo, hi, size, out) for lo, hi in ranges]
                for fut, (lo, hi) in zip(futures, ranges):
                    problems.extend(fut.result())
                    bar.update(hi - lo)
        else:
            for lo, hi in ranges:
                problems.extend(decode_range(paths, lo, hi, size, out))
                bar.update(hi - lo)
    return out, sorted(problems), ref


# ----------------------------------------------------------------------------------------------
# Cache


def _cache_key(files: list[str], image_size: int | None, class_names: list[str] | None) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{image_size}|{class_names}".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _save_cache(path: Path, ds: ImageDataset) -> None:
    arrays = {
        "images": ds.images.numpy(),
        "paths": np.array(ds.paths or [], dtype=str),
        "skipped": np.array(ds.skipped, dtype=str).reshape(-1, 2),
    }
    if ds.labels is not None:
        arrays["labels"] = ds.labels.numpy()
        arrays["class_names"] = np.array(ds.class_names, dtype=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared between users
        os.replace(tmp, path)  # atomic: readers never see a half-written cache
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cache(path: Path, name: str) -> ImageDataset | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            labels = torch.from_numpy(z["labels"]) if "labels" in z.files else None
            names = z["class_names"].tolist() if "class_names" in z.files else None
            return ImageDataset(torch.from_numpy(z["images"]), labels, names, name,
                                z["paths"].tolist(), [tuple(s) for s in z["skipped"].tolist()])
    except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable cache {path} ({type(e).__name__}: {e}); rebuilding",
                      stacklevel=3)
        return None


# ----------------------------------------------------------------------------------------------
# Public reader


def resolve_roots(roots: str | Path | Sequence[str | Path]) -> list[Path]:
    """One root or several, as absolute paths (``~`` expanded)."""
    if isinstance(roots, (str, Path)):
        roots = [roots]
    return [Path(r).expanduser().resolve() for r in roots]


def load_image_folder(roots: str | Path | Sequence[str | Path], image_size: int | None = None,
                      splits: Sequence[str] | None = None, on_corrupt: str = "skip",
                      num_workers: int = 0, progress: bool = True,
                      cache_dir: str | Path | None = None) -> ImageDataset:
    """Decode every image under ``roots`` (and ``splits``) into one uint8 (N, 3, H, W) tensor.

    ``image_size`` resizes (shorter side, then centre crop); without it all images must share a
    size. Unreadable files are skipped and listed in ``skipped`` (``on_corrupt="skip"``) or raise
    (``"error"``). ``num_workers`` decoding threads; ``cache_dir`` stores the decoded arrays keyed
    by the file list, sizes, mtimes and image_size.
    """
    if on_corrupt not in ("skip", "error"):
        raise DataError(f"on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
    roots = resolve_roots(roots)
    if not roots:
        raise DataError("load_image_folder: no root folder given")
    if isinstance(splits, str):
        splits = [splits]
    name = "folder:" + ",".join(str(r) for r in roots)
    files, labels, class_names = list_folder_images(roots, splits)

    cache_path = None
    if cache_dir is not None:
        key = _cache_key(files, image_size, class_names)
        cache_path = Path(cache_dir).expanduser() / f"folder-{key}.npz"
        if cache_path.is_file() and (ds := _load_cache(cache_path, name)) is not None:
            report_skipped(ds.skipped, len(files), on_corrupt)
            return ds

    out, problems, ref = _decode_all(files, image_size, num_workers, progress, f"decoding {roots[0].name}")
    bad_size = [(i, d) for i, kind, d in problems if kind == "size"]
    if bad_size:
        i, d = bad_size[0]
        raise DataError(f"{files[i]} is {d} but {ref} sets the size for this folder "
                        f"({len(bad_size)} image(s) differ); set data.image_size "
                        f"(image_size=...) to resize every image to one square size")
    skipped = [(files[i], d) for i, kind, d in problems if kind == "corrupt"]
    report_skipped(skipped, len(files), on_corrupt)
    if len(skipped) == len(files):
        raise DataError(f"none of the {len(files)} images under {name[7:]} could be read "
                        f"(first: {skipped[0][0]}: {skipped[0][1]})")
    keep = np.ones(len(files), dtype=bool)
    keep[[i for i, kind, _ in problems]] = False
    if not keep.all():
        out = out[keep]
    kept = np.flatnonzero(keep).tolist()
    lab = torch.tensor([labels[i] for i in kept], dtype=torch.int64) if labels is not None else None
    ds = ImageDataset(torch.from_numpy(out), lab, class_names, name, [files[i] for i in kept], skipped)
    if cache_path is not None:
        _save_cache(cache_path, ds)
    return ds


def report_skipped(skipped: list[tuple[str, str]], total: int, on_corrupt: str) -> None:
    if not skipped:
        return
    if on_corrupt == "error":
        path, reason = skipped[0]
        raise DataError(f"cannot read image {path}: {reason} ({len(skipped)} unreadable file(s); "
                        f"on_corrupt='skip' skips them)")
    head = ", ".join(p for p, _ in skipped[:3])
    warnings.warn(f"skipped {len(skipped)} unreadable image(s) of {total}: {head}"
                  f"{', ...' if len(skipped) > 3 else ''} (listed in ImageDataset.skipped)", stacklevel=3)
