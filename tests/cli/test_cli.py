"""The `fastmice` command end to end: train, eval, resume, bad input."""
import csv
import json
import shutil
import warnings
import subprocess
import sys

import pytest
from PIL import Image

from tests.helpers import CIFAR10_JPEG, tiny_overrides
from fastmice.cli import main


def test_train_then_eval_on_digits(tmp_path, capsys):
    args = ["train", "--run-dir", str(tmp_path / "run")] + tiny_overrides(tmp_path, **{"eval.pixel_baseline": "true"})
    assert main(args) == 0
    out = capsys.readouterr().out
    for word in ("posterior", "gating", "kmeans", "k-means on raw pixels", "ACC"):
        assert word in out
    run = tmp_path / "run"
    # The end of the output: the readout against the pixel baseline, the cluster sizes, where the pictures are.
    tail = out.splitlines()
    assert any(" for k-means on raw pixels: " in line and line.startswith("posterior ACC ") for line in tail)
    sizes = next(line for line in tail if line.startswith("cluster sizes (posterior), largest first: "))
    assert sizes.endswith("(an even split: 180 each)")
    assert tail[-2] == f"written to {run}: eval.json, assignments.csv, cluster_sizes.png, confusion.png"
    assert tail[-1] == f"pictures and the HTML report: fastmice report {run}"
    for name in ("checkpoint.pt", "config.yaml", "metrics.jsonl", "eval.json", "assignments.csv",
                 "cluster_sizes.png", "confusion.png"):
        assert (run / name).is_file(), name
    first = json.loads((run / "eval.json").read_text())
    assert first["num_images"] == 1797
    listed = [int(x) for x in sizes.split(": ")[1].split(" (")[0].split()]
    assert listed == sorted(first["readouts"]["posterior"]["cluster_sizes"], reverse=True)
    assert set(first["readouts"]) == {"posterior", "gating", "kmeans"}
    for r in first["readouts"].values():
        assert 0 <= r["acc"] <= 1 and sum(r["cluster_sizes"]) == 1797

    # Evaluation is deterministic: the queue is frozen, nothing is enqueued.
    assert main(["eval", str(run)]) == 0
    second = json.loads((run / "eval.json").read_text())
    assert second["readouts"]["posterior"] == first["readouts"]["posterior"]
    assert second["readouts"]["gating"] == first["readouts"]["gating"]

    # Resume a finished run for one more epoch.
    assert main(["train", "--resume", str(run), "--optim.epochs=3", "--eval.at_end=false"]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in records if r["type"] == "epoch"]
    assert epochs == [1, 2, 3]


def test_train_on_image_folder_with_a_corrupt_file(tmp_path, capsys):
    if not CIFAR10_JPEG.is_dir():
        pytest.skip(f"{CIFAR10_JPEG} not present")
    root = tmp_path / "imgs"
    for cls in ("airplane", "cat", "ship"):
        (root / cls).mkdir(parents=True)
        for f in sorted((CIFAR10_JPEG / "test" / cls).glob("*.jpg"))[:40]:
            shutil.copy(f, root / cls / f.name)
    (root / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    args = ["train", str("digits"), "--run-dir", str(tmp_path / "run"), "--data.source=folder",
            f"--data.root={root}", "--data.image_size=null", "--method.num_clusters=3"] + \
        tiny_overrides(tmp_path, **{"data.image_size": "null"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # no raw UserWarning: the list goes to the run folder
        assert main(args) == 0
    out = capsys.readouterr().out
    listed = tmp_path / "run" / "skipped_files.txt"
    assert "120 images of 32px" in out and f"1 unreadable skipped (listed in {listed})" in out
    assert listed.read_text().startswith(str(root / "cat" / "broken.jpg") + "\t")
    rows = list(csv.DictReader(open(tmp_path / "run" / "assignments.csv")))
    assert len(rows) == 120 and rows[0]["path"].endswith(".jpg") and rows[0]["label"] == "0"


def test_unlabelled_folder_trains_and_evaluates(tmp_path, capsys):
    root = tmp_path / "unlabelled"
    (root / "nested").mkdir(parents=True)
    import numpy as np
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / ("nested" if i % 2 else ".") / f"{i}.png")
    args = ["train", "--run-dir", str(tmp_path / "run"), "--data.source=folder", f"--data.root={root}",
            "--method.num_clusters=2"] + tiny_overrides(tmp_path, **{"method.queue_size": 32, "optim.batch_size": 16})
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no labels" in out
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert "acc" not in result["readouts"]["posterior"] and sum(result["readouts"]["posterior"]["cluster_sizes"]) == 40
    assert not (tmp_path / "run" / "confusion.png").exists()


@pytest.mark.parametrize("args,message", [
    (["train", "--data.source=folder", "--data.root=/no/such/folder"], "/no/such/folder"),
    (["train", "--method.queue_size=5000"], "exceeds the dataset size"),
    (["train", "--model.num_clusterz=3"], "did you mean method.num_clusters"),
    (["eval", "/no/such/run"], "no checkpoint"),
])
def test_bad_input_is_a_clear_error(args, message, tmp_path, capsys):
    assert main(args + [f"--train.out_dir={tmp_path}"] if args[0] == "train" else args) == 2
    assert message in capsys.readouterr().err


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "fastmice", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--section.key=value" in out.stdout
