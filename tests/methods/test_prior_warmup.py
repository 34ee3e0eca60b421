"""MiCE's gating-prior warm-up (method.prior_uniform_epochs, method.prior_ramp_epochs): the schedule by hand,
a uniform prior while it is 0, a prior at kappa / s while it ramps, and the trainer driving it per step."""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_same_state, make_trainer, tiny_overrides
from fastmice.config import load_config
from fastmice.core.errors import ConfigError
from fastmice.engine.trainer import Trainer
from fastmice.methods import build_method

SMALL = ["--backbone.arch=resnet10", "--backbone.width=4", "--method.embed_dim=16", "--method.queue_size=32",
         "--optim.batch_size=8"]


def mice(*overrides):
    torch.manual_seed(0)
    return build_method(load_config("cifar10", SMALL + list(overrides)))


def test_strength_schedule_by_hand():
    m = mice("--method.prior_uniform_epochs=2", "--method.prior_ramp_epochs=4")
    # 0 up to epoch 2, then (epoch - 2) / 4 up to epoch 6, then 1
    for epoch, want in [(0, 0.0), (1.99, 0.0), (2, 0.0), (3, 0.25), (5, 0.75), (6, 1.0), (40, 1.0)]:
        assert m.prior_strength(epoch) == pytest.approx(want)
    assert float(m.prior_scale) == 0.0                       # built at epoch 0: uniform
    assert mice().prior_strength(0) == 1.0 and float(mice().prior_scale) == 1.0   # no warm-up: the full prior
    ramp_only = mice("--method.prior_ramp_epochs=2")
    assert ramp_only.prior_strength(0) == 0.0 and ramp_only.prior_strength(0.5) == pytest.approx(0.25)


def test_uniform_phase_is_the_uniform_prior_and_leaves_the_gate_untrained():
    m = mice("--method.prior_uniform_epochs=1")
    torch.manual_seed(1)
    x = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    m.set_progress(0.5)
    out = m(list(x))
    out.loss.backward()
    assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().max() == 0
    # the loss by hand under pi_k = 1/K: -mean_b log (1/K sum_k phi_bk), phi from the expert logits alone
    with torch.no_grad():
        v = m.teacher(x[1])
        f = m.student_embed(x[0], x[2])[0]
        s = f + F.normalize(m.mu, dim=1)
        l_pos = (v * s).sum(-1)                                               # (B, K), tau = 1
        l_neg = torch.einsum("kvd,bkd->bkv", m.queue, s)                      # (B, K, V)
        log_phi = l_pos - torch.logsumexp(torch.cat([l_pos[..., None], l_neg], -1), -1)
        want = -(torch.logsumexp(log_phi, 1) - math.log(10)).mean()
    assert torch.allclose(out.loss.detach(), want, atol=1e-5)
    assert torch.allclose(out.posterior, torch.softmax(log_phi, 1), atol=1e-5)


def test_ramp_divides_kappa_by_the_strength():
    """At strength s the prior is softmax(g.omega * s / kappa): kappa 1 at s = 0.5 is kappa 2 at s = 1."""
    torch.manual_seed(2)
    x = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    ramped = mice("--method.prior_ramp_epochs=4")
    ramped.set_progress(2.0)                                   # s = 0.5
    hot = mice("--method.kappa=2.0")                           # same seed: the same weights
    ramped.eval(), hot.eval()
    a, b = ramped.infer(x[0]), hot.infer(x[0])
    assert torch.allclose(a["gating"], b["gating"], atol=1e-6)
    assert torch.allclose(a["posterior"], b["posterior"], atol=1e-6)


def test_strength_is_checkpointed_and_rewritten_after_a_load():
    m = mice("--method.prior_ramp_epochs=4")
    m.set_progress(3.0)
    state = m.state_dict()
    assert float(state["prior_scale"]) == 0.75
    fresh = mice("--method.prior_ramp_epochs=4")
    fresh.load_state_dict(state)
    assert float(fresh.prior_scale) == 0.75                    # eval of a checkpoint sees the trained strength
    fresh.prior_scale.fill_(0.1)                               # whatever the buffer holds, a step rewrites it
    fresh.load_state_dict(state | {"prior_scale": torch.tensor(0.1)})
    fresh.set_progress(0.0)
    assert float(fresh.prior_scale) == 0.0


