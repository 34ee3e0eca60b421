"""Interruptions and bad input (issue 13's cases; a stop at every step is in test_stop_battery.py): a log that
reads like the uninterrupted run's, non-finite weights never checkpointed, run folders protected, the A3
ablation evaluated, impossible states explained without a traceback."""
import json

import pytest
import torch

from fastmice.cli import main
from fastmice.core.checkpoint import load_checkpoint
from fastmice.engine.run_log import NonFiniteLossError
from fastmice.engine.trainer import Trainer
from fastmice.eval.evaluate import evaluate_model
from tests.helpers import make_trainer, tiny_overrides


def records(run, kind):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if json.loads(x)["type"] == kind]


def test_records_written_after_the_last_checkpoint_are_dropped_on_resume(tmp_path, digits_small):
    """A kill -9 after step 13's record but before its checkpoint: the resumed run logs those steps once."""
    part = make_trainer(tmp_path, digits_small, "part", **{"train.max_steps": 12})
    part.fit()
    with open(tmp_path / "part" / "metrics.jsonl", "a") as fh:     # what the killed process had logged
        fh.write(json.dumps({"type": "step", "epoch": 2, "step": 14, "loss": 9.0}) + "\n")
    Trainer.resume(tmp_path / "part", {"train": {"max_steps": None}}, digits_small).fit()
    steps = [r["step"] for r in records(tmp_path / "part", "step")]
    assert steps == sorted(set(steps)) and 14 in steps
    assert all(r["loss"] != 9.0 for r in records(tmp_path / "part", "step"))


def test_non_finite_weights_are_never_checkpointed(tmp_path, digits_small):
    t = make_trainer(tmp_path, digits_small, "nan")
    original = t.step

    def step(views, index, lr):
        out = original(views, index, lr)
        if t.epoch == 1 and t.feed.pos == 9:          # the last update of epoch 2: its loss was finite
            with torch.no_grad():
                t.method.gate.weight.fill_(float("nan"))
        return out
    t.step = step
    with pytest.raises(NonFiniteLossError, match="gate.weight.*not saved.*last good checkpoint"):
        t.fit()
    state = load_checkpoint(tmp_path / "nan")
    assert state["epoch"] == 1 and torch.isfinite(state["model"]["gate.weight"]).all()


def test_a_nan_before_any_checkpoint_says_so(tmp_path, digits_small):
    t = make_trainer(tmp_path, digits_small, "early")
    original = t.step

    def step(views, index, lr):
        out = original(views, index, lr)
        out.loss = out.loss * float("nan")
        return out
    t.step = step
    with pytest.raises(NonFiniteLossError, match="No checkpoint had been written yet"):
        t.fit()


def test_the_uniform_prior_ablation_trains_and_evaluates(tmp_path, digits_small):
    t = make_trainer(tmp_path, digits_small, "a3", **{"method.prior": "uniform", "method.mu_sgd_passes": 1,
                                                     "optim.epochs": 1})
    t.fit()                                            # A3 with Appendix E: mu's SGD pass without x_g
    result = evaluate_model(t.method, digits_small, t.cfg, t.device, tmp_path / "a3", t.crop_size)
    assert list(result["readouts"]) == ["posterior", "kmeans"]   # no gating readout under a uniform prior


def test_a_single_class_is_not_scored(tmp_path, digits_small):
    one = digits_small.subset(torch.arange(320))
    one.labels = torch.zeros(320, dtype=torch.int64)
    t = make_trainer(tmp_path, one, "one", **{"optim.epochs": 1})
    t.fit()
    result = evaluate_model(t.method, one, t.cfg, t.device, tmp_path / "one", t.crop_size)
    assert "acc" not in result["readouts"]["posterior"] and "single class" in result["note"]


def test_the_cli_protects_run_folders_and_explains(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run)] + tiny_overrides(tmp_path, **{"train.max_steps": 2})
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2                                             # a new run over a finished one
    err = capsys.readouterr().err
    assert "--resume" in err and "checkpoint.pt" in err and "Traceback" not in err
    assert main(["train", "--resume", str(run)] + [a for a in args if a.startswith("--train.max")]) == 0
    assert "has finished training" in capsys.readouterr().out          # nothing to resume: says so
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"\x00" * 100)
    assert main(["train", "--resume", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and err.count("\n") == 1
    assert main(["train", "--resume", str(run), "--method.num_clusters=5"]) == 2
    assert "K=10 clusters" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", "--run-dir", str(tmp_path / "gpu"), "--train.device=cuda"]
                    + tiny_overrides(tmp_path)) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_checkpoints_are_readable_by_others(tmp_path, digits_small):
    import os
    import stat
    old = os.umask(0o022)
    try:
        make_trainer(tmp_path, digits_small, "perm", **{"train.max_steps": 1}).fit()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "perm" / "checkpoint.pt").stat().st_mode) == 0o644
