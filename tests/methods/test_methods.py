"""MIX'EM, SimCLR and MoCo: their losses against plain implementations, and MoCo as the special case of MiCE."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastmice import mice_elbo, nt_xent
from fastmice.config import load_config
from fastmice.methods import build_method
from fastmice.ops.mixem_losses import associative_losses, batch_entropy, instance_entropy, instance_unconfidence
from fastmice.ops.prototypes import mmd_prototypes


def nt_xent_loop(z1, z2, t):
    """NT-Xent written out anchor by anchor."""
    z = F.normalize(torch.cat([z1, z2]), dim=1).double()
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        sims = torch.stack([z[i] @ z[m] / t for m in range(n2) if m != i])
        pos = z[i] @ z[j] / t
        total += -(pos - torch.logsumexp(sims, 0))
    return total / n2


@pytest.mark.parametrize("n,d,t", [(2, 4, 0.5), (7, 16, 0.1), (16, 32, 1.0)])
def test_nt_xent_matches_plain(n, d, t):
    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert torch.allclose(nt_xent(z1, z2, t).double(), nt_xent_loop(z1, z2, t), atol=1e-5)


def test_nt_xent_rewards_aligned_views():
    z = F.normalize(torch.randn(8, 16), dim=1)
    assert nt_xent(z, z) < nt_xent(z, torch.randn(8, 16))
    with pytest.raises(ValueError):
        nt_xent(z, z[:4])


def test_mixem_entropy_terms():
    k = 5
    uniform = torch.full((6, k), 1.0 / k)
    assert batch_entropy(uniform).item() == pytest.approx(math.log(k), abs=1e-5)     # the maximum
    onehot = F.one_hot(torch.tensor([0, 1, 2, 3, 4, 0]), k).float()
    assert instance_entropy(onehot).item() == pytest.approx(0.0, abs=1e-6)
    assert instance_unconfidence(onehot).item() == pytest.approx(0.0, abs=1e-6)
    assert instance_entropy(uniform).item() == pytest.approx(math.log(k), abs=1e-5)
    assert instance_unconfidence(uniform).item() == pytest.approx(1 - 1 / k)
    collapsed = F.one_hot(torch.zeros(6, dtype=torch.long), k).float()
    assert batch_entropy(collapsed).item() == pytest.approx(0.0, abs=1e-5)


def test_associative_pull_push_on_two_known_clusters():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [10.0, 2.0]])
    labels = torch.tensor([0, 0, 2, 2])                     # cluster 1 is empty and must be ignored
    pull, push = associative_losses(z, labels, k=3)
    # centres (1, 0) and (10, 1): each point is at squared distance 1 from its centre
    assert pull.item() == pytest.approx(1.0)
    assert push.item() == pytest.approx(math.exp(-(81 + 1) / 2), rel=1e-5)
    tight = torch.tensor([[1.0, 0.0], [1.0, 0.0], [10.0, 1.0], [10.0, 1.0]])
    assert associative_losses(tight, labels, 3)[0].item() == pytest.approx(0.0)


def infonce(f, v, queue, tau):
    """MoCo's InfoNCE: cross-entropy with the positive at index 0."""
    logits = torch.cat([(f * v).sum(1, keepdim=True), f @ queue.t()], 1) / tau
    return F.cross_entropy(logits, torch.zeros(f.shape[0], dtype=torch.long))


@pytest.mark.parametrize("k", [1, 4])
def test_mice_under_a3_a4_a5_is_infonce(k):
    """Theorem 3: uniform prior (A3), one output layer shared by the experts (A4), no class term (A5)."""
    torch.manual_seed(0)
    b, d, v_size, tau = 6, 16, 40, 0.7
    f1 = F.normalize(torch.randn(b, d), dim=1).requires_grad_()
    v1 = F.normalize(torch.randn(b, d), dim=1)
    q1 = F.normalize(torch.randn(v_size, d), dim=1)
    f = f1.unsqueeze(1).expand(b, k, d)                    # A4: the same embedding for every expert
    loss, post = mice_elbo(f, v1.unsqueeze(1).expand(b, k, d), torch.zeros(b, d), torch.zeros(k, d),
                           mmd_prototypes(k, d), q1.unsqueeze(0).expand(k, v_size, d), tau=tau)
    ref = infonce(f1, v1, q1, tau)
    assert torch.allclose(loss, ref, atol=1e-5)
    g1, = torch.autograd.grad(loss, f1)
    g2, = torch.autograd.grad(infonce(f1, v1, q1, tau), f1)
    assert torch.allclose(g1, g2, atol=1e-6)
    assert torch.allclose(post, torch.full((b, k), 1.0 / k))


