"""MIX'EM's loss terms as the public code computes them (issue 14), on inputs small enough to work out on paper,
gradients included; and the Euclidean (scikit-learn) k-means readout against spherical k-means."""
import math

import numpy as np
import pytest
import torch

from fastmice.ops.kmeans import euclidean_kmeans, spherical_kmeans
from fastmice.ops.mixem_losses import batch_entropy, instance_unconfidence, official_associative_losses


def test_official_pull_and_push_by_hand():
    """K 2, D 2. Component 0: (2,0), (4,0) and the appended zero vector: mu_0 = (6,0)/3 = (2,0), distances 0, 2, 2,
    mean 4/3. Component 1: (0,3) and the zero vector: mu_1 = (0,1.5), distances 1.5, 1.5, mean 1.5.
    pull = (4/3 + 3/2) / 2 = 17/12; push = -(2 ||mu_0 - mu_1||) / (4 - 2) = -sqrt(4 + 2.25) = -2.5."""
    z = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 3.0]])
    pull, push = official_associative_losses(z, torch.tensor([0, 0, 1]), 2)
    assert pull.item() == pytest.approx(17 / 12, rel=1e-6)
    assert push.item() == pytest.approx(-2.5, rel=1e-6)


def test_official_empty_components_sit_at_zero():
    """K 3, one sample (3,4) in component 0: mu_0 = (1.5,2), both its distances 2.5: pull_0 = 2.5; components
    1, 2 are the zero vector alone: pull 0, mu 0. pull = 2.5/3. Ordered pairs: (0,1), (1,0), (0,2), (2,0) at
    2.5, (1,2), (2,1) at 0: push = -10/6."""
    z = torch.tensor([[3.0, 4.0]])
    pull, push = official_associative_losses(z, torch.tensor([0]), 3)
    assert pull.item() == pytest.approx(2.5 / 3, rel=1e-6)
    assert push.item() == pytest.approx(-10 / 6, rel=1e-6)


def test_official_gradients_by_hand():
    """K 2, z = (3,4) alone in component 0: pull = (||z/2|| + ||z/2||)/2 / 2 = ||z||/4, so d pull/dz =
    z/(4||z||) = (0.15, 0.2); push = -2||z/2||/2 = -||z||/2, d push/dz = -z/(2||z||) = (-0.3, -0.4)."""
    z = torch.tensor([[3.0, 4.0]], requires_grad=True)
    pull, push = official_associative_losses(z, torch.tensor([0]), 2)
    assert pull.item() == pytest.approx(1.25) and push.item() == pytest.approx(-2.5)
    g_pull, = torch.autograd.grad(pull, z, retain_graph=True)
    g_push, = torch.autograd.grad(push, z)
    assert torch.allclose(g_pull, torch.tensor([[0.15, 0.2]]), atol=1e-6)
    assert torch.allclose(g_push, torch.tensor([[-0.3, -0.4]]), atol=1e-6)


def test_official_gradient_is_zero_at_coincident_means_and_at_the_mean():
    """Two samples (1,1) in components 0 and 1: mu_0 = mu_1 = (0.5,0.5), push 0 and its gradient 0 (not NaN).
    pull: each member is at distance ||(0.5,0.5)|| from its mean, as is the zero vector: pull = sqrt(0.5)."""
    z = torch.tensor([[1.0, 1.0], [1.0, 1.0]], requires_grad=True)
    pull, push = official_associative_losses(z, torch.tensor([0, 1]), 2)
    assert push.item() == 0.0 and pull.item() == pytest.approx(math.sqrt(0.5), rel=1e-6)
    g_push, = torch.autograd.grad(push, z)
    assert torch.equal(g_push, torch.zeros_like(z))
    # a component whose members all sit at its mean and whose mean is 0: zero distances, zero gradient
    w = torch.tensor([[0.0, 0.0]], requires_grad=True)
    pull0, _ = official_associative_losses(w, torch.tensor([1]), 2)
    g, = torch.autograd.grad(pull0, w)
    assert pull0.item() == 0.0 and torch.isfinite(g).all() and torch.equal(g, torch.zeros_like(w))


