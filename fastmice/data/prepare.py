"""`fastmice data ...`: inspect a data source (`check`), fetch a benchmark dataset (`download`), or
build the ImageNet-Dog subset from a local ILSVRC2012 copy (`imagenet-dog`).

The top-level CLI calls :func:`add_data_arguments` on its subparsers and dispatches to
:func:`run_data_command` (also set as the parser default ``func``).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tarfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import TextIO

import torch
from tqdm.auto import tqdm

from fastmice.data.sources import SOURCES, DataError, DataSourceConfig, ImageDataset, load_dataset

# name -> (URLs tried in order, archive md5, folder the archive extracts to)
DOWNLOADS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "cifar10": (("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                 "https://cave.cs.toronto.edu/kriz/cifar-10-python.tar.gz"),
                "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    "cifar100": (("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                  "https://cave.cs.toronto.edu/kriz/cifar-100-python.tar.gz"),
                 "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
    "stl10": (("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",),
              "91f7769df0f17e558f3565bffb0c7dfb", "stl10_binary"),
}


# ----------------------------------------------------------------------------------------------
# check


def channel_stats(ds: ImageDataset | torch.Tensor, chunk_elems: int = 1 << 24
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std over all pixels, as fractions of 255.

    Streams over chunks of about ``chunk_elems`` values with float64 sums, so memory stays bounded
    and the sum of squares does not lose precision on large datasets.
    """
    x = ds.images if isinstance(ds, ImageDataset) else ds
    n, c, h, w = x.shape
    if n == 0:
        raise DataError("channel_stats: the dataset is empty")
    step = max(1, chunk_elems // (c * h * w))
    s = torch.zeros(c, dtype=torch.float64)
    ss = torch.zeros(c, dtype=torch.float64)
    for i in range(0, n, step):
        b = x[i:i + step].to(torch.float64)
        s += b.sum(dim=(0, 2, 3))
        ss += b.square().sum(dim=(0, 2, 3))
    count = n * h * w
    mean = s / count
    std = (ss / count - mean.square()).clamp_min(0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def describe_dataset(ds: ImageDataset, max_skipped: int = 10) -> str:
    """Human-readable summary: size, classes with counts, skipped files, normalisation stats."""
    n = len(ds)
    h, w = ds.image_size
    mib = ds.images.numel() / 2**20
    streamed = not isinstance(ds.images, torch.Tensor)
    lines = [f"dataset   {ds.name}",
             f"images    {n}  (3 x {h} x {w} uint8, {mib:.1f} MiB" +
             (", decoded on demand: training streams it with DALI, data.loader=dali)" if streamed
              else ")")]
    if ds.labels is None:
        lines.append("classes   none (unlabelled)")
    else:
        k = ds.num_classes or 0
        counts = torch.bincount(ds.labels, minlength=k).tolist()
        names = ds.class_names or [str(i) for i in range(k)]
        lines.append(f"classes   {k}")
        lines.append("     id   count  name")
        lines += [f"  {i:5d} {cnt:7d}  {name}" for i, (cnt, name) in enumerate(zip(counts, names))]
    lines.append(f"skipped   {len(ds.skipped)}")
    for path, reason in ds.skipped[:max_skipped]:
        lines.append(f"  {path}: {reason}")
    if len(ds.skipped) > max_skipped:
        lines.append(f"  ... and {len(ds.skipped) - max_skipped} more")
    if n:
        mean, std = channel_stats(ds)
        lines.append(f"mean      [{', '.join(f'{m:.4f}' for m in mean)}]")
        lines.append(f"std       [{', '.join(f'{s:.4f}' for s in std)}]")
    return "\n".join(lines)


def check_source(cfg: DataSourceConfig, out: TextIO | None = None, progress: bool = True
                 ) -> ImageDataset:
    """Load ``cfg`` and print :func:`describe_dataset`; warnings go to stderr as one line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_dataset(cfg, progress=progress)
    for wrn in caught:
        print(f"warning: {wrn.message}", file=sys.stderr)
    print(describe_dataset(ds), file=out or sys.stdout)
    return ds


# ----------------------------------------------------------------------------------------------
# download


def _fetch(url: str, dest_file: Path, progress: bool) -> str:
    """Stream ``url`` into ``dest_file``; return the md5 of what was written."""
    md5 = hashlib.md5()
    with urllib.request.urlopen(url, timeout=60) as resp, dest_file.open("wb") as f:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest_file.name,
                  disable=None if progress else True) as bar:
            while block := resp.read(1 << 20):
                f.write(block)
                md5.update(block)
                bar.update(len(block))
    return md5.hexdigest()


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive, refusing members that would land outside ``dest`` or are links/devices."""
    dest = dest.resolve()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            target = (dest / m.name).resolve()
            if not (m.isfile() or m.isdir()) or not target.is_relative_to(dest):
                raise DataError(f"{archive}: refusing unsafe archive member {m.name!r}")
        # The "data" filter (Python >= 3.11.4) is a second line of defence on top of the check above.
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **extra)


def download_dataset(name: str, dest: str | Path, force: bool = False, progress: bool = True) -> Path:
    """Download and extract ``name`` into ``dest``; return the extracted folder."""
    if name not in DOWNLOADS:
        raise DataError(f"cannot download {name!r}; available: {', '.join(DOWNLOADS)}")
    urls, md5, folder = DOWNLOADS[name]
    dest = Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise DataError(f"download destination {dest} is a file, expected a folder")
    target = dest / folder
    if target.is_dir() and not force:
        print(f"{target} already exists; nothing to do (--force downloads again)")
        return target
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / urls[0].rsplit("/", 1)[1]
    errors = []
    try:
        for url in urls:
            print(f"downloading {url}")
            try:
                got = _fetch(url, archive, progress)
            except (urllib.error.URLError, OSError) as e:  # URLError covers DNS / refused / no route
                errors.append(f"{url}: {getattr(e, 'reason', e)}")
                continue
            if got != md5:
                errors.append(f"{url}: checksum mismatch (md5 {got}, expected {md5})")
                continue
            print(f"extracting into {dest}")
            safe_extract(archive, dest)
            return target
    finally:
        archive.unlink(missing_ok=True)
    raise DataError(f"could not download {name}: " + "; ".join(errors) +
                    f". No network? Download {urls[0]} by hand and extract it into {dest} "
                    f"(it should create {target}).")


# ----------------------------------------------------------------------------------------------
# argparse wiring


def _comma_list(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. train,test")
    return items


def add_data_arguments(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``data`` subcommand (``check``, ``download``, ``imagenet-dog``); returns its parser."""
    data = subparsers.add_parser("data", help="inspect, download or build datasets",
                                 description="Inspect a data source or download a benchmark dataset.")
    actions = data.add_subparsers(dest="data_action", metavar="ACTION", required=True)

    check = actions.add_parser("check", help="load a source and print counts, sizes and mean/std")
    check.add_argument("source", choices=SOURCES)
    check.add_argument("root", nargs="*", metavar="ROOT",
                       help="dataset folder (several allowed for 'folder'); not needed for digits")
    check.add_argument("--image-size", type=int, default=None, help="resize to N x N")
    check.add_argument("--splits", type=_comma_list, default=None, help="folder splits, e.g. train,test")
    check.add_argument("--on-corrupt", choices=("skip", "error"), default="skip")
    check.add_argument("--cache-dir", default=None, help="folder for the decoded-image cache")
    check.add_argument("--num-workers", type=int, default=0, help="decoding threads (folder)")
    check.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    dl = actions.add_parser("download", help="download and extract cifar10, cifar100 or stl10")
    dl.add_argument("dataset", choices=sorted(DOWNLOADS))
    dl.add_argument("dest", help="folder to extract into")
    dl.add_argument("--force", action="store_true", help="download even if already extracted")
    dl.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    dog = actions.add_parser(
        "imagenet-dog", help="build the 15-class ImageNet-Dog subset from an ILSVRC2012 folder",
        description="Build ImageNet-Dog: the 15 dog classes of DAC, DCCM and MiCE, taking all 1300 "
        "ILSVRC2012 *train* images of each class (19,500 images; the val set is not used). Every image "
        "is converted to RGB, resized to SIZE x SIZE and written as lossless PNG into "
        "OUT_DIR/train/<NN_wnid_name>/ (plus classes.txt, manifest.json, skipped.txt); "
        "configs/imagenet_dog.yaml reads that folder. Re-running skips images already written.")
    dog.add_argument("imagenet_dir", metavar="ILSVRC2012_DIR",
                     help="ImageNet root: ROOT/train/<wnid>/, ROOT/<wnid>/ or the Kaggle layout "
                     "ROOT/ILSVRC/Data/CLS-LOC/train/<wnid>/")
    dog.add_argument("out_dir", metavar="OUT_DIR", nargs="?", default="data/imagenet_dog",
                     help="output folder (default: data/imagenet_dog, the config's data.root)")
    dog.add_argument("--size", type=int, default=96, help="output side in pixels (default: 96)")
    dog.add_argument("--resize", choices=("crop", "squash"), default="crop",
                     help="crop: shorter side to SIZE then centre crop, keeps the aspect ratio "
                     "(default); squash: resize straight to SIZE x SIZE")
    dog.add_argument("--force", action="store_true", help="delete and rebuild images already written")
    dog.add_argument("--workers", type=int, default=None,
                     help="decoding threads (default: min(8, CPU count)); 0 decodes in the main thread")
    dog.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    data.set_defaults(func=run_data_command)
    return data


def run_data_command(args: argparse.Namespace) -> int:
    """Execute a parsed ``fastmice data ...`` command; 0 on success, 1 on a data error."""
    progress = not getattr(args, "no_progress", False)
    try:
        if args.data_action == "check":
            roots = args.root or []
            cfg = DataSourceConfig(source=args.source,
                                   root=None if not roots else roots[0] if len(roots) == 1 else roots,
                                   splits=args.splits, image_size=args.image_size,
                                   on_corrupt=args.on_corrupt, cache_dir=args.cache_dir,
                                   num_workers=args.num_workers)
            check_source(cfg, progress=progress)
        elif args.data_action == "download":
            path = download_dataset(args.dataset, args.dest, force=args.force, progress=progress)
            print(f"ready: {path}")
        elif args.data_action == "imagenet-dog":
            from fastmice.data.imagenet_dog import build_imagenet_dog

            if args.workers is not None and args.workers < 0:
                raise DataError(f"--workers must be >= 0, got {args.workers}")
            path = build_imagenet_dog(args.imagenet_dir, args.out_dir, size=args.size,
                                      resize=args.resize, num_workers=args.workers,
                                      progress=progress, force=args.force)
            print(f"ready: {path}")
        else:  # argparse's required=True makes this unreachable from the CLI
            raise DataError(f"unknown data action {args.data_action!r}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
