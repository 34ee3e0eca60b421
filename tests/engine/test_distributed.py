"""Several processes through torch.distributed, on the CPU with gloo: 2 ranks x B/2 train like 1 rank x B, only
rank 0 writes, and a checkpoint written by 2 ranks resumes on 1.

For the step comparisons BatchNorm runs on its running statistics (`freeze_bn`): in training mode each rank
normalises with its own share of the batch, which differs from one process by design (SyncBatchNorm would make
them equal, but it has no CPU implementation).
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import make_folder, REPO, tiny_overrides
from fastmice.core import distributed
from fastmice.core.checkpoint import load_checkpoint
from fastmice.cli import main
from fastmice.config import load_config
from fastmice.data.sources import load_digits
from fastmice.engine.trainer import Trainer

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# name -> overrides; each is trained by 2 ranks in one spawn and compared with 1 rank here.
RUNS = {
    "mice": {"train.max_steps": 1},                                          # one MiCE step (shuffle-BN on)
    "moco": {"method": "moco", "train.max_steps": 1, "train.shuffle_bn": "false"},   # unused params, no shuffle
    "simclr": {"method": "simclr", "train.max_steps": 1},                   # NT-Xent with gathered negatives
    "mixem": {"method": "mixem", "train.max_steps": 1},                      # + mixture terms on the global batch
    "part": {"train.max_steps": 12, "eval.probe_every": 1},     # 1.2 epochs: mu all-reduced, probed, resumed
}
TOL = {"rtol": 1e-4, "atol": 1e-5}


def small_digits():
    return load_digits(8).subset(torch.arange(320))     # conftest's digits_small: 10 steps of 32 an epoch


def freeze_bn(model: torch.nn.Module) -> None:
    """BatchNorm on its running statistics even in train(), so a sample's output does not depend on its batch."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
            m.train = lambda mode=True, m=m: m


def make(out_dir, name, dataset, **extra) -> Trainer:
    cfg = load_config("digits", tiny_overrides(out_dir, **{"train.run_name": name, **extra}))
    t = Trainer(cfg, out_dir / name, dataset)
    freeze_bn(t.method)
    return t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tmp) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ds = small_digits()
    # Rank 1 is given a folder of its own: it must write nothing there (rank 0's folder is the run's).
    out = tmp / "two" if rank == 0 else tmp / "rank1"
    for name, extra in RUNS.items():
        make(out, name, ds, **extra).fit()
    # Evaluation's inference, sharded over the 2 processes, on an odd number of images (uneven shares).
    from fastmice.eval.evaluate import infer_dataset
    t = make(out, "infer", ds)
    got = infer_dataset(t.method, load_digits(8).images[:301], t.cfg, t.device, t.crop_size, sharded=True)
    torch.save(got, tmp / f"sharded_infer_rank{rank}.pt")
    distributed.cleanup()


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, free_port(), tmp), nprocs=2, join=True)
    return tmp


def step_losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "step"]


def assert_same_checkpoint(a: dict, b: dict, **tol):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], **(tol or TOL), msg=lambda m: f"{k}: {m}")
    for k, s in a["optimizer"]["state"].items():
        torch.testing.assert_close(s["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"], **(tol or TOL))
    assert (a["epoch"], a["global_step"], a["batches"]["pos"]) == (b["epoch"], b["global_step"], b["batches"]["pos"])
    assert torch.equal(a["batches"]["perm"], b["batches"]["perm"])


@pytest.mark.parametrize("name", ["mice", "moco", "simclr", "mixem"])
def test_one_step_on_two_ranks_equals_one_rank(name, two_rank_runs, digits_small, tmp_path):
    one = make(tmp_path, name, digits_small, **RUNS[name])
    one.fit()
    two = load_checkpoint(two_rank_runs / "two" / name)
    assert_same_checkpoint(two, load_checkpoint(tmp_path / name))       # parameters, queue, mu sums, momentum
    if name in ("mice", "moco"):
        assert not torch.equal(two["model"]["queue"], make(tmp_path, "fresh", digits_small).method.queue)
        assert int(two["model"]["queue_ptr"]) == 32                     # the global batch was enqueued
    assert step_losses(two_rank_runs / "two" / name) == pytest.approx(step_losses(tmp_path / name), rel=1e-5)


