"""`fastmice report`: the files exist and open, the HTML links only existing files, unlabelled runs work,
and (when chromium is installed) the page renders in a headless browser."""
import argparse
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmice.data.sources import ImageDataset
from fastmice.report.html_report import add_report_arguments, make_report, read_epochs, write_cluster_sheets
from tests.helpers import tiny_run


class _Sources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.sources += [v for k, v in attrs if k in ("src", "href") and v]


def html_sources(index: Path) -> list[str]:
    parser = _Sources()
    parser.feed(index.read_text(encoding="utf-8"))
    return parser.sources


def check_report_files(index: Path) -> list[str]:
    """Every PNG in the report decodes; every src/href is a relative path to an existing file."""
    pngs = sorted(index.parent.rglob("*.png"))
    assert pngs
    for png in pngs:
        with Image.open(png) as im:
            im.load()
            assert im.width > 10 and im.height > 10, png
    sources = html_sources(index)
    for src in sources:
        assert not src.startswith(("/", "file:", "http")), src
        assert (index.parent / src).is_file(), src
    assert "<script" not in index.read_text()
    return sources


@pytest.fixture(scope="module")
def labelled_report(tmp_path_factory):
    """`fastmice report` on a copy of the tiny labelled run without eval.json (so it evaluates first)."""
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(tiny_run(tmp_path_factory.getbasetemp()), run)
    for name in ("eval.json", "assignments.csv", "cluster_sizes.png", "confusion.png"):
        (run / name).unlink()
    parser = argparse.ArgumentParser(prog="fastmice")
    add_report_arguments(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(run), "--device", "cpu"])
    assert args.func(args, []) == 0
    return run / "report" / "index.html"


def test_labelled_report(labelled_report, capsys):
    index = labelled_report
    run = index.parent.parent
    assert (run / "eval.json").is_file() and (run / "confusion.png").is_file()  # evaluated on the way
    sources = check_report_files(index)
    for name in ("training.png", "cluster_evolution.png", "cluster_sizes.png", "confusion.png"):
        assert name in sources, name
    sheets = [s for s in sources if s.startswith("clusters/")]
    sizes = json.loads((run / "eval.json").read_text())["readouts"]["posterior"]["cluster_sizes"]
    assert len(sheets) == sum(s > 0 for s in sizes) == len(list((index.parent / "clusters").iterdir()))
    text = index.read_text()
    for word in ("ACC %", "NMI %", "ARI %", "majority class", "purity", "confidence mean", "highest confidence"):
        assert word in text, word
    # A tiny 8 px image is enlarged (nearest neighbour) so that a grid cell is at least 48 px.
    with Image.open(index.parent / sheets[0]) as im:
        assert im.height >= 2 * 48


def test_report_reruns_in_place_and_reads_resumed_metrics(labelled_report, tmp_path):
    run = labelled_report.parent.parent
    before = (run / "eval.json").stat().st_mtime_ns
    assert make_report(run, device="cpu") == labelled_report
    assert (run / "eval.json").stat().st_mtime_ns == before  # up to date: not evaluated again
    check_report_files(labelled_report)
    # metrics.jsonl after a resume repeats epochs; the last record of each epoch wins, bad lines are skipped.
    lines = [{"type": "epoch", "epoch": 1, "loss": 3.0}, {"type": "step", "epoch": 2, "loss": 9.0},
             {"type": "epoch", "epoch": 2, "loss": 2.0}, {"type": "eval", "epoch": 2, "kmeans": {"acc": 0.5}},
             {"type": "epoch", "epoch": 1, "loss": 1.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(map(json.dumps, lines)) + "\n{\"type\": \"ep")
    assert [(r["epoch"], r["loss"]) for r in read_epochs(path)] == [(1, 1.0), (2, 2.0)]
    assert [r["kmeans"]["acc"] for r in read_epochs(path, "eval")] == [0.5]


def test_cluster_sheets_for_k_100(tmp_path):
    """One PNG per non-empty cluster (never more than K files), tiny images enlarged to >= 48 px."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 255, (300, 3, 8, 8), dtype=np.uint8))
    ds = ImageDataset(images, None, None, "random")
    clusters = rng.integers(0, 90, 300)  # clusters 90..99 stay empty
    rows = write_cluster_sheets(ds, clusters, rng.random(300), 100, tmp_path)
    files = list((tmp_path / "clusters").iterdir())
    assert len(rows) == 100 and len(files) == len(set(clusters)) <= 100
    assert all(r["image"] is None for r in rows[90:])
    with Image.open(tmp_path / rows[0]["image"]) as im:
        assert im.height == 2 * (6 * 8 + 4)  # two rows of 8 px images at 6x, with their borders


@pytest.mark.filterwarnings("ignore:.*UNLABELLED folder")  # loose files plus a nested folder, on purpose
def test_unlabelled_report(tmp_path_factory):
    run = tiny_run(tmp_path_factory.getbasetemp(), labelled=False)
    index = make_report(run, device="cpu")
    sources = check_report_files(index)
    assert "confusion.png" not in sources and not (index.parent / "confusion.png").exists()
    assert "cluster_sizes.png" in sources and any(s.startswith("clusters/") for s in sources)
    text = index.read_text()
    assert "No labels" in text and "ACC" not in text and "majority class" not in text
    assert "non-empty clusters" in text and "confidence median" in text
    result = json.loads((run / "eval.json").read_text())
    assert all("acc" not in r for r in result["readouts"].values())


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_browser() is None, reason="no chromium or chromium-browser on PATH "
                    "(CI installs it: apt-get install -y --no-install-recommends chromium)")
def test_report_renders_in_headless_chromium(labelled_report, tmp_path):
    shot = tmp_path / "shot.png"
    cmd = [_browser(), "--headless", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
           labelled_report.resolve().as_uri()]
    if os.geteuid() == 0:  # chromium refuses to run as root with its sandbox (CI runs as root)
        cmd.insert(1, "--no-sandbox")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 200, f"only {len(colours)} colours: the page looks blank"
    # Not just a white page with text: a good part of the page is not background.
    assert (pixels.min(axis=2) < 200).mean() > 0.02