def test_a_checkpoint_from_before_the_switch_resumes_and_evaluates(tmp_path, digits_small):
    """Written before prior_scale existed: every loader (resume, eval, init_from) takes it, at the full prior."""
    from fastmice.core.checkpoint import atomic_save, load_checkpoint
    from fastmice.engine.pretrained import load_pretrained
    from fastmice.eval.run import load_run
    t = make_trainer(tmp_path, digits_small, "old", **{"method.prior_ramp_epochs": 0, "train.max_steps": 5})
    t.fit()
    ckpt = load_checkpoint(tmp_path / "old")
    del ckpt["model"]["prior_scale"]
    for key in ("prior_uniform_epochs", "prior_ramp_epochs"):
        del ckpt["config"]["method"][key]
    atomic_save(ckpt, tmp_path / "old" / "checkpoint.pt")
    resumed = Trainer.resume(tmp_path / "old", {"train": {"max_steps": 7}}, digits_small)
    assert float(resumed.method.prior_scale) == 1.0 and resumed.cfg.method.prior_ramp_epochs == 0
    run = load_run(tmp_path / "old", device="cpu")
    assert float(run.model.prior_scale) == 1.0
    target = build_method(load_config("digits", tiny_overrides(tmp_path, **{"method.prior_ramp_epochs": 10})))
    load_pretrained(target, tmp_path / "old", scope="model")
    assert float(target.prior_scale) == 1.0
    assert torch.equal(target.mu, ckpt["model"]["mu"])


@pytest.mark.parametrize("bad,match", [(["--method.prior_ramp_epochs=-1"], "prior_ramp_epochs"),
                                       (["--method.prior_uniform_epochs=-0.5"], "prior_uniform_epochs")])
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config("cifar10", SMALL + bad)


def test_a3_on_a_config_with_a_warm_up_is_the_uniform_prior():
    """digits.yaml ramps the prior; the A3 ablation on it (prior=uniform) must run, and the ramp changes nothing."""
    assert load_config("digits", ["--method.prior=uniform"]).method.prior_ramp_epochs > 0
    torch.manual_seed(3)
    x = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    ramped, plain = mice("--method.prior=uniform", "--method.prior_ramp_epochs=4"), mice("--method.prior=uniform")
    for epoch in (0.0, 2.0, 9.0):
        ramped.set_progress(epoch)
        a, b = ramped(list(x)), plain(list(x))
        assert torch.equal(a.loss, b.loss) and torch.equal(a.posterior, b.posterior)


def test_trainer_drives_the_warm_up_per_step(tmp_path, digits_small):
    t = make_trainer(tmp_path, digits_small, "warm", **{"method.prior_uniform_epochs": 0.5,
                                                         "method.prior_ramp_epochs": 1})
    seen = []
    original = t.method.after_step

    def record(out):
        seen.append(float(t.method.prior_scale))
        original(out)

    t.method.after_step = record
    t.fit()                                                    # 2 epochs x 10 steps
    spe = t.feed.steps_per_epoch
    want = [t.method.prior_strength(e + p / spe) for e in range(2) for p in range(spe)]
    assert seen == pytest.approx(want) and seen[0] == 0.0 and seen[-1] == 1.0 and 0 < seen[spe] < 1
    resumed = Trainer.resume(tmp_path / "warm", {"optim": {"epochs": 3}}, digits_small)
    assert float(resumed.method.prior_scale) == 1.0


def test_resume_mid_ramp_equals_uninterrupted(tmp_path, digits_small):
    warm = {"method.prior_ramp_epochs": 1.5}
    full = make_trainer(tmp_path, digits_small, "full", **warm)
    full.fit()                                                 # 2 epochs x 10 steps
    part = make_trainer(tmp_path, digits_small, "part", **warm, **{"train.max_steps": 13})
    part.fit()                                                 # stops at 13 / 15 steps of the ramp
    assert 0 < float(part.method.prior_scale) < 1
    resumed = Trainer.resume(tmp_path / "part", {"train": {"max_steps": None}}, digits_small)
    resumed.fit()
    assert_same_state(full, resumed)


def test_a_run_shorter_than_the_warm_up_is_warned_about():
    with pytest.warns(UserWarning, match="prior_ramp_epochs = 10 is more than optim.epochs = 5"):
        load_config("digits", ["--optim.epochs=5"])
