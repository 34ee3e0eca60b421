"""train.loggers: TensorBoard and W&B get metrics.jsonl's records at its steps, across a resume; the default
imports neither package; a missing package is one line before training. No network: W&B runs offline."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.helpers import REPO, make_trainer, read_offline_run
from fastmice.config import ConfigError, load_config
from fastmice.engine.loggers import coarsen, final_values, histogram_edges, split_record
from fastmice.engine.run_log import RunLog
from fastmice.engine.trainer import Trainer

# 96 digits, batches of 32: 3 steps an epoch, 2 epochs; log_every=2. Stopped at step 4 (epoch 2, after one
# step) and resumed, the run logs steps 2, 3 (epoch 1's end), 4 (the stop), 5, 6 (epoch 2's end).
STEPS = [2, 3, 4, 5, 6]
EPOCH_STEPS = [3, 6]


def records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_records_become_tags_by_hand():
    scalars, hists = split_record({"type": "epoch", "epoch": 2, "step": 20, "loss": 1.5, "lr": 0.1,
                                   "cluster_sizes": [3, 0, 7], "posterior_hist": [1, 2], "note": "text"})
    assert scalars == {"epoch/epoch": 2.0, "epoch/loss": 1.5, "epoch/lr": 0.1}
    assert {k: v.tolist() for k, v in hists.items()} == {"epoch/cluster_sizes": [3, 0, 7],
                                                         "epoch/posterior_hist": [1, 2]}
    assert histogram_edges("epoch/cluster_sizes", 3).tolist() == [0, 1, 2, 3]
    assert histogram_edges("epoch/posterior_hist", 2).tolist() == [0.0, 0.5, 1.0]
    counts, edges = coarsen(np.array([1, 2, 3, 4, 5]), np.arange(6.0), 2)   # W&B's 512-bucket limit, here 2
    assert counts.tolist() == [6, 9] and edges.tolist() == [0, 3, 5]
    counts, edges = coarsen(np.array([1, 2]), np.arange(3.0), 2)
    assert counts.tolist() == [1, 2] and edges.tolist() == [0, 1, 2]
    scalars, _ = split_record({"type": "eval", "epoch": 1, "step": 10, "posterior": {"acc": 0.5, "nmi": 0.25},
                               "linear_probe": {"accuracy": 0.75, "train": 8}})
    assert scalars == {"probe/posterior/acc": 0.5, "probe/posterior/nmi": 0.25,
                       "probe/linear_probe/accuracy": 0.75, "probe/linear_probe/train": 8.0}
    scalars, _ = split_record({"type": "compile", "mode": "default", "seconds": 12.5, "graph_breaks": 0, "step": 1})
    assert scalars == {"compile/seconds": 12.5, "compile/graph_breaks": 0.0}
    final = final_values({"primary": "posterior", "readouts": {
        "posterior": {"acc": 0.5, "nmi": 0.4, "ari": 0.3, "cluster_sizes": [1, 2]}, "kmeans": {"acc": 0.6}},
        "confidence": {"mean": 0.9}, "method": "mice"})
    assert final == {"final/posterior/acc": 0.5, "final/posterior/nmi": 0.4, "final/posterior/ari": 0.3,
                     "final/kmeans/acc": 0.6, "final/confidence/mean": 0.9,
                     "final/acc": 0.5, "final/nmi": 0.4, "final/ari": 0.3}


def test_unknown_logger_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.loggers: 'tensorbord'; choose from jsonl, tensorboard, wandb"):
        load_config("digits", ["--train.loggers=[jsonl,tensorbord]"])
    assert load_config("digits", ["--train.loggers=tensorboard,wandb"]).train.loggers == ["tensorboard", "wandb"]


def test_tensorboard_and_wandb_follow_metrics_jsonl_across_a_resume(tmp_path, digits_small, offline_wandb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    data = digits_small.subset(torch.arange(96))
    part = make_trainer(tmp_path, data, "seed0", **{"train.max_steps": 4, "train.loggers": "[tensorboard,wandb]",
                                                  "train.wandb_tags": "[t1]"})
    assert part.fit()["status"] == "max_steps"
    part.close()
    run = tmp_path / "seed0"   # named like a --seeds run: W&B groups it under its folder
    # A process killed after the checkpoint at step 4 had logged steps 5 and 6 with other values: the resumed
    # run's curves hold its own values there, once (metrics.jsonl drops such records the same way).
    with SummaryWriter(str(run / "tensorboard")) as ghost:
        for step in (5, 6):
            ghost.add_scalar("train/loss", 999.0, step)
    time.sleep(1.1)   # event files sort by their creation second: the resumed session's comes last
    resumed = Trainer.resume(run, {"train": {"max_steps": None}}, data)
    assert resumed.fit()["status"] == "finished"
    resumed.close()

    steps, epochs = records(run, "step"), records(run, "epoch")
    assert [r["step"] for r in steps] == STEPS and [r["step"] for r in epochs] == EPOCH_STEPS

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    for tag, key, recs in (("train/loss", "loss", steps), ("train/lr", "lr", steps),
                           ("train/samples_per_s", "samples_per_s", steps), ("epoch/loss", "loss", epochs)):
        events = ea.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in recs], tag
        np.testing.assert_allclose([e.value for e in events], [r[key] for r in recs], rtol=1e-6, err_msg=tag)
    for tag in ("epoch/cluster_sizes", "epoch/posterior_hist"):
        hists = ea.Histograms(tag)
        assert [h.step for h in hists] == EPOCH_STEPS
        key = tag.split("/")[1]
        assert [list(h.histogram_value.bucket) for h in hists] == [r[key] for r in epochs]
    sizes = ea.Histograms("epoch/cluster_sizes")[0].histogram_value
    assert list(sizes.bucket_limit) == list(range(1, 11)) and sizes.num == 96   # K=10, every sample counted
    assert ea.Histograms("epoch/posterior_hist")[0].histogram_value.bucket_limit[-1] == 1.0
    assert set(ea.PluginTagToContent("hparams")) >= {"_hparams_/experiment", "_hparams_/session_start_info"}

    # W&B: one offline folder a session, the same run id (kept in the run folder), curves on global_step.
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    sessions = [read_offline_run(f) for f in folders]
    run_id = (run / "wandb" / "fastmice-run-id").read_text().strip()
    assert [s["id"] for s in sessions] == [run_id, run_id]
    assert (sessions[0]["group"], sessions[0]["name"], sessions[0]["tags"]) == (
        tmp_path.name, f"{tmp_path.name}/seed0", ["t1"])
    assert sessions[0]["config"]["optim"]["batch_size"] == 32 and sessions[0]["config"]["train"]["seed"] == 0
    rows = [row for s in sessions for row in s["history"]]
    losses = [(r["global_step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert [s for s, _ in losses] == [r["step"] for r in steps]       # pytest.approx takes flat lists only
    assert [v for _, v in losses] == pytest.approx([r["loss"] for r in steps])
    hists = [(r["global_step"], r["epoch/cluster_sizes"]) for r in rows if "epoch/cluster_sizes" in r]
    assert [(s, h["values"], h["bins"]) for s, h in hists] == [(r["step"], r["cluster_sizes"], list(range(11)))
                                                               for r in epochs]
    assert sessions[1]["summary"]["epoch/loss"] == pytest.approx(epochs[-1]["loss"])


def test_other_ranks_open_no_dashboard(tmp_path):
    cfg = load_config("digits", ["--train.loggers=[tensorboard]"]).to_dict()
    RunLog(tmp_path / "rank1", enabled=False).start(cfg, 0)   # RunLog is disabled on ranks other than 0
    assert not (tmp_path / "rank1").exists()
    log = RunLog(tmp_path / "rank0")
    log.start(cfg, 0)
    log.write({"type": "step", "epoch": 1, "step": 2, "loss": 0.5, "lr": 0.1, "samples_per_s": 10.0})
    log.close()
    assert len(list((tmp_path / "rank0" / "tensorboard").glob("events.out.tfevents.*"))) == 1


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_default_imports_neither_package(tmp_path):
    run = tmp_path / "run"
    proc = _python(
        "import sys\n"
        "from tests.helpers import tiny_overrides\n"
        "from fastmice.cli import main\n"
        f"code = main(['train', '--run-dir', {str(run)!r}, '--train.max_steps=1', '--eval.at_end=false']"
        f" + tiny_overrides({str(tmp_path)!r}))\n"
        "assert code == 0, code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'wandb')"
        " or m == 'torch.utils.tensorboard'))\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (run / "tensorboard").exists() and not (run / "wandb").exists()


def test_missing_package_is_one_line_before_training(tmp_path):
    proc = _python(
        "import sys\n"
        "sys.modules['tensorboard'] = None; sys.modules['wandb'] = None   # as if not installed\n"
        "from tests.helpers import tiny_overrides\n"
        "from fastmice.cli import main\n"
        "for name in ('tensorboard', 'wandb'):\n"
        f"    print(main(['train', '--run-dir', {str(tmp_path)!r} + '/' + name, '--train.loggers=' + name]"
        f" + tiny_overrides({str(tmp_path)!r})))\n"
        f"print(main(['train', '--seeds', '0,1', '--run-dir', {str(tmp_path)!r} + '/sweep', '--train.loggers=wandb']"
        f" + tiny_overrides({str(tmp_path)!r})))\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "2", "2"]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 3, proc.stderr
    assert errors[2] == errors[1]   # a --seeds sweep: once, before the first seed
    assert errors[0].startswith("fastmice: error: train.loggers includes tensorboard")
    assert 'pip install "fastmice[tensorboard]"' in errors[0]
    assert errors[1].startswith("fastmice: error: train.loggers includes wandb")
    assert 'pip install "fastmice[wandb]"' in errors[1]
    assert not any(tmp_path.glob("*/metrics.jsonl")) and not (tmp_path / "sweep").exists()
