"""Several processes (GPUs, machines) through torch.distributed, as `torchrun` launches them.

`torchrun --nproc_per_node=N -m fastmice train CONFIG` starts N copies of the program with RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; `init` reads them and joins the process group (NCCL on CUDA,
gloo on CPU). Without them, or with WORLD_SIZE=1, nothing is initialised and every helper here is the
identity: a single-process run never touches torch.distributed.

The helpers follow MoCo's multi-GPU code: `gather_cat` (all_gather in rank order; differentiable, so
NT-Xent sees every rank's negatives with gradients), `all_reduce_sum_`, and shuffle-BN for the teacher
(`batch_shuffle` / `batch_unshuffle`, composed in `teacher_forward`).
"""
from __future__ import annotations

import atexit
import builtins
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

# Rank 0 alone scores evaluations (k-means, the linear probe of eval.probe_every) and writes checkpoints while
# the others wait in their next collective; NCCL's default 10-minute timeout could be too short on a large dataset.
TIMEOUT = timedelta(minutes=30)

_builtin_print = builtins.print
_owned = False          # the process group was created here (and is destroyed by cleanup)


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it; 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str = "auto") -> torch.device | None:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1; returns this rank's device
    (cuda:LOCAL_RANK when CUDA is available and `device` allows it, else cpu), or None in a single process.

    Idempotent: a second call (Trainer.resume builds a second Trainer) reuses the group.
    """
    global _owned
    if env_world_size() <= 1 and not dist.is_initialized():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cpu":
        dev = torch.device("cpu")
    elif device == "auto":
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    elif device.startswith("cuda"):   # under torchrun every process takes the GPU of its LOCAL_RANK
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={device!r} but CUDA is not available on this machine; use auto or cpu")
        dev = torch.device("cuda", local_rank)
    else:
        raise ValueError(f"train.device={device!r}: several processes run on cuda (one GPU each) or cpu")
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                               f"start at most that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=TIMEOUT)
        _owned = True
        atexit.register(cleanup)
        if dist.get_rank() != 0:
            _quiet_print()
    return dev


def cleanup() -> None:
    """Leave the process group if `init` created it; restore print."""
    global _owned
    builtins.print = _builtin_print
    if _owned and dist.is_initialized():
        dist.destroy_process_group()
    _owned = False


def _quiet_print() -> None:
    """print() on rank 0 only (pass force=True to print anyway), so torchrun's console shows each line once.
    Warnings and errors go to stderr and stay visible from every rank."""
    def rank0_print(*args, force: bool = False, **kwargs):
        if force:
            _builtin_print(*args, **kwargs)
    builtins.print = rank0_print


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def active() -> bool:
    """More than one process."""
    return world() > 1


def is_main() -> bool:
    """Rank 0: the one that logs, shows progress and writes files."""
    return rank() == 0


def shard_rows(n: int) -> slice | None:
    """This rank's rows of a global batch of n: [rank * n/W, (rank + 1) * n/W); None in one process."""
    if not active():
        return None
    b = n // world()
    return slice(rank() * b, (rank() + 1) * b)


def shard(x: Tensor) -> Tensor:
    """This rank's rows of a global batch (B, ...): rows [rank * B/W, (rank + 1) * B/W)."""
    rows = shard_rows(x.shape[0])
    return x if rows is None else x[rows]


