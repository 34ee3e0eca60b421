"""MIX'EM's and SimCLR's recipe switches (issue 14): each item alone, the official and the paper recipes on
hand-made inputs, per-view BatchNorm, and the official readout."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmice.config import load_config
from fastmice.core.errors import ConfigError
from fastmice.methods import build_method
from fastmice.ops.ntxent import nt_xent

SMALL = ["--backbone.arch=resnet10", "--backbone.width=4", "--method.hidden_dim=16"]


def _mixem(*overrides, k=2):
    cfg = load_config("mixem_cifar10", SMALL + [f"--method.num_clusters={k}", *overrides])
    return build_method(cfg)


def test_recipes_resolve_every_item():
    official = _mixem().items
    assert official == {"bn": "per_view", "readout": "sklearn", "entropy_per_view": True, "confidence_kind": "max",
                        "confidence_per_view": True, "associative": "official"}
    paper = _mixem("--method.recipe=paper").items
    assert paper == {"bn": "joint", "readout": "spherical", "entropy_per_view": False,
                     "confidence_kind": "entropy", "confidence_per_view": False, "associative": "paper"}
    # one item switched on its own: the others keep the recipe's value
    one = _mixem("--method.associative=paper").items
    assert one == {**official, "associative": "paper"}
    assert build_method(load_config("simclr_cifar10", SMALL + ["--method.bn=joint"])).bn == "joint"
    assert build_method(load_config("simclr_cifar10", SMALL)).readout == "sklearn"


def test_bad_recipe_values_are_config_errors():
    with pytest.raises(ConfigError, match="method.recipe must be one of official, paper"):
        load_config("mixem_cifar10", ["--method.recipe=authors"])
    with pytest.raises(ConfigError, match="method.bn must be one of per_view, joint"):
        load_config("simclr_cifar10", ["--method.bn=both"])
    with pytest.raises(ConfigError, match="method.confidence_kind must be one of max, entropy"):
        load_config("mixem_cifar10", ["--method.confidence_kind=min"])
    with pytest.raises(ConfigError, match="method.entropy_per_view: expected true or false"):
        load_config("mixem_cifar10", ["--method.entropy_per_view=sometimes"])


# Two views of two samples, K 2, D 2. pi1 rows (0.75, 0.25), pi2 rows (0.25, 0.75); z1 = (2,0), (4,0) (labels 0);
# z2 = (0,3), (0,3) (labels 1).
PI1 = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
PI2 = PI1.flip(1)
Z1 = torch.tensor([[2.0, 0.0], [4.0, 0.0]])
Z2 = torch.tensor([[0.0, 3.0], [0.0, 3.0]])
H_VIEW = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))        # 0.562335: each view's batch entropy


def test_official_terms_by_hand():
    """Entropy: per view, H_VIEW twice. Confidence: per view mean(1 - 0.75) = 0.25, twice. Associative, view 1:
    mu_0 = (6,0)/3 = (2,0) (distances 0, 2, 2: 4/3), mu_1 = 0 (0): pull 2/3, push -(2 * 2)/2 = -2; view 2 the
    same by symmetry (mu_1 = (0,6)/3, distances 1, 1, 2). Sums: pull 4/3, push -4."""
    terms = _mixem().mixture_terms(Z1, Z2, PI1, PI2)
    assert terms["batch_entropy"].item() == pytest.approx(2 * H_VIEW, rel=1e-5)
    assert terms["confidence"].item() == pytest.approx(0.5, rel=1e-6)
    assert terms["pull"].item() == pytest.approx(4 / 3, rel=1e-6)
    assert terms["push"].item() == pytest.approx(-4.0, rel=1e-6)


def test_paper_terms_by_hand():
    """Both views together: batch mean (0.5, 0.5): ln 2; instance entropy H_VIEW for every row; centres (3,0) and
    (0,3): squared distances 1, 1, 0, 0: pull 0.5; push exp(-18/2)."""
    terms = _mixem("--method.recipe=paper").mixture_terms(Z1, Z2, PI1, PI2)
    assert terms["batch_entropy"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert terms["confidence"].item() == pytest.approx(H_VIEW, rel=1e-5)
    assert terms["pull"].item() == pytest.approx(0.5, rel=1e-6)
    assert terms["push"].item() == pytest.approx(math.exp(-9), rel=1e-4)


def test_each_item_alone():
    """Switching one item changes only its term, to the value worked out above."""
    base = _mixem().mixture_terms(Z1, Z2, PI1, PI2)
    joint_entropy = _mixem("--method.entropy_per_view=false").mixture_terms(Z1, Z2, PI1, PI2)
    assert joint_entropy["batch_entropy"].item() == pytest.approx(math.log(2), rel=1e-6)
    mean_conf = _mixem("--method.confidence_per_view=false").mixture_terms(Z1, Z2, PI1, PI2)
    assert mean_conf["confidence"].item() == pytest.approx(0.25, rel=1e-6)        # half the official
    entropy_conf = _mixem("--method.confidence_kind=entropy").mixture_terms(Z1, Z2, PI1, PI2)
    assert entropy_conf["confidence"].item() == pytest.approx(2 * H_VIEW, rel=1e-5)
    for terms, changed in ((joint_entropy, "batch_entropy"), (mean_conf, "confidence"),
                           (entropy_conf, "confidence")):
        for name in ("batch_entropy", "confidence", "pull", "push"):
            if name != changed:
                assert torch.equal(terms[name], base[name]), (changed, name)


def test_official_pull_gradient_through_the_method():
    """Hard labels carry no gradient: d pull / d z for z1 = ((3,4), (3,4)) in component 0 (view 2 far away in
    component 1). mu_0 = 2z/3; members at ||z/3|| = 5/3, the zero vector at 10/3: pull_0 = (20/3)/3 = 20/9,
    i.e. (4/9)||z||; each member's gradient (2/3 - 1/3 + 1/3)/3 z/||z|| = (2/9) z/||z||, then / K."""
    m = _mixem()
    z1 = torch.tensor([[3.0, 4.0], [3.0, 4.0]], requires_grad=True)
    z2 = torch.tensor([[0.0, 5.0], [0.0, 5.0]])
    pi1 = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    pi2 = pi1.flip(1)
    terms = m.mixture_terms(z1, z2, pi1, pi2)
    view1_pull = (20 / 9) / 2                                      # averaged over the K = 2 components
    view2_pull = (20 / 9) / 2
    assert terms["pull"].item() == pytest.approx(view1_pull + view2_pull, rel=1e-6)
    g, = torch.autograd.grad(terms["pull"], z1)
    assert torch.allclose(g, (2 / 9) / 2 * torch.tensor([[0.6, 0.8], [0.6, 0.8]]), atol=1e-6)


