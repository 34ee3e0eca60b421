"""The fast training step against the naive reference (naive), torch.compile, and --profile.

The fast step (bf16 autocast, channels_last, foreach SGD, foreach EMA, device-side enqueue) and the naive one
(fp32, NCHW, per-parameter loops, host-side pointer) start from the same weights (a deep copy) and get the
same views. single_pass stays off, so BatchNorm sees the same batches in both (x_f alone, then x_g alone).
"""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import tiny_overrides
from fastmice.views.augment import augment_batch
from fastmice.config import load_config
from naive import naive_backward, naive_copy, naive_optimizer, naive_step, naive_update
from fastmice.engine.trainer import Trainer, build_optimizer


@pytest.fixture(scope="module")
def digits16():
    """320 digits at 16 px: big enough for a 4-stage ResNet-10 to keep spatial extent in every stage."""
    from fastmice.data.sources import load_digits
    return load_digits(16).subset(torch.arange(320))


def make(tmp_path, dataset, amp, channels_last, **extra):
    cfg = load_config("digits", tiny_overrides(tmp_path, **{
        "data.image_size": 16, "backbone.width": 8, "method.queue_size": 128, "optim.batch_size": 64, "train.amp": amp,
        "train.channels_last": channels_last, "train.run_name": "fast", "train.device": "cpu",
        "method.prior_ramp_epochs": 0, **extra}))      # the full prior from step 0, so the gate's gradients count
    trainer = Trainer(cfg, tmp_path / "fast", dataset)
    naive = naive_copy(trainer.method)
    return trainer, naive, naive_optimizer(cfg, naive)


def same_views(trainer):
    """fp32 NCHW views of one batch (the naive step's input) and the fast step's copy of them."""
    trainer.feed.start_epoch()
    _, x = trainer.feed.batches.next_batch()
    gen = torch.Generator().manual_seed(5)
    views = [augment_batch(x, trainer.cfg.augment, trainer.crop_size, trainer.feed.spec.mean, trainer.feed.spec.std, generator=gen)
             for _ in range(3)]
    fmt = torch.channels_last if trainer.precision.channels_last else torch.contiguous_format
    return views, [v.to(trainer.precision.view_dtype).contiguous(memory_format=fmt) for v in views]


