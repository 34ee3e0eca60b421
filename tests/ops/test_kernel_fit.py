"""Every launch config of the fused MiCE kernels fits the H200 (sm_90) and the A100 (sm_80), checked without a GPU.

Each (BLOCK_B, BLOCK_V, num_warps, num_stages) entry of fastmice.ops.kernels.mice_elbo.CONFIGS is compiled
ahead of time (fastmice.ops.kernels.aot: Triton's front end and the bundled ptxas run on the CPU) for the bf16,
fp16 and fp32 queues and D in {64, 128, 256}, and must need no more shared memory than the target has and
spill no registers, so a config that cannot launch, or would run with spilled registers, fails here first.

The compile results are cached under pytest's cache folder, per Triton version and kernel source (a cold
compile of the table's 107 kernels took 4-8 minutes on a 2-core machine shared with four other sessions, a
few seconds from the cache; CI's clean clone always pays the cold cost); FASTMICE_KERNEL_FIT_FRESH=1
compiles afresh.
"""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

from fastmice.ops.kernels.aot import TARGETS, Job, compile_all, problems, table_jobs  # noqa: E402
from fastmice.ops.kernels.mice_elbo import CONFIGS  # noqa: E402

JOBS = {j.key: j for j in table_jobs()}
# A config of the earlier table that spills 232 B on sm_90: proves that the spill check sees spills.
SPILLER = Job("fwd", "float32", 128, (32, 32, 4, 2), 90)
# The fp32-queue backward at D 256 without the accumulator split over D (BLOCK_DO): 28 B of spills on sm_90,
# the least of every unsplit config tried (warps 4-16, blocks 16-32); the table's entry splits D in two.
UNSPLIT = Job("bwd", "float32", 256, (16, 16, 8, 1), 90)


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory):
    cache = getattr(request.config, "cache", None)   # absent under -p no:cacheprovider: no cache kept then
    folder = cache.mkdir("fastmice-kernel-fit") if cache is not None else tmp_path_factory.mktemp("kernel-fit")
    return compile_all(list(JOBS.values()) + [SPILLER, UNSPLIT], cache_dir=folder, workers=2)


def test_the_table_covers_every_queue_dtype_and_dim():
    kinds = {(j.arch, j.kernel, j.queue_dtype, j.d) for j in JOBS.values()}
    assert kinds == {(a, k, q, d) for a in (90, 80) for k in ("fwd", "bwd")
                     for q in ("bfloat16", "float16", "float32") for d in (64, 128, 256)}
    # 2 arches x each entry once per (queue dtype, D) that picks it: 16-bit tables serve 2 dtypes, narrow 2 dims
    assert len(JOBS) == 2 * sum(len(v) * (2 if b16 else 1) * (1 if wide else 2)
                                for (_, b16, wide), v in CONFIGS.items())


def test_problems_names_each_limit():
    job = Job("fwd", "bfloat16", 128, (64, 64, 8, 2), 90)
    ok = {"shared": TARGETS[90]["shared"], "regs": 128, "spill_stores": 0, "spill_loads": 0}
    assert problems(job, ok) == []
    assert problems(job, {**ok, "shared": TARGETS[90]["shared"] + 1}) == [
        f"shared memory {TARGETS[90]['shared'] + 1} B > {TARGETS[90]['shared']} B"]
    assert problems(job, {**ok, "regs": 255}) == []                 # 255 x 256 threads fit the register file
    wide = Job("fwd", "bfloat16", 128, (64, 64, 16, 2), 90)
    assert problems(wide, {**ok, "regs": 255}) == ["255 registers x 512 threads > 65536"]
    assert problems(job, {**ok, "spill_stores": 8, "spill_loads": 4}) == ["spills 8 B stores / 4 B loads"]
    # sm_80 has less shared memory than sm_90
    assert problems(Job("fwd", "bfloat16", 128, (64, 64, 8, 2), 80), {**ok, "shared": 200 * 1024})


@pytest.mark.parametrize("job", [SPILLER, UNSPLIT], ids=lambda j: j.key)
def test_the_spill_check_sees_a_spilling_config(job, compiled):
    r = compiled[job.key]
    assert r["spill_stores"] > 0 and r["regs"] == 255
    assert problems(job, r)


def test_the_d_split_is_in_the_table():
    (entry,) = CONFIGS[("bwd", False, True)]
    assert entry[:4] == UNSPLIT.config and entry[4] == 128


@pytest.mark.parametrize("key", list(JOBS))
def test_config_fits(key, compiled):
    job, r = JOBS[key], compiled[key]
    assert r["shared"] > 0 and 0 < r["regs"] <= 255
    assert problems(job, r) == [], f"{key}: {problems(job, r)} ({r})"
