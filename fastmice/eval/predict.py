"""`fastmice predict`: assign new images (files, folders, folder trees; no labels) to a trained run's clusters.

Images are streamed: listed up front, then decoded chunk by chunk by a thread pool (the next chunk decodes
while the model runs on the current one), so memory stays bounded for folders of millions of files. Each
image is resized to the run's image size exactly as the training folder reader does (shared decoder).
Results are written as they come: a CSV row per readable image and optional embeddings as .npy files whose
rows follow the CSV rows.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import struct
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from fastmice.data.folder import IMAGE_EXTENSIONS, decode_range, scan_images
from fastmice.data.sources import DataError
from fastmice.eval.run import LoadedRun, load_run

CHUNK = 1024           # images decoded and held at once (two chunks in flight with the prefetch)
_TASK = 64             # images per decode task: small enough to spread a chunk over the threads
EMBEDDINGS = {"gating": "g", "features": "features"}   # --embeddings name -> readout of model.infer
CSV_COLUMNS = ("path", "cluster", "confidence", "runner_up", "runner_up_confidence")


# ---- listing and decoding -----------------------------------------------------------------------------
def list_images(inputs: Sequence[str | Path]) -> list[str]:
    """Absolute paths of the images named by `inputs` (files, or folders searched recursively), in order.

    Folders contribute their image files (extensions as the training reader, any case, hidden files
    skipped) sorted depth-first; a file named explicitly is always tried, whatever its extension.
    Duplicates are dropped. A missing input raises FileNotFoundError; no image at all raises DataError.
    """
    files: list[str] = []
    for item in inputs:
        p = Path(os.path.abspath(Path(item).expanduser()))  # abspath, not resolve: keep symlinked names
        if p.is_dir():
            files.extend(scan_images(p))
        elif p.is_file():
            files.append(str(p))
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    files = list(dict.fromkeys(files))  # ordered de-duplication (a folder and a file inside it)
    if not files:
        raise DataError(f"no images found in {', '.join(map(str, inputs))} (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)}, any case, recursively)")
    return files


@dataclass
class DecodedChunk:
    paths: list[str]                 # readable files, in input order
    images: np.ndarray               # uint8 (len(paths), 3, S, S)
    skipped: list[tuple[str, str]]   # (path, reason) of the unreadable ones


def _submit(pool: ThreadPoolExecutor, paths: list[str], size: int) -> tuple[list[str], np.ndarray, list[Future]]:
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    # The threads write straight into `out` (Pillow releases the GIL while decoding).
    futures = [pool.submit(decode_range, paths, lo, min(lo + _TASK, len(paths)), size, out)
               for lo in range(0, len(paths), _TASK)]
    return paths, out, futures


def _collect(paths: list[str], out: np.ndarray, futures: list[Future]) -> DecodedChunk:
    problems = sorted(p for f in futures for p in f.result())
    if not problems:
        return DecodedChunk(paths, out, [])
    keep = np.ones(len(paths), dtype=bool)
    keep[[i for i, _, _ in problems]] = False
    return DecodedChunk([p for p, k in zip(paths, keep) if k], out[keep],
                        [(paths[i], detail) for i, _, detail in problems])


def iter_decoded(paths: list[str], size: int, chunk: int = CHUNK,
                 num_workers: int | None = None) -> Iterator[DecodedChunk]:
    """Decode `paths` to size x size, `chunk` at a time, one chunk ahead of the consumer."""
    workers = num_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        pending = _submit(pool, paths[:chunk], size) if paths else None
        for lo in range(0, len(paths), chunk):
            current = pending
            nxt = lo + chunk
            pending = _submit(pool, paths[nxt:nxt + chunk], size) if nxt < len(paths) else None
            yield _collect(*current)


# ---- outputs ------------------------------------------------------------------------------------------
class NpyRowWriter:
    """Append float32 rows to a .npy file and write the final row count into its header at close.

    The header has a fixed size (128 bytes, room for any row count), so it can be rewritten in place and
    the data never has to be copied or held in memory.
    """

    HEADER = 128  # bytes before the data; a multiple of 64 as the .npy format asks

    def __init__(self, path: Path):
        self.path, self.rows, self.dim = path, 0, 0
        self._fh = None

    def _header(self) -> bytes:
        text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({self.rows}, {self.dim}), }}"
        size = self.HEADER - 10  # magic (6) + version (2) + header length (2)
        return np.lib.format.magic(1, 0) + struct.pack("<H", size) + (text.ljust(size - 1) + "\n").encode("latin1")

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype="<f4")
        if self._fh is None:
            self.dim = rows.shape[1]
            self._fh = open(self.path, "wb")
            self._fh.write(self._header())  # 0 rows until close: a crash leaves a valid, empty array
        self._fh.write(rows.tobytes())
        self.rows += rows.shape[0]

    def close(self) -> None:
        if self._fh is None:
            self._fh = open(self.path, "wb")
        self._fh.seek(0)
        self._fh.write(self._header())
        self._fh.close()


def output_paths(out_csv: str | Path) -> dict[str, Path]:
    """The files written next to the CSV: <stem>.gating.npy, <stem>.features.npy, <stem>.skipped.txt."""
    out = Path(out_csv)
    return {"csv": out, "skipped": out.parent / f"{out.stem}.skipped.txt",
            **{k: out.parent / f"{out.stem}.{k}.npy" for k in EMBEDDINGS}}


def _csv_rows(paths: list[str], probs: torch.Tensor) -> Iterator[list[Any]]:
    conf, idx = (t.numpy() for t in probs.topk(min(2, probs.shape[1]), dim=1))
    for i, p in enumerate(paths):
        second = [int(idx[i, 1]), f"{conf[i, 1]:.6f}"] if idx.shape[1] > 1 else ["", ""]
        yield [p, int(idx[i, 0]), f"{conf[i, 0]:.6f}", *second]


def _embedding_kinds(embeddings: str | None) -> list[str]:
    if embeddings is None:
        return []
    if embeddings == "both":
        return list(EMBEDDINGS)
    if embeddings not in EMBEDDINGS:
        raise ValueError(f"embeddings must be 'gating', 'features', 'both' or None, got {embeddings!r}")
    return [embeddings]


# ---- the command --------------------------------------------------------------------------------------
def cluster_probabilities(out: dict[str, Any], run: LoadedRun) -> Any:
    """(N, K) cluster probabilities where the run's method has them (MiCE: posterior, MIX'EM: pi)."""
    probs = run.model.cluster_probabilities(out)
    if probs is None:
        method = run.cfg.method.name
        raise ValueError(f"this run (method {method!r}) has no cluster probabilities for new images: its "
                         f"clusters are k-means over the training set (RUN/assignments.csv); predicting "
                         f"clusters needs a mice or mixem run with K >= 2")
    return probs


def check_run(run: LoadedRun, kinds: Sequence[str] = ()) -> None:
    """Fail before reading any file if the run cannot give clusters (or the asked embeddings)."""
    out = run.infer(torch.zeros(1, 3, run.image_size, run.image_size, dtype=torch.uint8))
    cluster_probabilities(out, run)
    available = {n: key for n, key in run.model.embedding_outputs.items() if key in out}
    for k in kinds:
        if k not in available:
            raise ValueError(f"this run (method {run.cfg.method.name!r}) has no {k} embedding; available: "
                             f"{', '.join(available)}")


def with_batch_size(run: LoadedRun, batch_size: int | None) -> LoadedRun:
    """A view of `run` whose inference uses `batch_size` images per forward pass (None: the run's own)."""
    if batch_size is None:
        return run
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    cfg = dataclasses.replace(run.cfg, eval=dataclasses.replace(run.cfg.eval, batch_size=batch_size))
    return dataclasses.replace(run, cfg=cfg)


def predict(run: LoadedRun | str | Path, inputs: Sequence[str | Path], out_csv: str | Path,
            embeddings: str | None = None, batch_size: int | None = None, progress: bool = True,
            chunk: int = CHUNK, num_workers: int | None = None) -> dict[str, Any]:
    """Cluster every image under `inputs` and write `out_csv` (+ embeddings, + skipped list).

    `run` is a loaded run or a run folder. CSV columns: path, cluster (argmax of the cluster
    probabilities: MiCE's posterior, MIX'EM's pi), confidence (its probability), runner_up,
    runner_up_confidence. `embeddings` ("gating", "features", "both") also writes
    <stem>.<kind>.npy, float32, row i = CSV row i. Unreadable files are not fatal: they go to
    <stem>.skipped.txt (path<TAB>reason). Returns counts and the paths written.
    """
    from tqdm.auto import tqdm

    run = load_run(run) if isinstance(run, (str, Path)) else run
    run = with_batch_size(run, batch_size)
    kinds = _embedding_kinds(embeddings)
    check_run(run, kinds)
    files = list_images(inputs)
    outs = output_paths(out_csv)
    outs["csv"].parent.mkdir(parents=True, exist_ok=True)
    writers = {k: NpyRowWriter(outs[k]) for k in kinds}
    skipped: list[tuple[str, str]] = []
    sizes = np.zeros(run.cfg.method.num_clusters, dtype=np.int64)
    # disable=None: no bar when stderr is not a terminal (logs, CI).
    try:
        with open(outs["csv"], "w", newline="") as fh, \
                tqdm(total=len(files), desc="predicting", unit="img", disable=None if progress else True) as bar:
            w = csv.writer(fh)
            w.writerow(CSV_COLUMNS)
            for part in iter_decoded(files, run.image_size, chunk, num_workers):
                skipped.extend(part.skipped)
                if part.paths:
                    out = run.infer(torch.from_numpy(part.images))
                    probs = cluster_probabilities(out, run).cpu()
                    w.writerows(_csv_rows(part.paths, probs))
                    sizes += np.bincount(probs.argmax(1).numpy(), minlength=len(sizes))
                    for k, writer in writers.items():
                        writer.append(out[run.model.embedding_outputs[k]].cpu().numpy())
                bar.update(len(part.paths) + len(part.skipped))
    finally:  # also on errors and Ctrl-C: the .npy files stay valid arrays of the rows written so far
        for writer in writers.values():
            writer.close()
    _write_skipped(outs["skipped"], skipped)
    n = int(sizes.sum())
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s) of {len(files)}, listed in {outs['skipped']}",
              file=sys.stderr)
    if n == 0:
        raise DataError(f"none of the {len(files)} files could be read as an image (first: "
                        f"{skipped[0][0]}: {skipped[0][1]}); the list is in {outs['skipped']}")
    return {"csv": outs["csv"], "num_images": n, "num_skipped": len(skipped), "skipped": skipped,
            "skipped_file": outs["skipped"] if skipped else None,
            "embeddings": {k: outs[k] for k in kinds}, "cluster_sizes": sizes.tolist()}


