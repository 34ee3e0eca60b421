"""train.prefetch: the next batch's views made while the step runs change nothing in the training."""
import pytest
import torch

from tests.helpers import assert_same_state, make_trainer
from fastmice.views.prefetch import ViewPrefetcher
from fastmice.engine.trainer import Trainer


def test_prefetch_on_and_off_train_identically(tmp_path, digits_small):
    on = make_trainer(tmp_path, digits_small, "on")
    off = make_trainer(tmp_path, digits_small, "off", **{"train.prefetch": "false"})
    assert on.feed.prefetcher is not None and off.feed.prefetcher is None
    on.fit()
    off.fit()
    assert_same_state(on, off)


def test_resume_with_a_prefetched_batch_pending_equals_no_prefetch(tmp_path, digits_small):
    """The checkpoint is written while step 14's views are already drawn: it must hold the generator state from
    before them, so the resumed run draws them again."""
    off = make_trainer(tmp_path, digits_small, "off", **{"train.prefetch": "false"})
    off.fit()
    part = make_trainer(tmp_path, digits_small, "part", **{"train.max_steps": 13})
    part.fit()
    assert part.feed.prefetcher._ahead is not None                     # step 14's views, made ahead
    resumed = Trainer.resume(tmp_path / "part", {"train": {"max_steps": None}}, digits_small)
    resumed.fit()
    assert_same_state(off, resumed)


@pytest.mark.parametrize("between", ["views", "start_epoch", "load_state"])
def test_draws_outside_the_loop_cancel_a_pending_prefetch(tmp_path, digits_small, between):
    """Views made outside the loop, a new permutation, a loaded state: each happens in the order it would have
    without prefetching (the pending prefetch is undone first), so the training is the same."""
    runs = {}
    for name, prefetch in (("on", "true"), ("off", "false")):
        t = make_trainer(tmp_path, digits_small, name, **{"train.prefetch": prefetch})
        t.feed.start_epoch()
        t.run_steps(3)
        saved = t.feed.state_dict()
        if between == "views":
            t.feed.views(t.dataset.images[:8])
        elif between == "start_epoch":
            t.feed.start_epoch()
        else:
            t.run_steps(2)
            t.feed.load_state_dict(saved)          # back to step 3: the same batches again
        t.run_steps(4)
        runs[name] = t
    assert_same_state(runs["on"], runs["off"])


def test_a_prefetch_not_taken_puts_the_generator_back():
    g = torch.Generator().manual_seed(0)
    p = ViewPrefetcher(torch.device("cpu"))

    def make():
        return [torch.rand(3, generator=g)]
    p.prefetch(("epoch", 1), make, g)
    before = p.generator_state(g)
    assert not torch.equal(before, g.get_state())                 # the prefetch drew from g
    got = p.take(("epoch", 2), make, g)                           # another batch was asked for
    expected = torch.rand(3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got[0], expected)                           # as if nothing had been prefetched
    p.prefetch("k", make, g)
    assert p.take("k", make, g) is not None and p._ahead is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefetched_views_on_the_side_stream_equal_views_made_in_line(tmp_path, digits_small):
    """On CUDA the views come from the side stream: bit for bit those made in line, step after step."""
    seen = {}
    for name, prefetch in (("on", "true"), ("off", "false")):
        t = make_trainer(tmp_path, digits_small, name, **{"train.prefetch": prefetch, "train.device": "cuda",
                                                         "train.max_steps": 12})
        original, seen[name] = t.step, []
        make_views = t.feed.spec.make

        def slow_views(x, generator, rows=None, make_views=make_views):   # a slow side stream: a missing wait
            torch.cuda._sleep(50_000_000)                                # would show
            return make_views(x, generator, rows)
        t.feed.spec.make = slow_views

        def record(views, index, lr, original=original, out=seen[name]):
            out.append([v.clone() for v in views])
            return original(views, index, lr)
        t.step = record
        t.fit()
    assert len(seen["on"]) == len(seen["off"]) == 12
    for a, b in zip(seen["on"], seen["off"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
