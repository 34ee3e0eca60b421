"""Issue 13's battery: a stop at any step resumes exactly, for MiCE and one method of each other family.

A tiny two-epoch run (10 steps an epoch, 20 in all) is stopped by SIGINT or SIGTERM during step k, resumed from
its checkpoint and compared with the uninterrupted run: the whole method state (weights, queue, mu, teacher),
the optimizer state, the metrics records (step and epoch) and eval.json, bit for bit on the CPU. MiCE is
stopped at every one of the 20 steps, with each signal at the epoch ends; the others at the first step, a middle
one, both epochs' last steps and the one after an epoch end.
"""
import json
import signal

import pytest
import torch

from fastmice.core.checkpoint import load_checkpoint
from fastmice.engine.trainer import Trainer
from fastmice.eval.evaluate import evaluate_model
from tests.helpers import make_trainer, stop_during

STEPS = 20   # 2 epochs of 10 steps (320 digits, batch 32)
FAMILIES = {
    "mice": {},
    "moco": {"method": "moco"},                 # the queue without clusters, InfoNCE
    "simclr": {"method": "simclr"},            # no queue: in-batch negatives, Adam
    "mixem": {"method": "mixem"},              # the mixture terms on top of SimCLR
}
SIGNALS = (signal.SIGINT, signal.SIGTERM)
CASES = ([("mice", k, SIGNALS[k % 2]) for k in range(1, STEPS + 1)]
         + [("mice", k, SIGNALS[(k + 1) % 2]) for k in (1, 10, 11, 20)]
         + [(m, k, SIGNALS[i % 2]) for m in ("moco", "simclr", "mixem") for i, k in enumerate((1, 6, 10, 11, 20))])
# Fields of a record that measure time, not training.
TIMING = {"samples_per_s", "epoch_seconds", "seconds", "time"}


def records(run_dir):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["type"] in ("step", "epoch"):
            out.append({key: v for key, v in r.items() if key not in TIMING})
    return out


def evaluated(t: Trainer, dataset, run_dir):
    evaluate_model(t.method, dataset, t.cfg, t.device, run_dir, t.crop_size)
    result = json.loads((run_dir / "eval.json").read_text())
    result.pop("seconds", None)
    return result


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_small):
    """method -> (its trainer after the full run, its records, its eval.json), trained once for the module."""
    base = tmp_path_factory.mktemp("battery")
    runs = {}
    for name, extra in FAMILIES.items():
        t = make_trainer(base, digits_small, name, **extra)
        assert t.feed.steps_per_epoch * t.cfg.optim.epochs == STEPS
        t.fit()
        runs[name] = (t, records(base / name), evaluated(t, digits_small, base / name))
    return runs


@pytest.mark.parametrize("name,k,sig", CASES, ids=[f"{m}-step{k}-{signal.Signals(s).name}" for m, k, s in CASES])
def test_stop_at_step_k_then_resume_equals_the_uninterrupted_run(name, k, sig, uninterrupted, digits_small,
                                                                 tmp_path):
    full, full_records, full_eval = uninterrupted[name]
    part = make_trainer(tmp_path, digits_small, name, **FAMILIES[name])
    stop_during(part, k, sig)
    try:
        summary = part.fit()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert summary["status"] == ("finished" if k == STEPS else "interrupted")
    state = load_checkpoint(tmp_path / name)
    assert (state["global_step"], state["epoch"]) == (k, k // 10)
    resumed = Trainer.resume(tmp_path / name, None, digits_small)
    resumed.fit()
    a, b = full.method.state_dict(), resumed.method.state_dict()
    assert a.keys() == b.keys()
    for key in a:                                        # weights, teacher, queue and its pointer, mu
        assert torch.equal(a[key], b[key]), key
    oa, ob = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]       # the schedule's lr included
    for i, s in oa["state"].items():
        for key, value in s.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ob["state"][i][key])), (i, key)
    assert records(tmp_path / name) == full_records
    assert evaluated(resumed, digits_small, tmp_path / name) == full_eval
