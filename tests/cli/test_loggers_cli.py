"""`fastmice train --train.loggers=tensorboard,wandb`: the evaluation's scores and pictures reach both
dashboards at the end, and `--resume` continues the same TensorBoard folder and W&B run."""
import json

import pytest

from tests.helpers import read_offline_run, tiny_overrides, write_digit_folder
from fastmice.cli import main


def test_train_resume_and_evaluate_into_both_dashboards(tmp_path, offline_wandb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = write_digit_folder(tmp_path / "images", 64, labelled=True)
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "--data.source=folder", f"--data.root={root}",
            "--train.loggers=tensorboard,wandb", "--train.wandb_project=fm-test", "--eval.probe_every=1"]
    # 64 images, batches of 32: 2 steps an epoch, 2 epochs; stopped at step 3 (evaluated), then resumed.
    assert main(args + tiny_overrides(tmp_path, **{"train.max_steps": 3})) == 0
    first = json.loads((run / "eval.json").read_text())
    assert main(["train", "--resume", str(run), "--train.max_steps=null"]) == 0
    final = json.loads((run / "eval.json").read_text())
    primary = final["readouts"][final["primary"]]

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "step"]
    assert steps == [2, 3, 4]
    assert [e.step for e in ea.Scalars("train/loss")] == steps
    probes = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    probe_acc = ea.Scalars("probe/posterior/acc")   # steps exactly, values to float32 (approx is flat-only)
    assert [e.step for e in probe_acc] == [r["step"] for r in probes] == [2, 4]
    assert [e.value for e in probe_acc] == pytest.approx([r["posterior"]["acc"] for r in probes])
    acc = ea.Scalars("final/acc")
    assert [e.step for e in acc] == [3, 4]
    assert [e.value for e in acc] == pytest.approx([first["readouts"][first["primary"]]["acc"], primary["acc"]])
    assert ea.Scalars(f"final/{final['primary']}/nmi")[-1].value == pytest.approx(primary["nmi"])
    for tag in ("final/confusion", "final/cluster_sizes"):
        images = ea.Images(tag)
        assert [i.step for i in images] == [3, 4]
        assert images[-1].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and images[-1].width > 50

    folders = sorted((run / "wandb").glob("offline-run-*"))
    sessions = [read_offline_run(f) for f in folders]
    assert len({s["id"] for s in sessions}) == 1 and len(sessions) == 2
    summary = sessions[1]["summary"]
    assert summary["final/acc"] == pytest.approx(primary["acc"])
    assert summary["final/confusion/_type"] == "image-file"
    assert (folders[1] / "files" / summary["final/confusion/path"]).is_file()
    assert sessions[0]["config"]["train"]["wandb_project"] == "fm-test"