def test_official_push_is_linear_and_unbounded():
    """Means pushed twice as far apart double the push (the paper's exp(-d^2/2) would vanish instead)."""
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1])
    p1 = official_associative_losses(z, labels, 2)[1]
    p2 = official_associative_losses(2 * z, labels, 2)[1]
    assert p1.item() == pytest.approx(-1.0) and p2.item() == pytest.approx(-2.0)     # ||(0.5,0) - (-0.5,0)|| = 1


def test_one_component_has_no_push():
    pull, push = official_associative_losses(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), 1)
    assert push.item() == 0.0 and pull.item() == pytest.approx(1.0)        # mu = (1,0); distances 1, 1


def test_per_view_entropy_and_confidence_by_hand():
    """One view's batch mean (0.75, 0.25): sum p log p = 0.75 ln 0.75 + 0.25 ln 0.25 = -0.562335; the two views
    together (0.5, 0.5): ln 2. Confidence of rows (0.7, 0.3), (0.4, 0.6): mean(0.3, 0.4) = 0.35."""
    pi1 = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    pi2 = pi1.flip(1)
    assert batch_entropy(pi1).item() == pytest.approx(0.562335, rel=1e-5)
    assert batch_entropy(pi2).item() == pytest.approx(0.562335, rel=1e-5)
    assert batch_entropy(torch.cat([pi1, pi2])).item() == pytest.approx(math.log(2), rel=1e-6)
    assert instance_unconfidence(torch.tensor([[0.7, 0.3], [0.4, 0.6]])).item() == pytest.approx(0.35)


def test_entropy_gradient_by_hand():
    """H(p) of p = mean pi over one sample = pi: dH/dpi_k = -(log pi_k + 1): at (0.75, 0.25) -(-0.287682 + 1),
    -(-1.386294 + 1)."""
    pi = torch.tensor([[0.75, 0.25]], requires_grad=True)
    g, = torch.autograd.grad(batch_entropy(pi), pi)
    assert torch.allclose(g, torch.tensor([[-0.712318, 0.386294]]), atol=1e-5)


# Unit vectors: a tight cluster of three at (1,0), a spread pair (-0.6, +-0.8), and x = (0.1, 0.995), closer in
# angle to the tight cluster. From centres (1,0) and (-0.6,0): Euclidean distance 1 + |c|^2 - 2 x.c puts x with
# the spread pair (1.48 < 1.8) and keeps it there (the pair's mean (-0.3667, 0.3317) is at 0.658 from x, (1,0)
# at 1.8); spherical k-means compares directions and puts it with the tight cluster (0.1 > -0.1).
POINTS = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-0.6, 0.8], [-0.6, -0.8], [0.1, 0.995]])
INIT = torch.tensor([[1.0, 0.0], [-0.6, 0.0]])


def test_euclidean_kmeans_by_hand():
    labels = euclidean_kmeans(POINTS, 2, init_centroids=INIT, max_iter=10)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    spherical, _ = spherical_kmeans(POINTS, 2, init_centroids=INIT, niter=10, backend="torch")
    assert np.asarray(spherical).tolist() == [0, 0, 0, 1, 1, 0]


def test_euclidean_kmeans_random_init_and_errors():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0]])
    labels = euclidean_kmeans(x, 2, n_init=5, seed=0)
    assert labels[0] == labels[1] != labels[2] == labels[3]
    with pytest.raises(ValueError, match="n_init must be 1"):
        euclidean_kmeans(x, 2, init_centroids=x[:2], n_init=3)
    with pytest.raises(ValueError, match="init_centroids must have shape"):
        euclidean_kmeans(x, 2, init_centroids=x[:3])