def uneven_rows(n: int, r: int | None = None) -> slice:
    """Rank r's (default: this rank's) rows [n*r//W, n*(r+1)//W) of n, which need not split evenly."""
    r, w = rank() if r is None else r, world()
    return slice(n * r // w, n * (r + 1) // w)


class _GatherCat(torch.autograd.Function):
    """all_gather along dim 0 in rank order. Backward: the gradient of every rank's copy of the result
    is summed (all_reduce) and each rank keeps its own rows, so a loss computed on the gathered tensor
    back-propagates into every rank's inputs (what a reduce-scatter does; all_reduce works on every backend)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        r = dist.get_rank()
        return grad[r * ctx.rows:(r + 1) * ctx.rows]


def gather_cat(x: Tensor) -> Tensor:
    """(b, ...) on every rank -> (W * b, ...) in rank order, the same on every rank; the identity in one
    process. Differentiable (see _GatherCat); every rank must pass the same shape."""
    if not active():
        return x
    return _GatherCat.apply(x)


def gather_uneven(x: Tensor, n: int) -> Tensor:
    """Each rank's rows [n*r//W, n*(r+1)//W) of an n-row result -> all n rows in order on every rank (padded to
    one size for all_gather, then cut); the identity in one process. Not differentiable."""
    if not active():
        return x
    w = world()
    sizes = [len(range(n)[uneven_rows(n, r)]) for r in range(w)]
    pad = max(sizes)
    padded = torch.zeros((pad, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def all_reduce_sum_(x: Tensor) -> Tensor:
    """Sum x over the ranks in place (identity in one process); returns x."""
    if active():
        dist.all_reduce(x)
    return x


def consolidate_sums_(tensors: list[Tensor]) -> None:
    """Per-rank accumulators -> their total on rank 0 and zeros elsewhere. The sum over the ranks is
    unchanged, so accumulation can go on; rank 0 then holds the global state a checkpoint needs."""
    if not active():
        return
    for t in tensors:
        dist.all_reduce(t)
        if not is_main():
            t.zero_()


# ---- shuffle-BN (MoCo): the teacher's BatchNorm sees a random subset of the global batch ----------------
@torch.no_grad()
def batch_shuffle(x: Tensor) -> tuple[Tensor, Tensor]:
    """Gather x from every rank, shuffle with a permutation drawn on rank 0 and broadcast, and return this
    rank's share of the shuffled batch and the permutation (for batch_unshuffle)."""
    x_all = gather_cat(x)
    perm = torch.randperm(x_all.shape[0], device=x.device) if is_main() else \
        torch.empty(x_all.shape[0], dtype=torch.long, device=x.device)
    dist.broadcast(perm, src=0)
    return shard(x_all[perm]), perm


@torch.no_grad()
def batch_unshuffle(y: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of batch_shuffle on the outputs: gather every rank's share and put the rows back in the
    original order; returns (this rank's rows, all rows in rank order)."""
    y_perm = gather_cat(y)
    y_all = torch.empty_like(y_perm)
    y_all[perm] = y_perm
    return shard(y_all), y_all


@torch.no_grad()
def teacher_forward(module: torch.nn.Module, x: Tensor, shuffle_bn: bool = True) -> tuple[Tensor, Tensor]:
    """The teacher on this rank's x: (its outputs for x, the outputs for every rank's batch in rank order).

    One process: (module(x), the same tensor). Several: with shuffle_bn, MoCo's shuffle-BN (each rank's
    BatchNorm sees a random share of the global batch, so a sample's key does not share batch statistics
    with its query and the model cannot cheat through them); without it, module(x) gathered.
    """
    if not active():
        y = module(x)
        return y, y
    if shuffle_bn:
        x_shard, perm = batch_shuffle(x)
        return batch_unshuffle(module(x_shard), perm)
    y = module(x)
    return y, gather_cat(y)


def wrap(module: torch.nn.Module, device: torch.device, sync_bn: bool = False,
         find_unused_parameters: bool = False) -> torch.nn.Module:
    """The module itself in one process; under torchrun, the module in DistributedDataParallel, which averages
    the gradients over the ranks. Buffers are not broadcast: a method keeps its buffers consistent itself
    (MiCE's queue from gathered keys; its mu sums are per rank until the end of the epoch). sync_bn converts
    BatchNorm to SyncBatchNorm in place (CUDA only)."""
    if not active():
        return module
    if sync_bn:
        if device.type != "cuda":
            raise ValueError("train.sync_bn=true needs CUDA (SyncBatchNorm has no CPU implementation); "
                             "use train.sync_bn=false on CPU")
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)   # in place: same parameters, same state keys
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
        find_unused_parameters=find_unused_parameters)