@pytest.mark.parametrize("bn", ["per_view", "joint"])
def test_batchnorm_per_view_or_joint(bn):
    """per_view: each view is its own batch, so the NT-Xent of the forward is that of the views embedded one
    at a time; joint: of the two views embedded in one batch. The two differ (BatchNorm statistics)."""
    torch.manual_seed(0)
    m = build_method(load_config("simclr_cifar10", SMALL + [f"--method.bn={bn}"]))
    x1, x2 = torch.randn(6, 3, 16, 16), 0.5 * torch.randn(6, 3, 16, 16) + 1.0
    loss = m([x1, x2]).loss
    separate = nt_xent(m.embed(x1)[1], m.embed(x2)[1], m.temperature)
    together = nt_xent(*m.embed(torch.cat([x1, x2]))[1].chunk(2), m.temperature)
    assert abs(separate.item() - together.item()) > 1e-4
    assert loss.item() == pytest.approx((separate if bn == "per_view" else together).item(), rel=1e-5)


def test_mixem_forward_weights_the_terms():
    """loss = NT-Xent - 2 entropy + 0.1 confidence + 0.1 pull + 0.05 push (the public code's weights)."""
    torch.manual_seed(0)
    m = _mixem(k=3)
    out = m([torch.randn(5, 3, 16, 16), torch.randn(5, 3, 16, 16)])
    p = out.parts
    want = p["nt_xent"] - 2 * p["batch_entropy"] + 0.1 * p["confidence"] + 0.1 * p["pull"] + 0.05 * p["push"]
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    out.loss.backward()
    assert all(q.grad is not None for q in m.parameters() if q.requires_grad)


def test_official_readout_starts_from_the_component_means():
    """Unit vectors: three at (1,0) and the spread pair (-0.6, +-0.8) with x = (0.1, 0.995), x in the pair's
    component. Component means (1,0) and (-0.3667, 0.3317); Euclidean k-means keeps x with the pair (0.658 from
    its mean, 1.8 from (1,0)). The random-init readout runs k-means++ with restarts on the same points."""
    m = _mixem()
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-0.6, 0.8], [-0.6, -0.8], [0.1, 0.995]])
    probs = F.one_hot(torch.tensor([0, 0, 0, 1, 1, 1]), 2).float()
    cfg = load_config("mixem_cifar10")
    preds = m.readouts({"embedding": emb, "probs": probs, "features": emb}, cfg.eval, 0)
    assert list(preds) == ["kmeans_mixture_init", "mixture", "kmeans"]
    assert np.asarray(preds["kmeans_mixture_init"]).tolist() == [0, 0, 0, 1, 1, 1]
    assert np.asarray(preds["mixture"]).tolist() == [0, 0, 0, 1, 1, 1]
    assert len(set(np.asarray(preds["kmeans"]).tolist())) == 2


def test_a_run_saved_before_the_recipes_keeps_the_papers_wording():
    """A saved MIX'EM config without method.recipe (runs before the recipes existed) resumes as it was trained:
    recipe paper; a saved config with a recipe, and a new config file, keep theirs."""
    from fastmice.config import config_from_dict, load_config
    saved = load_config("digits", ["--method.name=mixem"]).to_dict()
    assert saved["method"]["recipe"] == "official"                      # the default of new runs
    del saved["method"]["recipe"]
    old = config_from_dict(saved)
    assert old.method.recipe == "paper" and old.method.setting("associative") == "paper"
    saved["method"]["recipe"] = "official"
    assert config_from_dict(saved).method.recipe == "official"
