"""The next batch's augmented views, made while the current step runs (train.prefetch, the memory loader).

The trainer asks for step k's views, then at once enqueues step k+1's augmentation on a side CUDA stream before
launching step k, so the GPU can run the two side by side; step k+1 waits for them with an event. The views
are drawn from the same generator in the same order as without prefetching, so training is identical either
way (on the CPU there is no side stream and prefetching only reorders host work). What makes this exact
across checkpoints and interruptions: the generator state saved is the one before any prefetched draw, and a
pending prefetch is cancelled (the generator put back where it was) before anything else draws from the
generator: a new epoch's permutation, a loaded state, views made outside the training loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch
from torch import Tensor


@dataclass
class _Ahead:
    key: Hashable                 # which batch these views are of, e.g. (epoch index, position)
    views: list[Tensor]
    event: Any                    # torch.cuda.Event recorded on the side stream after the views, or None
    generator_state: Tensor       # the generator's state before these views were drawn


class ViewPrefetcher:
    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ahead: _Ahead | None = None

    def take(self, key: Hashable, make: Callable[[], list[Tensor]], generator: torch.Generator) -> list[Tensor]:
        """The views of batch `key`: the prefetched ones if they are of that batch, else made now by make()."""
        ahead = self._ahead
        if ahead is not None and ahead.key == key:
            self._ahead = None
            if ahead.event is not None:
                current = torch.cuda.current_stream(self.stream.device)
                current.wait_event(ahead.event)
                for v in ahead.views:           # made on the side stream, used and freed on this one
                    v.record_stream(current)
            return ahead.views
        self.cancel(generator)
        return make()

    def cancel(self, generator: torch.Generator) -> None:
        """Undo a pending prefetch: the generator goes back to its state before it. Call this before anything else
        draws from the generator (a new epoch's permutation, views made outside the loop), so that the draws
        stay in the order they would have without prefetching."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        generator.set_state(ahead.generator_state)
        if ahead.event is not None:   # what the side stream still reads (the permutation) may be freed next
            torch.cuda.current_stream(self.stream.device).wait_event(ahead.event)

    def prefetch(self, key: Hashable, make: Callable[[], list[Tensor]], generator: torch.Generator) -> None:
        """Start making batch `key`'s views: on the side stream on CUDA (after what is enqueued so far)."""
        state = generator.get_state()
        if self.stream is None:
            self._ahead = _Ahead(key, make(), None, state)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            views = make()
            event = torch.cuda.Event()
            event.record(self.stream)
        self._ahead = _Ahead(key, views, event, state)

    def generator_state(self, generator: torch.Generator) -> Tensor:
        """The state to checkpoint: before any prefetched draw, so a resume draws those views again."""
        return self._ahead.generator_state if self._ahead is not None else generator.get_state()