def grads(model, prefix):
    return torch.cat([p.grad.float().flatten() for n, p in model.named_parameters()
                      if n.startswith(prefix) and p.grad is not None])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_fp32_fast_step_equals_naive_step(tmp_path, digits16):
    """Without bf16 and channels_last the two steps differ only in how they loop: agreement to 1e-5."""
    trainer, naive, opt = make(tmp_path, digits16, "off", "off")
    views32, views = same_views(trainer)
    out = trainer.step(views, None, 0.3)
    ref = naive_backward(naive, opt, *views32)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.posterior, ref.posterior, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(trainer.method.named_parameters(), naive.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    naive_update(naive, opt, ref, 0.3)
    fast_state, naive_state = trainer.method.state_dict(), naive.state_dict()
    for name, value in fast_state.items():        # student, teacher (EMA), queue, pointer, mu and its sums
        torch.testing.assert_close(value, naive_state[name], rtol=1e-5, atol=1e-5, msg=name)
    assert int(fast_state["queue_ptr"]) == 64


def test_bf16_channels_last_step_agrees_with_naive_within_bf16(tmp_path, digits16):
    """bf16: the loss to 2e-2 relative, the heads' and mu's gradients to cosine > 0.999. Backbone gradients
    of a freshly initialised net are small differences of large terms (BatchNorm's backward subtracts means),
    so bf16 alone moves them by 10-50% (relative L2) on this tiny net; the bound is therefore relative to that
    floor, measured on the same inputs with the naive step itself under bf16 autocast (NCHW, eager): the fast
    step may not be much further from fp32 than bf16 itself is, and must be close to the bf16 naive step."""
    trainer, naive, opt = make(tmp_path, digits16, "bf16", "on")
    assert trainer.precision.view_dtype == torch.bfloat16 and trainer.precision.channels_last
    floor_model = naive_copy(trainer.method)
    floor_opt = naive_optimizer(trainer.cfg, floor_model)
    views32, views = same_views(trainer)
    assert views[0].is_contiguous(memory_format=torch.channels_last)
    out = trainer.step(views, None, 0.3)
    ref = naive_backward(naive, opt, *views32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive_backward(floor_model, floor_opt, *[v.to(torch.bfloat16) for v in views32])

    torch.testing.assert_close(out.loss.float(), ref.loss, rtol=2e-2, atol=0)
    torch.testing.assert_close(out.posterior, ref.posterior, rtol=0, atol=3e-2)
    for head in ("student.experts", "gate", "mu"):
        cos = F.cosine_similarity(grads(trainer.method, head), grads(naive, head), dim=0)
        assert cos > 0.999, (head, float(cos))
    for part in ("student.backbone.stem", "student.backbone.stages.3", "student.backbone"):
        fast, exact, floor = grads(trainer.method, part), grads(naive, part), grads(floor_model, part)
        assert rel(fast, exact) < 1.5 * rel(floor, exact) + 0.05, (part, rel(fast, exact), rel(floor, exact))
        assert rel(fast, floor) < 0.15, (part, rel(fast, floor))
        assert F.cosine_similarity(fast, exact, dim=0) > 0.9, part

    naive_update(naive, opt, ref, 0.3)
    fast_state, naive_state = trainer.method.state_dict(), naive.state_dict()
    # The queue holds this step's teacher embeddings v (unit vectors computed in bf16).
    torch.testing.assert_close(fast_state["queue"], naive_state["queue"], rtol=0, atol=3e-2)
    assert int(fast_state["queue_ptr"]) == int(naive_state["queue_ptr"]) == 64
    for name in ("teacher.backbone.stem.0.weight", "teacher.backbone.stages.3.0.conv2.weight",
                 "teacher.experts.weight", "mu"):
        torch.testing.assert_close(fast_state[name], naive_state[name], rtol=0, atol=1e-3, msg=name)
    # The mu sums count argmax-posterior assignments; a near-tie at initialisation may flip under bf16.
    assert float(fast_state["mu_count"].sum()) == float(naive_state["mu_count"].sum()) == 64
    assert (fast_state["mu_count"] - naive_state["mu_count"]).abs().sum() <= 4


def test_naive_step_trains_and_syncs(tmp_path, digits16):
    """naive_step: a float loss (read every step), the pointer advanced, the teacher moved by the EMA."""
    trainer, naive, opt = make(tmp_path, digits16, "off", "off")
    views32, _ = same_views(trainer)
    teacher_before = naive.teacher.backbone.stem[0].weight.clone()
    loss, posterior = naive_step(naive, opt, *views32, lr=0.5)
    assert isinstance(loss, float) and loss > 0 and posterior.shape == (64, 10)
    assert int(naive.queue_ptr) == 64 and float(naive.mu_count.sum()) == 64
    assert not torch.equal(teacher_before, naive.teacher.backbone.stem[0].weight)
    assert all(not g.get("foreach") and not g.get("fused") for g in opt.param_groups)


def test_optimizer_impl_flags_and_resume_keeps_them(tmp_path, digits_small):
    cfg = load_config("digits", tiny_overrides(tmp_path, **{"train.max_steps": 3, "train.device": "cpu"}))
    t = Trainer(cfg, tmp_path / "impl", digits_small)
    assert t.optimizer.param_groups[0]["foreach"] is True          # auto on the CPU: foreach
    assert build_optimizer(cfg, t.method, impl="loop").param_groups[0]["foreach"] is False
    assert build_optimizer(cfg, t.method, impl="fused").param_groups[0]["fused"] is True
    t.fit()
    state = torch.load(tmp_path / "impl" / "checkpoint.pt", weights_only=False)
    for g in state["optimizer"]["param_groups"]:
        g["foreach"] = False                                        # as if saved by another optim.impl
    torch.save(state, tmp_path / "impl" / "checkpoint.pt")
    resumed = Trainer.resume(tmp_path / "impl", {"train": {"max_steps": 4}}, digits_small)
    assert resumed.optimizer.param_groups[0]["foreach"] is True


def test_speed_switches_in_the_config():
    from fastmice.config import ConfigError

    cfg = load_config("digits", ["--train.compile=off", "--train.amp=off", "--optim.impl=loop"])
    assert (cfg.train.compile, cfg.train.amp, cfg.optim.impl) == ("off", "off", "loop")   # YAML's off is False
    assert load_config("digits", ["--train.compile=reduce-overhead"]).train.compile == "reduce-overhead"
    with pytest.raises(ConfigError, match="train.compile must be one of"):
        load_config("digits", ["--train.compile=fast"])
    with pytest.raises(ConfigError, match="optim.impl must be one of"):
        load_config("digits", ["--optim.impl=turbo"])


def _cxx_compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _is_compiler_failure(e: BaseException) -> bool:
    return any(type(x).__module__.startswith(("torch._dynamo", "torch._inductor")) for x in (e, e.__cause__) if x)


@pytest.mark.slow
def test_compiled_step_matches_eager_and_records_compile_time(tmp_path, digits_small):
    """train.compile=default on the CPU (Inductor's C++ backend): 2 steps, losses and weights as eager's.
    The first compile in a fresh environment takes about a minute on 2 cores; Inductor's cache makes reruns
    take seconds."""
    if _cxx_compiler() is None:
        pytest.skip("no C++ compiler: Inductor cannot build CPU kernels here")
    from fastmice.core.errors import ConfigError
    from fastmice.engine.compile import inductor_cpu_gradients_ok
    if not inductor_cpu_gradients_ok():   # torch 2.13 on AVX2 hosts: a wrong strided 1x1 conv gradient
        cfg = load_config("digits", tiny_overrides(tmp_path, **{"train.max_steps": 2, "train.compile": "default",
                                                                "train.run_name": "refused", "train.device": "cpu"}))
        with pytest.raises(ConfigError, match="train.compile=default on this CPU.*wrong gradients"):
            Trainer(cfg, tmp_path / "refused", digits_small).fit()
        return
    runs = {}
    for mode in ("off", "default"):
        cfg = load_config("digits", tiny_overrides(tmp_path, **{"train.max_steps": 2, "train.compile": mode,
                                                                "train.run_name": mode, "train.device": "cpu"}))
        t = Trainer(cfg, tmp_path / mode, digits_small)
        try:
            t.fit()
        except Exception as e:  # noqa: BLE001 - only Inductor/Dynamo failures skip; others fail the test
            if mode != "off" and _is_compiler_failure(e):
                pytest.skip(f"torch.compile cannot compile on this machine: {type(e).__name__}: {str(e)[:300]}")
            raise
        records = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        runs[mode] = (t, records)
    eager, compiled = runs["off"], runs["default"]
    assert not [r for r in eager[1] if r["type"] == "compile"]
    (record,) = [r for r in compiled[1] if r["type"] == "compile"]
    assert record["mode"] == "default" and record["seconds"] > 0 and record["step"] == 1
    assert compiled[0].compile_info == record
    loss = {m: [r["loss"] for r in recs if r["type"] == "step"] for m, (_, recs) in runs.items()}
    assert len(loss["off"]) == len(loss["default"]) == 1
    assert loss["default"][0] == pytest.approx(loss["off"][0], rel=1e-4)
    se, sc = eager[0].method.state_dict(), compiled[0].method.state_dict()
    for name in ("student.backbone.stem.0.weight", "teacher.experts.weight", "queue", "mu"):
        torch.testing.assert_close(sc[name], se[name], rtol=1e-4, atol=1e-4, msg=name)


def test_profile_writes_trace_and_top_ops(tmp_path, capsys):
    """On the default device: with a GPU the trace also holds CUDA kernels and top_ops a CUDA-time table."""
    from fastmice.cli import main

    run = tmp_path / "prof"
    code = main(["train", "--profile", "2", "--run-dir", str(run), *tiny_overrides(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "trace.json" in printed and "top_ops.txt" in printed
    trace = json.loads((run / "profile" / "trace.json").read_text())
    assert trace["traceEvents"]
    assert any(e.get("name") == "fastmice_step" for e in trace["traceEvents"])
    top = (run / "profile" / "top_ops.txt").read_text()
    assert "self CPU time" in top and "aten::" in top
    assert not (run / "checkpoint.pt").exists()       # profiling stops without a checkpoint or an evaluation
    assert not (run / "eval.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_step_never_waits_on_the_host_on_cuda(tmp_path, digits_small):
    """The hot path (batch gather, augmentation, bf16 forward/backward, fused SGD, EMA, enqueue, mu sums) queues
    work without one device-to-host synchronisation: CUDA's sync debug mode turns any into an error."""
    cfg = load_config("digits", tiny_overrides(tmp_path, **{"train.device": "cuda"}))
    t = Trainer(cfg, tmp_path / "sync", digits_small)
    assert t.optimizer.param_groups[0]["fused"] is True
    t.run_steps(2)                         # warm-up: cuDNN plans, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        t.run_steps(3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
