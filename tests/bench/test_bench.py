"""Smoke runs of bench/bench_train.py and bench/time_to_accuracy.py on the CPU with tiny settings.

These check that the scripts run and report what they promise (fields, positive rates); the figures of a CPU
run say nothing about speed.
"""
import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import REPO, load_script


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine two OpenMP threads can stall each other for seconds a
    step, which would make these smoke runs slow without testing anything more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """train/ and test/ splits of two colour classes, 24 JPEGs of 16 px each per class and split."""
    root = tmp_path_factory.mktemp("tiny_jpeg")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(24):
                pixels = np.clip(rng.normal(colour, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


TINY_MODEL = ["--arch", "resnet10", "--width", "8", "--batch-size", "16", "--steps", "3", "--warmup", "1",
              "--override", "method.queue_size=256", "--override", "method.embed_dim=32"]


def test_bench_train_synthetic_reports_every_phase(tmp_path, capsys, one_thread):
    bench = load_script("bench_train")
    out = tmp_path / "bench.json"
    assert bench.main([*TINY_MODEL, "--device", "cpu", "--workers", "2", "--num-images", "256",
                       "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| path | phase | samples/s | step ms |" in printed and "fast / naive:" in printed
    report = json.loads(out.read_text())
    for key in ("command", "date", "commit", "device", "torch", "settings", "results", "ratios", "memory_kind"):
        assert key in report
    assert report["device"].startswith("cpu") and report["memory_kind"].startswith("cpu")
    rows = {(r["path"], r["phase"]): r for r in report["results"]}
    assert set(rows) == {(p, ph) for p in ("naive", "fast") for ph in ("data", "model", "end_to_end")}
    for r in rows.values():
        assert r["samples_per_s"] > 0 and r["step_ms"] > 0 and r["peak_mem_mb"] > 0
    assert set(report["ratios"]) == {"data", "model", "end_to_end"} and all(v > 0 for v in report["ratios"].values())
    s = report["settings"]
    assert (s["arch"], s["width"], s["batch_size"], s["queue_size"], s["compile"]) == ("resnet10", 8, 16, 256, "off")
    assert s["naive_transforms"]


def test_bench_train_reads_a_jpeg_folder(tiny_folder, tmp_path, capsys, one_thread):
    """--data DIR: the naive loader decodes the files in the DataLoader, the fast path holds them decoded."""
    bench = load_script("bench_train")
    out = tmp_path / "bench.json"
    assert bench.main([*TINY_MODEL, "--device", "cpu", "--workers", "0", "--data", str(tiny_folder / "train"),
                       "--phases", "end_to_end", "--override", "method.queue_size=32", "--override",
                       "method.num_clusters=2", "--single-pass", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["path"], r["phase"]) for r in report["results"]] == [("naive", "end_to_end"), ("fast", "end_to_end")]
    assert report["settings"]["num_images"] == 48 and report["settings"]["single_pass"] is True
    assert all(r["samples_per_s"] > 0 for r in report["results"])


def test_bench_train_dali_path_streams_the_folder(tiny_folder, tmp_path, one_thread):
    """--paths fast,dali: the same step fed by DALI reading the files every epoch (DALI's CPU mode here)."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    bench = load_script("bench_train")
    out = tmp_path / "bench.json"
    assert bench.main([*TINY_MODEL, "--device", "cpu", "--data", str(tiny_folder / "train"), "--paths", "fast,dali",
                       "--override", "method.queue_size=32", "--override", "method.num_clusters=2",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = [(r["path"], r["phase"]) for r in report["results"]]
    assert rows == [("fast", "data"), ("dali", "data"), ("fast", "model"), ("fast", "end_to_end"),
                    ("dali", "end_to_end")]
    assert all(r["samples_per_s"] > 0 for r in report["results"])
    assert any("FileImages(48 files" in n for n in report["notes"])


def test_time_to_accuracy_smoke(tiny_folder, tmp_path, capsys, one_thread):
    tta = load_script("time_to_accuracy")
    out = tmp_path / "tta.json"
    overrides = ["backbone.arch=resnet10", "backbone.width=4", "method.embed_dim=16", "method.queue_size=64",
                 "method.num_clusters=2", "optim.batch_size=16", "eval.pixel_baseline=false", "eval.kmeans_niter=5",
                 "eval.kmeans_restarts=1"]
    argv = ["--minutes", "0.1", "--data", str(tiny_folder), "--device", "cpu", "--run-dir", str(tmp_path / "run"),
            "--json", str(out)]
    for o in overrides:
        argv += ["--override", o]
    assert tta.main(argv) == 0
    printed = capsys.readouterr().out
    assert "time to accuracy:" in printed and "samples seen" in printed
    report = json.loads(out.read_text())
    assert report["num_images"] == 96                                 # train and test together
    assert report["steps"] >= 2 and report["samples_seen"] == 16 * report["steps"]
    assert report["epochs"] > 0 and report["rate_steps_per_s"] > 0 and report["planned_epochs"] >= 1
    assert report["train_s"] < 6 + 10                                  # the 6 s budget, plus at most a slow step
    for key in ("acc", "nmi", "ari"):
        assert 0 <= report[key] <= 1
    assert report["status"] in ("schedule finished", "max_steps reached", "budget ran out")
    for key in ("command", "date", "commit", "device", "budget_s", "lr_steps", "readouts"):
        assert key in report
    assert (tmp_path / "run" / "eval.json").is_file()


def test_compressed_schedule():
    from fastmice.config import load_config

    tta = load_script("time_to_accuracy")
    optim = load_config("cifar10").optim                     # x0.1 at 480/640/800 of 1000 epochs
    assert tta.compressed_schedule(optim, 100) == ([48, 64, 80], 0.0)
    assert tta.compressed_schedule(optim, 1) == ([1], 0.0)   # too short to decay: the decays merge at the end
