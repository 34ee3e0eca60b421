"""What MiCE and MoCo share (MoCo's builder.py, made explicit): a student, its EMA teacher, and a queue of the
teacher's keys kept as buffers (checkpointed with the model), with the EMA update and the enqueue as named
no-grad methods. Nothing here moves tensors between devices or waits on the host.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmice.core import distributed
from fastmice.core.errors import ConfigError
from fastmice.methods.base import Method, MethodConfig


class MomentumMethod(Method):
    """A method with `student` (trained), `teacher` (its exponential moving average) and `queue` (K, V, D)."""

    backbone_key = "student.backbone."

    def __init__(self, cfg: MethodConfig, student: nn.Module):
        super().__init__(cfg)
        self.student = student
        self.teacher = copy.deepcopy(student)        # teacher.params = student.params at start
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.ema_momentum = cfg.ema_momentum
        self.shuffle_bn = True                       # several processes: MoCo's shuffle-BN for the teacher

    def init_queue(self, k: int, size: int, dim: int, dtype: torch.dtype) -> None:
        """The (K, V, D) queue of random unit keys and its write pointer, as buffers."""
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.queue_size = size
        self.register_buffer("queue", F.normalize(torch.randn(k, size, dim), dim=-1).to(dtype))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        if cfg.optim.batch_size > cfg.method.queue_size:
            raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} exceeds method.queue_size="
                              f"{cfg.method.queue_size}: a batch must fit in the queue")

    def check_data(self, num_images: int) -> None:
        super().check_data(num_images)
        if self.queue_size > num_images:
            raise ValueError(f"method.queue_size={self.queue_size} exceeds the dataset size ({num_images} images): "
                             f"positives would come back as negatives; use a queue of at most {num_images}")

    def set_shuffle_bn(self, on: bool) -> None:
        self.shuffle_bn = on

    def backbones(self) -> list[nn.Module]:
        return [self.student.backbone, self.teacher.backbone]

    def teacher_keys(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(the teacher's keys of this rank's x, every rank's keys in rank order or None in one process)."""
        with torch.no_grad():
            v, v_all = distributed.teacher_forward(self.teacher, x, self.shuffle_bn)
        return v, (v_all if distributed.active() else None)

    @torch.no_grad()
    def ema_update(self) -> None:
        """teacher <- m * teacher + (1 - m) * student, over parameters (BatchNorm buffers stay the teacher's)."""
        t = [p for p in self.teacher.parameters()]
        s = [p.detach() for p in self.student.parameters()]
        torch._foreach_lerp_(t, s, 1.0 - self.ema_momentum)

    @torch.no_grad()
    def enqueue(self, v: Tensor) -> None:
        """Write v (B, K, D) over the oldest B entries, wrapping around; the pointer stays on the device."""
        b = v.shape[0]
        if b > self.queue_size:
            raise ValueError(f"batch of {b} is larger than the queue ({self.queue_size})")
        idx = (self.queue_ptr + torch.arange(b, device=v.device)) % self.queue_size  # (B,)
        self.queue.index_copy_(1, idx, v.transpose(0, 1).to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + b) % self.queue_size)
