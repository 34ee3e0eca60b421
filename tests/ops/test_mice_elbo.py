"""The MiCE loss against a literal transcription of the paper's Algorithm 1, gradients included."""
import pytest
import torch
import torch.nn.functional as F

from fastmice import mice_elbo
from fastmice.ops.mice_elbo import mice_elbo_reference


def algorithm1_loss(f, v, g, mu, omega, queue_kvd, tau, kappa, detach_q=False):
    """Algorithm 1 of the paper, line by line (queue stored V x K x D there)."""
    queue = queue_kvd.transpose(0, 1)                                   # V, K, D
    B, K, D = f.shape
    V = queue.shape[0]
    v = v.detach()
    v_f = torch.einsum("bkd,bkd->bk", v, f)
    v_mu = torch.einsum("bkd,kd->bk", v, F.normalize(mu, dim=1))
    l_pos = v_f + v_mu
    queue_f = torch.einsum("vkd,bkd->bkv", queue, f)
    queue_mu = torch.einsum("vkd,kd->kv", queue, F.normalize(mu, dim=1))
    l_neg = queue_f + queue_mu.view(1, K, V)
    logits = torch.cat([l_pos.view(B, K, 1), l_neg], dim=2) / tau
    experts = torch.softmax(logits, dim=2)[:, :, 0]
    gating = torch.softmax(torch.einsum("kd,bd->bk", omega, g) / kappa, dim=1)
    q = gating * experts
    q = q / q.sum(dim=1, keepdim=True)
    if detach_q:
        q = q.detach()
    elbo = (q * (torch.log(gating) + torch.log(experts) - torch.log(q))).sum() / B
    return -elbo, q


def random_inputs(B, K, D, V, seed=0, dtype=torch.float64):
    g_ = torch.Generator().manual_seed(seed)
    n = lambda *s: F.normalize(torch.randn(*s, generator=g_, dtype=dtype), dim=-1)
    from fastmice.ops.prototypes import mmd_prototypes
    return (n(B, K, D).requires_grad_(), n(B, K, D), n(B, D).requires_grad_(),
            torch.randn(K, D, generator=g_, dtype=dtype).requires_grad_(), mmd_prototypes(K, D).to(dtype),
            n(K, V, D))


@pytest.mark.parametrize("B,K,D,V", [(1, 1, 8, 1), (7, 3, 16, 50), (32, 10, 32, 257)])
@pytest.mark.parametrize("tau,kappa", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("detach_q", [False, True])
def test_matches_algorithm1(B, K, D, V, tau, kappa, detach_q):
    f, v, g, mu, omega, queue = random_inputs(B, K, D, V)
    loss, post = mice_elbo(f, v, g, mu, omega, queue, tau, kappa)
    grads = torch.autograd.grad(loss, [f, g, mu])
    ref_loss, ref_q = algorithm1_loss(f, v, g, mu, omega, queue, tau, kappa, detach_q)
    ref_grads = torch.autograd.grad(ref_loss, [f, g, mu])
    assert torch.allclose(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    assert torch.allclose(post.double(), ref_q.detach(), atol=1e-6)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a.double(), b, atol=1e-5, rtol=1e-4)


def test_contract():
    f, v, g, mu, omega, queue = random_inputs(5, 4, 16, 20, dtype=torch.float32)
    v.requires_grad_()
    queue.requires_grad_()
    loss, post = mice_elbo(f, v, g, mu, omega, queue)
    assert loss.dim() == 0 and post.shape == (5, 4)
    assert not post.requires_grad
    assert torch.allclose(post.sum(1), torch.ones(5), atol=1e-6)
    loss.backward()
    assert f.grad is not None and g.grad is not None and mu.grad is not None
    assert v.grad is None and queue.grad is None      # teacher and queue take no gradient


def test_stable_where_naive_underflows():
    """Sharp temperatures underflow exp() in the plain formula; the log-space loss stays finite."""
    f, v, g, mu, omega, queue = random_inputs(4, 5, 16, 30, dtype=torch.float32)
    loss, post = mice_elbo(f, v, g, mu, omega, queue, tau=0.005, kappa=0.005)
    naive, _ = algorithm1_loss(f, v, g, mu, omega, queue, 0.005, 0.005)
    assert torch.isfinite(loss) and torch.isfinite(post).all()
    assert not torch.isfinite(naive)


def test_shape_errors():
    f, v, g, mu, omega, queue = random_inputs(3, 2, 8, 10, dtype=torch.float32)
    with pytest.raises(ValueError, match="queue"):
        mice_elbo(f, v, g, mu, omega, queue.transpose(0, 1))
    with pytest.raises(ValueError, match="g must have shape"):
        mice_elbo(f, v, g[:2], mu, omega, queue)
    with pytest.raises(ValueError, match=r"f must be \(B, K, D\)"):
        mice_elbo(f[0], v, g, mu, omega, queue)


def test_reference_is_the_default_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTMICE_KERNELS", raising=False)
    f, v, g, mu, omega, queue = random_inputs(3, 2, 8, 10, dtype=torch.float32)
    a, _ = mice_elbo(f, v, g, mu, omega, queue)
    b, _ = mice_elbo_reference(f, v, g, mu, omega, queue)
    assert torch.equal(a, b)
