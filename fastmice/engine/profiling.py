"""`fastmice train --profile N`: a torch.profiler trace of a few training steps of a Trainer."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def profile_steps(trainer: Any, steps: int = 10, warmup: int = 3) -> Path:
    """`fastmice train --profile`: `warmup` steps (compiling, if train.compile is on), then `steps` steps
    under torch.profiler (CPU, and CUDA where available). Writes RUN/profile/trace.json (a Chrome trace:
    chrome://tracing or https://ui.perfetto.dev) and RUN/profile/top_ops.txt (the operators by self time);
    returns the folder. Training state is not checkpointed: a profile is for looking, not for keeping."""
    from torch.profiler import ProfilerActivity, profile, record_function

    if steps < 1 or warmup < 0:
        raise ValueError(f"profile needs steps >= 1 and warmup >= 0, got {steps}, {warmup}")
    out = trainer.run_dir / "profile"
    out.mkdir(parents=True, exist_ok=True)
    trainer.run_steps(warmup)
    trainer.sync_time()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            with record_function("fastmice_step"):
                trainer.run_steps(1)
        trainer.sync_time()
    prof.export_chrome_trace(str(out / "trace.json"))
    averages = prof.key_averages()
    tables = [("self CPU time", "self_cpu_time_total")]
    if trainer.device.type == "cuda":
        tables.insert(0, ("self CUDA time", "self_device_time_total"))
    text = [f"fastmice profile: {steps} steps after {warmup} warm-up steps; device {trainer.device}; "
            f"batch {trainer.cfg.optim.batch_size}; train.compile={trainer.cfg.train.compile}; "
            f"amp {trainer.precision.view_dtype}; channels_last {trainer.precision.channels_last}\n"]
    for title, key in tables:
        try:
            table = averages.table(sort_by=key, row_limit=40)
        except (KeyError, AttributeError, ValueError):   # the device key's older name
            table = averages.table(sort_by="self_cuda_time_total", row_limit=40)
        text.append(f"== operators by {title} ==\n{table}\n")
    (out / "top_ops.txt").write_text("\n".join(text))
    return out

