"""kill -9 at random moments, during a checkpoint write too: the run folder always holds a loadable checkpoint,
and resuming after every kill ends where the uninterrupted run ends (model and eval.json).

The training runs in a child process (`fastmice train`) whose torch.save writes in small slow chunks, so that a
kill lands inside a write; the child says SAVING/SAVED around each write on stdout.
"""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from fastmice.cli import main
from fastmice.core.checkpoint import load_checkpoint, stale_temporaries
from tests.helpers import REPO, tiny_overrides

CHILD = textwrap.dedent("""
    import io, sys, time
    import torch
    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):    # the same bytes, written in 64 chunks with a pause each
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        print("SAVING", flush=True)
        step = max(len(data) // 64, 1)
        for i in range(0, len(data), step):
            f.write(data[i:i + step])
            time.sleep(0.002)
        print("SAVED", flush=True)

    torch.save = slow_save
    from fastmice.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def settings(tmp_path):
    return tiny_overrides(tmp_path, **{"optim.epochs": 4, "optim.lr_steps": "[2]", "eval.kmeans_restarts": 1})


def start_child(script, args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script)] + args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, cwd=REPO)


def kill_at(child, saves_before: int, delay: float) -> None:
    """kill -9 `delay` s after the child's SAVING number `saves_before` + 1 (0: after the first SAVED)."""
    seen = 0
    for line in child.stdout:
        if line.startswith("SAVING"):
            seen += 1
            if seen > saves_before:
                break
        if line.startswith("SAVED") and saves_before == 0:
            break
    else:
        pytest.fail(f"the child ended (rc {child.wait()}) before its checkpoint write {saves_before + 1}")
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()


@pytest.mark.slow
def test_kill_9_anywhere_leaves_a_loadable_checkpoint_and_resumes_to_the_same_end(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    full = tmp_path / "full"      # every run in a child with one thread: the same arithmetic, bit for bit
    first_run = start_child(script, ["train", "--run-dir", str(full)] + settings(tmp_path))
    first_run.communicate()
    assert first_run.returncode == 0
    run = tmp_path / "killed"
    rng = random.Random(13)
    # (checkpoint writes the child makes before the one it is killed in, delay after that write starts)
    kills = [(1, rng.uniform(0.01, 0.1)), (0, rng.uniform(0.0, 0.4)), (0, rng.uniform(0.0, 0.4))]
    first = ["train", "--run-dir", str(run)] + settings(tmp_path)
    for i, (saves_before, delay) in enumerate(kills):
        args = first if i == 0 else ["train", "--resume", str(run)]
        kill_at(start_child(script, args), saves_before, delay)
        state = load_checkpoint(run)                    # whatever the moment, a complete checkpoint is there
        assert state["global_step"] >= 10 and torch.isfinite(state["model"]["gate.weight"]).all()
        if (run / "eval.json").is_file():              # killed after training ended: nothing left to compare
            break
    finish = start_child(script, ["train", "--resume", str(run)])
    finish.communicate()
    assert finish.returncode == 0
    assert not stale_temporaries(run)                  # a write cut short left nothing behind
    a, b = load_checkpoint(full), load_checkpoint(run)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    ea, eb = (json.loads((d / "eval.json").read_text()) for d in (full, run))
    assert ea["readouts"] == eb["readouts"]


def test_a_kill_during_the_write_keeps_the_previous_checkpoint(tmp_path):
    """The first write completes, the second is cut in its middle: the first is what the folder holds."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run = tmp_path / "run"
    kill_at(start_child(script, ["train", "--run-dir", str(run)] + settings(tmp_path)), 1, 0.06)
    assert load_checkpoint(run)["epoch"] == 1
    assert stale_temporaries(run)                       # the cut write's temporary file
    assert main(["train", "--resume", str(run), "--train.max_steps=11"]) == 0
    assert not stale_temporaries(run)