def test_two_rank_checkpoint_resumes_on_one_rank(two_rank_runs, digits_small, tmp_path):
    """12 steps on 2 ranks (an epoch end with its mu all-reduce, a mid-epoch stop with mu sums on both ranks),
    then 3 more on 1 rank, equal 15 steps on 1 rank: the checkpoint holds the global state and the loader
    position in global steps."""
    make(tmp_path, "full", digits_small, **{"train.max_steps": 15}).fit()
    part = two_rank_runs / "two" / "part"
    state = load_checkpoint(part)
    assert (state["epoch"], state["global_step"], state["batches"]["pos"]) == (1, 12, 2)
    assert int(state["model"]["mu_count"].sum()) == 2 * 32         # both ranks' samples of epoch 2 so far
    resumed = Trainer.resume(part, {"train": {"max_steps": 15}}, digits_small)
    freeze_bn(resumed.method)
    resumed.fit()
    assert_same_checkpoint(load_checkpoint(part), load_checkpoint(tmp_path / "full"), rtol=1e-3, atol=1e-4)
    records = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    sizes = [r["cluster_sizes"] for r in records if r["type"] == "epoch"]
    assert len(sizes) == 1 and sum(sizes[0]) == 320                 # epoch 1 counted every rank's samples


def test_the_epoch_probe_runs_on_two_processes(two_rank_runs):
    """eval.probe_every under 2 processes: both infer their share, rank 0 writes the scores."""
    records = [json.loads(x) for x in (two_rank_runs / "two" / "part" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in records if r["type"] == "eval"]
    assert len(probes) == 1 and probes[0]["epoch"] == 1 and 0 <= probes[0]["posterior"]["acc"] <= 1


def test_only_rank_zero_writes(two_rank_runs):
    assert not (two_rank_runs / "rank1").exists()
    assert sorted(p.name for p in (two_rank_runs / "two" / "mice").iterdir()) == \
        ["checkpoint.pt", "config.yaml", "metrics.jsonl"]


def test_torchrun_cli_then_resume_on_one_process(tmp_path, capsys):
    """`torchrun -m fastmice train` end to end on 2 CPU processes, then `fastmice train --resume` in this one."""
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run)] + tiny_overrides(tmp_path, **{"train.max_steps": 5})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "fastmice"] + args, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("run folder:") == 1 and out.stdout.count("training max_steps") == 1   # rank 0 prints
    assert "ACC" in out.stdout
    state = load_checkpoint(run)
    assert (state["global_step"], state["batches"]["pos"]) == (5, 5)
    for name in ("checkpoint.pt", "config.yaml", "metrics.jsonl", "eval.json", "assignments.csv"):
        assert (run / name).is_file(), name

    assert main(["train", "--resume", str(run), "--train.max_steps=8", "--eval.at_end=false"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert load_checkpoint(run)["global_step"] == 8
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # 2 ranks, then 1; after the resume the log steps are the uninterrupted run's (every 2nd of the epoch)
    assert [r["step"] for r in records if r["type"] == "step"] == [2, 4, 5, 6, 8]


def test_torchrun_with_the_dali_loader_then_resume_on_one_process(tmp_path, capsys):
    """data.loader=dali under torchrun: each of 2 processes reads its shard of a folder through DALI (CPU mode);
    the checkpoint resumes in one process, which reads the rest of the epoch alone."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    folder = make_folder(tmp_path / "imgs", classes=2, per_class=48)   # 3 steps of 32 an epoch
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run)] + tiny_overrides(tmp_path, **{
        "train.max_steps": 2, "data.source": "folder", "data.root": str(folder), "data.loader": "dali",
        "data.image_size": 16, "method.num_clusters": 2, "eval.at_end": "false"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "fastmice"] + args, capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    state = load_checkpoint(run)
    assert state["global_step"] == 2 and state["batches"]["kind"] == "dali" and state["batches"]["pos"] == 2
    assert main(["train", "--resume", str(run), "--train.max_steps=4", "--eval.at_end=false"]) == 0
    state = load_checkpoint(run)
    assert (state["global_step"], state["epoch"], state["batches"]["pos"]) == (4, 1, 1)


def test_batch_must_split_over_the_ranks(tmp_path, monkeypatch):
    """Checked before anything else is built; the 3 ranks here are pretend (no process group is made)."""
    monkeypatch.setattr("fastmice.core.distributed.init", lambda device: torch.device("cpu"))
    monkeypatch.setattr("fastmice.core.distributed.world", lambda: 3)
    cfg = load_config("digits", tiny_overrides(tmp_path))
    with pytest.raises(ValueError, match="must split evenly over the 3 processes"):
        Trainer(cfg, tmp_path / "x", small_digits())


def test_sharded_inference_equals_one_process(two_rank_runs, tmp_path):
    """Each of 2 processes infers its share of 301 images; both get all 301 outputs, those of one process."""
    from fastmice.eval.evaluate import infer_dataset
    t = make(tmp_path, "infer", small_digits())
    want = infer_dataset(t.method, load_digits(8).images[:301], t.cfg, t.device, t.crop_size)
    for rank in range(2):
        got = torch.load(two_rank_runs / f"sharded_infer_rank{rank}.pt")
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].shape == want[k].shape
            torch.testing.assert_close(got[k], want[k], **TOL)