def test_moco_method_is_mice_special_case():
    cfg = load_config("moco_cifar10", ["--backbone.arch=resnet10", "--backbone.width=4", "--method.embed_dim=16",
                                       "--method.queue_size=32", "--method.tau=0.2", "--optim.batch_size=8"])
    model = build_method(cfg).eval()
    assert model.k == 1 and model.prior == "uniform" and not model.class_term and model.num_views == 2
    x1, x2 = torch.randn(5, 3, 16, 16), torch.randn(5, 3, 16, 16)
    out = model([x1, x2])
    f = model.student(x1)[:, 0]
    ref = infonce(f, out.v[:, 0], model.queue[0], 0.2)
    assert torch.allclose(out.loss, ref, atol=1e-5)
    model.after_step(out)                                  # enqueue + EMA, no mu bookkeeping
    assert model.queue_ptr.item() == 5 and model.mu_count.sum() == 0


@pytest.mark.parametrize("method,views", [("mixem", 2), ("simclr", 2)])
def test_mixem_and_simclr_models(method, views):
    cfg = load_config(f"{method}_cifar10", ["--backbone.arch=resnet10", "--backbone.width=4", "--method.hidden_dim=16"])
    model = build_method(cfg)
    assert model.num_views == views
    x = torch.randn(6, 3, 16, 16)
    out = model([x, x.flip(-1)])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    inf = model.infer(x)
    assert inf["embedding"].shape == (6, 32) and torch.allclose(inf["embedding"].norm(dim=1), torch.ones(6))
    assert ("probs" in inf) == (method == "mixem")
    if method == "mixem":
        assert out.posterior.shape == (6, 10) and set(out.parts) >= {"batch_entropy", "pull", "push"}


def test_mixem_readouts_use_component_initialised_kmeans():
    """The component-initialised spherical k-means starts from the mean of each argmax-pi group."""
    cfg = load_config("mixem_cifar10", ["--eval.kmeans_niter=0", "--eval.kmeans_restarts=1",
                                        "--method.readout=spherical"])
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(10, 8), dim=1)
    truth = torch.arange(200) % 10
    emb = F.normalize(centres[truth] + 0.05 * torch.randn(200, 8), dim=1)
    probs = F.one_hot((truth + 3) % 10, 10).float()          # the mixture knows the groups, permuted
    method = build_method(cfg)
    preds = method.readouts({"embedding": emb, "probs": probs, "features": emb}, cfg.eval, cfg.train.seed)
    assert list(preds) == ["kmeans_mixture_init", "mixture", "kmeans"]
    # with niter=0 the assignment is to the initial centres: exactly the mixture's grouping
    assert (torch.as_tensor(preds["kmeans_mixture_init"]) == (truth + 3) % 10).all()
    assert (torch.as_tensor(preds["mixture"]) == (truth + 3) % 10).all()


def test_linear_probe_on_separable_features():
    from fastmice.eval.evaluate import linear_probe
    torch.manual_seed(0)
    labels = torch.arange(300) % 3
    feats = F.one_hot(labels, 8).float() + 0.05 * torch.randn(300, 8)
    result = linear_probe(feats, labels, seed=0)
    assert result["accuracy"] == 1.0 and (result["train"], result["test"]) == (240, 60)
    noise = linear_probe(torch.randn(300, 8), labels, seed=0)
    assert noise["accuracy"] < 0.6                                       # chance is 1/3


def test_probe_every_writes_eval_records(tmp_path, digits_small):
    import json

    from tests.helpers import tiny_overrides
    from fastmice.engine.trainer import Trainer
    cfg = load_config("digits", tiny_overrides(tmp_path, **{"method": "simclr", "optim.name": "adam",
                                                            "optim.lr": 1e-3, "eval.probe_every": 1,
                                                            "eval.linear_probe": "true"}))
    Trainer(cfg, tmp_path / "run", digits_small).fit()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert 0 <= evals[-1]["kmeans"]["acc"] <= 1 and 0 <= evals[-1]["linear_probe"]["accuracy"] <= 1
