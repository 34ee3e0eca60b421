"""MiCE's parts: gating prototypes, EMA teacher, queue, analytical mu update, ResNet stems."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fastmice import mmd_prototypes
from fastmice.methods.mice import MiCE, MiCEConfig
from fastmice.models.resnet import ResNet


@pytest.mark.parametrize("k,d", [(1, 4), (2, 1), (3, 2), (10, 128), (20, 128), (100, 128), (129, 128)])
def test_mmd_prototypes(k, d):
    w = mmd_prototypes(k, d).double()
    assert w.shape == (k, d)
    gram = w @ w.t()
    assert torch.allclose(gram.diag(), torch.ones(k, dtype=torch.float64), atol=1e-6)
    if k > 1:
        off = gram[~torch.eye(k, dtype=torch.bool)]
        assert torch.allclose(off, torch.full_like(off, -1.0 / (k - 1)), atol=1e-6)
        assert torch.allclose(w.sum(0), torch.zeros(d, dtype=torch.float64), atol=1e-5)  # centred simplex


def test_mmd_prototypes_rejects_too_many():
    with pytest.raises(ValueError, match="K <= d\\+1"):
        mmd_prototypes(130, 128)


def small_mice(**kw):
    torch.manual_seed(0)
    args = dict(num_clusters=4, embed_dim=16, queue_size=10)
    args.update(kw)
    return MiCE(MiCEConfig(**args), ResNet("resnet10", width=8))


def test_initial_state():
    m = small_mice()
    assert torch.allclose(m.mu.norm(dim=1), torch.ones(4))            # never uninitialised memory
    assert torch.allclose(m.queue.norm(dim=-1), torch.ones(4, 10))    # random unit vectors
    assert m.queue_ptr.item() == 0
    for ps, pt in zip(m.student.parameters(), m.teacher.parameters()):
        assert torch.equal(ps, pt) and not pt.requires_grad
    buffers = dict(m.named_buffers())
    for name in ("queue", "queue_ptr", "omega", "mu_sum", "mu_count"):
        assert name in buffers                                       # checkpointed with the model


def test_ema_update():
    m = small_mice(ema_momentum=0.9)
    teacher_before = copy.deepcopy(list(m.teacher.parameters()))
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    m.ema_update()
    for t0, t1, s in zip(teacher_before, m.teacher.parameters(), m.student.parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s, atol=1e-6)


def test_queue_wraps_around():
    m = small_mice()
    batches = [F.normalize(torch.randn(4, 4, 16), dim=-1) for _ in range(3)]   # 12 entries into 10 slots
    for b in batches:
        m.enqueue(b)
    assert m.queue_ptr.item() == 2
    expected = torch.cat(batches)                                  # (12, K, D); slot i holds entry i mod 10
    assert torch.equal(m.queue[:, 2:8], expected[2:8].transpose(0, 1))
    assert torch.equal(m.queue[:, 0:2], expected[10:12].transpose(0, 1))
    assert torch.equal(m.queue[:, 8:10], expected[8:10].transpose(0, 1))
    with pytest.raises(ValueError, match="larger than the queue"):
        m.enqueue(torch.randn(11, 4, 16))


def test_mu_analytical_update():
    m = small_mice()
    mu_before = m.mu.detach().clone()
    v = F.normalize(torch.randn(6, 4, 16), dim=-1)
    post = torch.zeros(6, 4)
    assign = torch.tensor([0, 0, 1, 1, 1, 3])                      # cluster 2 gets nothing
    post[torch.arange(6), assign] = 1.0
    m.accumulate_mu(v[:3], post[:3])                               # two batches in one epoch
    m.accumulate_mu(v[3:], post[3:])
    m.update_mu()
    for k in (0, 1, 3):
        members = v[assign == k, k]                                 # v_{n,k} of the samples assigned to k
        assert torch.allclose(m.mu[k], F.normalize(members.sum(0), dim=0), atol=1e-6)
    assert torch.equal(m.mu[2], mu_before[2])                      # empty cluster keeps its prototype
    assert m.mu_sum.abs().sum() == 0 and m.mu_count.sum() == 0     # reset for the next epoch


def test_forward_and_single_pass_agree_in_eval_mode():
    m = small_mice().eval()                                         # BN running stats: passes are comparable
    x = torch.randn(5, 3, 16, 16)
    a = m([x, x, x])
    m.single_pass = True
    b = m([x, x, x])
    assert torch.allclose(a.loss, b.loss, atol=1e-5)
    assert a.v.shape == (5, 4, 16) and a.posterior.shape == (5, 4)


@pytest.mark.parametrize("stem,size", [("cifar", 32), ("imagenet", 96)])
def test_resnet_stems(stem, size):
    net = ResNet("resnet18", stem=stem, width=8)
    out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, 64)
    assert (net.stem[0].kernel_size, net.stem[0].stride) == (((3, 3), (1, 1)) if stem == "cifar" else ((7, 7), (2, 2)))


def test_resnet34_size():
    # 21.28 M parameters without the classifier (torchvision's resnet34 has 21.80 M with its 512x1000 fc).
    n = sum(p.numel() for p in ResNet("resnet34").parameters())
    assert n == 21_276_992
