"""The official learning-rate schedules (issue 14), epoch by epoch against values worked out by hand and, for
MIX'EM, against torch's CosineAnnealingLR stepped the way MIX'EM's train.py steps it."""
import json
import math

import pytest
import torch

from tests.helpers import make_trainer
from fastmice.config import load_config
from fastmice.core.errors import ConfigError
from fastmice.engine.optim import learning_rate


def _cfg(*overrides):
    return load_config("digits", list(overrides))


def test_mice_official_epoch_by_epoch():
    """MiCE's public run: 1001 epochs (0..1000), lr 1.0, warm-up 10, decay x0.1 after 480, 640, 800."""
    cfg = _cfg("--optim.schedule=mice_official", "--optim.lr=1.0", "--optim.epochs=1001",
               "--optim.warmup_epochs=10", "--optim.lr_steps=[480,640,800]", "--optim.lr_gamma=0.1")
    expected = ([e / 10 for e in range(11)]          # epochs 0..10: 0, 0.1, ..., 1.0 (epoch 0 at lr 0)
                + [1.0] * 470                        # epochs 11..480: 480 is not > 480
                + [0.1] * 160                        # 481..640
                + [0.01] * 160                       # 641..800
                + [0.001] * 200)                     # 801..1000
    assert len(expected) == 1001
    for e, want in enumerate(expected):
        for step in (0, 3, 9):                       # one value per epoch: the step does not matter
            assert learning_rate(cfg, e, step, 10) == pytest.approx(want, rel=1e-12, abs=0), (e, step)
    assert learning_rate(cfg, 0, 5, 10) == 0.0


def test_mice_official_without_warmup_starts_at_base():
    """W = 0: the official linear_rampup(0, 0) is 1, so epoch 0 already runs at base."""
    cfg = _cfg("--optim.schedule=mice_official", "--optim.lr=0.5", "--optim.warmup_epochs=0",
               "--optim.lr_steps=[3]", "--optim.lr_gamma=0.1")
    assert [learning_rate(cfg, e, 0, 4) for e in range(6)] == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.05, 0.05])


def test_mixem_official_by_hand():
    """lr 1e-4, 200 epochs, W 10: held for epochs 0..9, then (1 + cos(pi t / 200)) / 2 with t = e - 9."""
    cfg = _cfg("--optim.schedule=mixem_official", "--optim.lr=1e-4", "--optim.epochs=200",
               "--optim.warmup_epochs=10")
    for e in range(10):
        assert learning_rate(cfg, e, 0, 7) == 1e-4
    # epoch 10: cos(pi/200) = 0.99987663 -> 0.99993831e-4; epoch 109: t = 100, cos(pi/2) = 0 -> half;
    # epoch 199: t = 190, (1 - cos(pi/20)) / 2 = sin^2(pi/40) = 0.0784591^2 = 0.00615583
    assert learning_rate(cfg, 10, 0, 7) == pytest.approx(0.99993831e-4, rel=1e-7)
    assert learning_rate(cfg, 109, 3, 7) == pytest.approx(0.5e-4, rel=1e-12)
    assert learning_rate(cfg, 199, 6, 7) == pytest.approx(6.15583e-7, rel=1e-5)
    assert all(learning_rate(cfg, e, 0, 7) > 0 for e in range(200))


def test_mixem_official_matches_cosine_annealing_stepped_the_official_way():
    """train.py: Adam at lr, CosineAnnealingLR(T_max=200, eta_min=0); 1-based epochs 1..200, each run at
    get_last_lr(), scheduler.step() at the end of every epoch >= 10. fastmice's epochs are 0-based."""
    cfg = _cfg("--optim.schedule=mixem_official", "--optim.lr=1e-4", "--optim.epochs=200",
               "--optim.warmup_epochs=10")
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200, eta_min=0)
    for epoch_counter in range(1, 201):
        official = sched.get_last_lr()[0]
        for step in (0, 5):
            assert learning_rate(cfg, epoch_counter - 1, step, 6) == pytest.approx(official, rel=1e-9, abs=1e-15)
        opt.step()                                   # keeps torch from warning about the call order
        if epoch_counter >= 10:
            sched.step()


def test_mixem_official_short_run():
    """T 4, W 2: epochs 0, 1 at base, then t = 1, 2: (1 + cos(pi/4)) / 2 = 0.853553, (1 + 0) / 2 = 0.5."""
    cfg = _cfg("--optim.schedule=mixem_official", "--optim.lr=2.0", "--optim.epochs=4", "--optim.warmup_epochs=2")
    assert [learning_rate(cfg, e, 0, 3) for e in range(4)] == pytest.approx([2.0, 2.0, 1.707107, 1.0], rel=1e-6)
    assert (1 + math.cos(math.pi / 4)) == pytest.approx(1.707107, rel=1e-6)


def test_unknown_schedule_is_refused():
    with pytest.raises(ConfigError, match="optim.schedule must be one of"):
        _cfg("--optim.schedule=official")


def test_mice_official_epoch_zero_leaves_the_networks_unchanged(tmp_path, digits_small):
    """Epoch 0 at lr 0 only fills the queue (and sets mu): the student keeps its initial weights (weight
    decay and momentum are scaled by the lr too); the epoch record carries the per-epoch lr, 0."""
    t = make_trainer(tmp_path, digits_small, "warm", **{"optim.schedule": "mice_official", "optim.warmup_epochs": 1,
                                                        "optim.epochs": 1, "optim.lr": 0.5})
    start = {k: v.clone() for k, v in t.method.student.backbone.state_dict().items()}
    t.fit()
    after = t.method.student.backbone.state_dict()
    for k, v in start.items():
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):   # BN statistics still move
            assert torch.equal(v, after[k]), k
    assert t.method.queue.abs().sum() > 0
    records = [json.loads(line) for line in (tmp_path / "warm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if r["type"] == "epoch"] == [0.0]
