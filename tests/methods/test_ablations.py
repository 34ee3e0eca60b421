"""The paper's ablations (Table 3) as switches, and its special cases (Appendix C, Theorems 3 and 4)."""
import torch
import torch.nn.functional as F

from fastmice.config import load_config
from fastmice.methods import build_method
from fastmice.ops.prototypes import mmd_prototypes

SMALL = ["--backbone.arch=resnet10", "--backbone.width=4", "--method.embed_dim=16", "--method.queue_size=32",
         "--optim.batch_size=8"]


def mice(*overrides):
    torch.manual_seed(0)
    return build_method(load_config("cifar10", SMALL + list(overrides)))


def test_full_model_defaults():
    m = mice()
    assert m.prior == "gating" and m.class_term and m.mu_analytical and m.mu.requires_grad
    assert not m.omega.requires_grad and torch.allclose(m.omega, mmd_prototypes(10, 16))


def test_uniform_prior_a3_drops_the_gating_view():
    m = mice("--method.prior=uniform")
    assert m.num_views == 2
    out = m([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)])
    assert torch.isfinite(out.loss)


def test_shared_head_a4_gives_every_expert_the_same_embedding():
    m = mice("--method.shared_head=true")
    f = m.student(torch.randn(3, 3, 16, 16))
    assert f.shape == (3, 10, 16) and torch.allclose(f, f[:, :1].expand_as(f))


def test_no_class_term_a5_makes_the_loss_ignore_mu():
    m = mice("--method.class_term=false")
    x = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    a = m(list(x)).loss
    with torch.no_grad():
        m.mu.mul_(-3.0)
    assert torch.allclose(a, m(list(x)).loss)


def test_mu_switches():
    m = mice("--method.mu_analytical=false")
    before = m.mu.detach().clone()
    v = F.normalize(torch.randn(4, 10, 16), dim=-1)
    m.accumulate_mu(v, torch.softmax(torch.randn(4, 10), 1))
    m.end_epoch()
    assert torch.equal(m.mu, before)                               # no Eq. 13 reset
    assert not mice("--method.mu_grad=false").mu.requires_grad      # analytical update only


def test_omega_switches():
    m = mice("--method.omega_init=uniform")
    gram = m.omega @ m.omega.t()
    assert torch.allclose(gram.diag(), torch.ones(10), atol=1e-5)
    assert not torch.allclose(m.omega, mmd_prototypes(10, 16))
    learned = mice("--method.omega_learned=true")
    assert learned.omega.requires_grad
    out = learned([torch.randn(4, 3, 16, 16) for _ in range(3)])
    out.loss.backward()
    assert learned.omega.grad is not None and learned.omega.grad.abs().sum() > 0


def test_theorem4_analytical_update_is_one_spherical_kmeans_step():
    """Under A1-A4 (hard assignment, negatives that do not depend on k, uniform prior, shared head) the
    argmax posterior is the nearest prototype of v, so Eq. 13 is one spherical k-means iteration on v."""
    torch.manual_seed(1)
    m = mice("--method.prior=uniform", "--method.shared_head=true")
    b, k, d = 40, 10, 16
    with torch.no_grad():   # prototypes in the first d-1 dims, the only negative along the last: q.m_k = 0
        m.mu.copy_(F.normalize(torch.cat([torch.randn(k, d - 1), torch.zeros(k, 1)], 1), dim=1))
        m.queue.zero_()
        m.queue[:, :, -1] = 1.0
    v1 = F.normalize(torch.randn(b, d), dim=1)
    f1 = F.normalize(torch.randn(b, d), dim=1)
    from fastmice import mice_elbo
    _, post = mice_elbo(f1.unsqueeze(1).expand(b, k, d), v1.unsqueeze(1).expand(b, k, d), torch.zeros(b, d),
                        m.mu, m.omega, m.queue, tau=0.5)
    nearest = (v1 @ m.mu.t()).argmax(1)                             # spherical k-means assignment
    assert torch.equal(post.argmax(1), nearest)
    expected = m.mu.detach().clone()
    for c in range(k):
        if (nearest == c).any():
            expected[c] = F.normalize(v1[nearest == c].sum(0), dim=0)
    m.accumulate_mu(v1.unsqueeze(1).expand(b, k, d), post)
    m.update_mu()
    assert torch.allclose(m.mu, expected, atol=1e-6)