def _write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    if not skipped:
        path.unlink(missing_ok=True)  # a list left by an earlier prediction would now be wrong
        return
    path.write_text("".join(f"{p}\t{' '.join(reason.split())}\n" for p, reason in skipped))  # one line each


PREDICT_HELP = """\
Assign images to the clusters of a trained run. IMAGES are image files and/or folders, searched
recursively for .jpg .jpeg .png .bmp .webp (any case); no labels are needed and the images may have
any size: each is resized to the run's training size as in training (shorter side, centre crop).

Writes a CSV with one row per readable image, in the order given (folders sorted, depth first):
  path (absolute), cluster, confidence, runner_up, runner_up_confidence
(confidence = the cluster's probability, MiCE's posterior; runner_up = the second most likely cluster).
Needs a method with cluster probabilities (mice, mixem); simclr and moco runs cluster by k-means.
With --embeddings, also writes float32 arrays next to it whose row i belongs to CSV row i:
  <stem>.gating.npy (MiCE gating embeddings, unit length) and/or <stem>.features.npy (backbone features).
Unreadable files are skipped and listed in <stem>.skipped.txt (path<TAB>reason).

Examples:
  fastmice predict runs/cifar10 ~/photos --out photos.csv
  fastmice predict runs/cifar10 a.jpg b.png more/ --embeddings both --device cuda
"""


