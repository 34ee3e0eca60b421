"""Ahead-of-time compilation of the fused MiCE kernels for a GPU this machine does not have.

Triton compiles for any NVIDIA target without a device (``triton.compile(ASTSource, target=GPUTarget(...))``):
the Python front end, the MLIR passes and the bundled ``ptxas`` all run on the CPU. This module compiles each
(BLOCK_B, BLOCK_V, num_warps, num_stages) entry of ``mice_elbo.CONFIGS`` as it would launch at the paper's
shapes, and reads what decides whether it can run well: the shared memory it needs (the kernel's metadata),
and the registers and spill bytes (``ptxas -v``'s report). A config that spills or that asks for more shared
memory than the target has fails in CI, not on the day a GPU is lent.

    python -m fastmice.ops.kernels.aot            # the whole table for sm_90 and sm_80, one line per entry

Results are cached in a JSON file per Triton version, each entry keyed by its kernel's source (a cold compile
of the table takes minutes on two cores); FASTMICE_KERNEL_FIT_FRESH=1 ignores the cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import triton

from fastmice.ops.kernels.mice_elbo import CONFIGS, KERNELS

# Per-block limits: max dynamic shared memory (opt-in) and the register file (64 K 32-bit registers per SM,
# the most one block may hold).
TARGETS = {90: {"shared": 227 * 1024, "regs": 65536}, 80: {"shared": 163 * 1024, "regs": 65536}}
QUEUE_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
DIMS = (64, 128, 256)
FRESH_ENV = "FASTMICE_KERNEL_FIT_FRESH"


@dataclass(frozen=True)
class Job:
    """One table entry compiled for one target: kernel 'fwd'|'bwd', queue dtype name, feature dim D."""
    kernel: str
    queue_dtype: str
    d: int
    config: tuple[int, ...]               # (BLOCK_B, BLOCK_V, num_warps, num_stages[, BLOCK_DO])
    arch: int                             # compute capability, 90 or 80

    @property
    def key(self) -> str:
        return f"sm{self.arch}-{self.kernel}-{self.queue_dtype}-D{self.d}-" + "x".join(map(str, self.config))


def table_jobs(arches=(90, 80), dtypes=tuple(QUEUE_DTYPES), dims=DIMS) -> list[Job]:
    """Every entry of CONFIGS that a launch with these queue dtypes and dims can pick, once each."""
    jobs = []
    for arch in arches:
        for kernel in ("fwd", "bwd"):
            for dt in dtypes:
                for d in dims:
                    block_d = max(16, triton.next_power_of_2(d))
                    for cfg in CONFIGS[(kernel, dt != "float32", block_d > 128)]:
                        jobs.append(Job(kernel, dt, d, tuple(cfg), arch))
    return list(dict.fromkeys(jobs))


def _source(job: Job):
    """The ASTSource a launch at the paper's shapes (B 256, K 10, V 16384) specialises to: pointers 16-byte
    aligned and the integer arguments divisible by 16 except the lse row stride (K)."""
    from triton.compiler import ASTSource
    fn = KERNELS[job.kernel]
    bb, bv, _, _, *col = job.config
    block_d = max(16, triton.next_power_of_2(job.d))
    const = dict(BLOCK_B=bb, BLOCK_V=bv, BLOCK_D=block_d,
                 SPLIT_PREC=job.queue_dtype != "float32", UPCAST=False, FP32_PREC="tf32x3")
    if "BLOCK_DO" in fn.arg_names:   # the backward: its output columns per program (as _plan sets them)
        const["BLOCK_DO"] = min(col[0], block_d) if col else block_d
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
            continue
        if name == "Q_ptr":
            sig[name] = "*" + QUEUE_DTYPES[job.queue_dtype]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if name != "scale" and name != "stride_lb":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, sig, const, attrs)


_PTXAS = {"regs": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
          "spill_loads": r"(\d+) bytes spill loads"}


def compile_job(job: Job) -> dict:
    """Compile one job; returns {shared (bytes), regs, spill_stores, spill_loads (bytes)}. Runs ptxas afresh
    (Triton's own cache would skip it and with it the register report)."""
    from triton.backends.compiler import GPUTarget
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:                      # Triton >= 3.4 reads these through its knobs
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        k = triton.compile(_source(job), target=GPUTarget("cuda", job.arch, 32),
                           options=dict(num_warps=job.config[2], num_stages=job.config[3]))
    text = log.getvalue()
    out = {"shared": int(k.metadata.shared)}
    for field, pattern in _PTXAS.items():
        found = [int(x) for x in re.findall(pattern, text)]
        if not found:
            raise RuntimeError(f"no '{pattern}' in ptxas's report for {job.key}:\n{text[-2000:]}")
        out[field] = max(found)
    return out


def problems(job: Job, result: dict) -> list[str]:
    """Why a compiled job would not launch, or would run with spilled registers (empty: it fits)."""
    lim = TARGETS[job.arch]
    out = []
    if result["shared"] > lim["shared"]:
        out.append(f"shared memory {result['shared']} B > {lim['shared']} B")
    threads = 32 * job.config[2]
    if result["regs"] * threads > lim["regs"]:
        out.append(f"{result['regs']} registers x {threads} threads > {lim['regs']}")
    if result["spill_stores"] or result["spill_loads"]:
        out.append(f"spills {result['spill_stores']} B stores / {result['spill_loads']} B loads")
    return out


def cache_file(cache_dir: Path) -> Path:
    """The cache: one JSON file per Triton version, its entries keyed by entry_key."""
    return Path(cache_dir) / f"kernel-fit-triton-{triton.__version__}.json"


def entry_key(job: Job) -> str:
    """job.key and a hash of its kernel's source (with the jit functions it calls): a change to a kernel
    compiles that kernel's entries afresh, and only those."""
    return f"{job.key}|{hashlib.sha256(KERNELS[job.kernel].cache_key.encode()).hexdigest()[:16]}"


def compile_all(jobs: list[Job], cache_dir: Path | None = None, workers: int = 2,
                fresh: bool | None = None) -> dict[str, dict]:
    """{job.key: compile_job(job)} for every job, from the cache where present, the rest compiled in a pool
    of `workers` processes (spawned: they import Triton afresh and touch no CUDA state); writes the cache."""
    fresh = os.environ.get(FRESH_ENV) == "1" if fresh is None else fresh
    path = cache_file(cache_dir) if cache_dir is not None else None
    cached: dict[str, dict] = {}
    if path is not None and path.exists() and not fresh:
        with contextlib.suppress(ValueError, OSError):
            cached = json.loads(path.read_text())
    todo = [j for j in dict.fromkeys(jobs) if entry_key(j) not in cached]

    def save() -> None:   # after every result: an interrupted run keeps what it compiled
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cached, indent=1, sort_keys=True))
            tmp.replace(path)

    if workers > 1 and len(todo) > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as pool:
            futures = {pool.submit(compile_job, j): j for j in todo}
            for fut in as_completed(futures):
                cached[entry_key(futures[fut])] = fut.result()
                save()
    else:
        for j in todo:
            cached[entry_key(j)] = compile_job(j)
            save()
    return {j.key: cached[entry_key(j)] for j in jobs}


def main(argv: list[str] | None = None) -> int:
    jobs = table_jobs()
    results = compile_all(jobs, cache_dir=Path(".pytest_cache") / "fastmice")
    bad = 0
    for job in jobs:
        why = problems(job, results[job.key])
        bad += bool(why)
        r = results[job.key]
        print(f"{job.key:40s} shared {r['shared']:6d} regs {r['regs']:3d} spill {r['spill_stores']:4d}"
              + (f"  DOES NOT FIT: {'; '.join(why)}" if why else ""))
    print(f"{len(jobs) - bad}/{len(jobs)} fit")
    return 1 if bad else 0


__all__ = ["Job", "TARGETS", "table_jobs", "compile_job", "compile_all", "problems", "cache_file", "entry_key"]

if __name__ == "__main__":
    sys.exit(main())
