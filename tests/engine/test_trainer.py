"""Training mechanics: resume equals an uninterrupted run, Ctrl-C and NaN handling, schedule, checkpoints."""
import json
import signal

import pytest
import torch

from tests.helpers import assert_same_state, make_trainer, tiny_overrides
from fastmice.core.checkpoint import load_checkpoint
from fastmice.config import load_config
from fastmice.engine.trainer import NonFiniteLossError, Trainer, learning_rate


def test_resume_mid_epoch_equals_uninterrupted(tmp_path, digits_small):
    full = make_trainer(tmp_path, digits_small, "full")
    full.fit()                                                     # 2 epochs x 10 steps
    part = make_trainer(tmp_path, digits_small, "part", **{"train.max_steps": 13})
    summary = part.fit()                                           # stops mid-epoch 2
    assert summary["status"] == "max_steps" and summary["global_step"] == 13
    resumed = Trainer.resume(tmp_path / "part", {"train": {"max_steps": None}}, digits_small)
    assert (resumed.epoch, resumed.global_step, resumed.feed.pos) == (1, 13, 3)
    resumed.fit()
    assert_same_state(full, resumed)
    lines = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r["type"] == "epoch"] == [1, 2]
    assert all(r["loss"] > 0 for r in lines if r["type"] == "step")


@pytest.mark.parametrize("sig,sigint_ignored", [(signal.SIGINT, False), (signal.SIGTERM, False),
                                                (signal.SIGTERM, True)])
def test_ctrl_c_and_sigterm_write_checkpoint(tmp_path, digits_small, monkeypatch, sig, sigint_ignored):
    if sigint_ignored:  # as in a background job of a shell (`fastmice train ... &`, nohup)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    term_before, int_before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    t = make_trainer(tmp_path, digits_small, "sig")
    original = t.step
    calls = {"n": 0}

    def step_then_interrupt(views, index, lr):
        out = original(views, index, lr)
        calls["n"] += 1
        if calls["n"] == 4:
            signal.raise_signal(sig)               # Ctrl-C, or a scheduler's SIGTERM, during step 4
        return out

    monkeypatch.setattr(t, "step", step_then_interrupt)
    summary = t.fit()
    assert summary["status"] == "interrupted" and summary["global_step"] == 4
    state = load_checkpoint(tmp_path / "sig")
    assert state["global_step"] == 4 and state["batches"]["pos"] == 4
    assert signal.getsignal(signal.SIGTERM) == term_before
    assert signal.getsignal(signal.SIGINT) == int_before
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, digits_small, monkeypatch):
    t = make_trainer(tmp_path, digits_small, "nan")
    original = t.step

    def poisoned(views, index, lr):
        out = original(views, index, lr)
        if t.epoch == 1:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(t, "step", poisoned)
    with pytest.raises(NonFiniteLossError, match="NaN/inf"):
        t.fit()
    state = load_checkpoint(tmp_path / "nan")
    assert state["epoch"] == 1 and state["global_step"] == 10     # the end of the good epoch


def test_learning_rate_schedule(tmp_path):
    cfg = load_config("digits", ["--optim.lr=1.0", "--optim.lr_steps=[3,5]", "--optim.warmup_epochs=2"])
    lrs = [learning_rate(cfg, e, s, 4) for e in range(7) for s in range(4)]
    assert lrs[0] == pytest.approx(1.0 / 8) and lrs[7] == pytest.approx(1.0)     # linear warm-up over 8 steps
    assert lrs[8] == pytest.approx(1.0)
    assert lrs[12] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.01)


def test_queue_larger_than_dataset_is_refused(tmp_path, digits_small):
    with pytest.raises(ValueError, match="positives would come back as negatives"):
        make_trainer(tmp_path, digits_small, "q", **{"method.queue_size": 400})


def test_checkpoint_contents(tmp_path, digits_small):
    t = make_trainer(tmp_path, digits_small, "ck", **{"optim.epochs": 1})
    t.fit()
    state = load_checkpoint(tmp_path / "ck")
    for key in ("model", "optimizer", "epoch", "batches", "rng", "config"):
        assert key in state
    for buf in ("queue", "queue_ptr", "mu", "mu_sum", "omega", "teacher.backbone.stem.0.weight"):
        assert buf in state["model"]
    assert not list((tmp_path / "ck").glob("*.tmp"))             # atomic write left no temp file


def test_init_from_copies_the_backbone(tmp_path, digits_small):
    """MIX'EM started from a SimCLR run, as the MIX'EM README describes."""
    simclr = make_trainer(tmp_path, digits_small, "simclr", **{"method": "simclr", "optim.epochs": 1,
                                                               "optim.name": "adam", "optim.lr": 1e-3})
    simclr.fit()
    mixem = make_trainer(tmp_path, digits_small, "mixem", **{"method": "mixem", "train.init_from": tmp_path / "simclr"})
    for (name, a), b in zip(simclr.method.backbone.state_dict().items(), mixem.method.backbone.state_dict().values()):
        assert torch.equal(a, b), name
    mice = make_trainer(tmp_path, digits_small, "mice", **{"train.init_from": tmp_path / "simclr"})
    for a, b, c in zip(simclr.method.backbone.state_dict().values(), mice.method.student.backbone.state_dict().values(),
                       mice.method.teacher.backbone.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_resume_at_max_steps_runs_no_further_step(tmp_path, digits_small):
    t = make_trainer(tmp_path, digits_small, "ms", **{"train.max_steps": 7})
    assert t.fit()["global_step"] == 7
    again = Trainer.resume(tmp_path / "ms", None, digits_small)
    summary = again.fit()
    assert summary["status"] == "max_steps" and again.global_step == 7