def add_predict_arguments(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `fastmice predict RUN IMAGES... [--out CSV] [--embeddings ...] [--device] [--batch-size]`."""
    p = subparsers.add_parser("predict", help="assign new images (files or folders) to a run's clusters",
                              description=PREDICT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run folder holding checkpoint.pt")
    p.add_argument("images", metavar="IMAGES", nargs="+", help="image files and/or folders (recursive)")
    p.add_argument("--out", metavar="CSV", default="predictions.csv",
                   help="CSV to write (default: predictions.csv in the current folder)")
    p.add_argument("--embeddings", choices=["gating", "features", "both"],
                   help="also save embeddings as <stem>.gating.npy / <stem>.features.npy next to the CSV")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto, the GPU if any)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="images per forward pass (default: the run's eval.batch_size)")
    p.set_defaults(func=cmd_predict)
    return p


def cmd_predict(args: argparse.Namespace, overrides: list[str]) -> int:
    from fastmice.config import parse_overrides

    run = load_run(args.run, args.device, parse_overrides(overrides))
    result = predict(run, args.images, args.out, args.embeddings, args.batch_size)
    sizes = result["cluster_sizes"]
    print(f"{result['num_images']} images -> {result['csv']} ({sum(s > 0 for s in sizes)} of {len(sizes)} "
          f"clusters used)" + (f"; {result['num_skipped']} unreadable skipped, listed in "
                               f"{result['skipped_file']}" if result["num_skipped"] else ""))
    for path in result["embeddings"].values():
        print(f"embeddings: {path}")
    return 0
