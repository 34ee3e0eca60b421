"""Checkpoint files: written atomically (temp file + fsync + rename, mode 0644 under the usual umask), read
back with one clear error for an empty, truncated or foreign file, and the non-finite check of a state about
to be saved. A run's checkpoint is RUN/checkpoint.pt, the dict `Trainer.state_dict` returns.
"""
from __future__ import annotations

import math
import os
import random
import re
import secrets
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
REQUIRED_KEYS = ("config", "model")      # what every fastmice checkpoint holds (Trainer.state_dict)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically: written to a temporary file beside it, flushed and fsynced,
    then renamed over ``path`` (and the folder fsynced), so ``path`` holds either the old complete file or
    the new one, whatever happens (an exception in torch.save, Ctrl-C, kill -9, power loss). On failure the
    temporary file is removed and the exception propagates (a kill -9 leaves it: see ``stale_temporaries``).

    The file gets mode ``0o666 & ~umask`` (0644 under umask 022), as ``open()`` gives every other file of the
    run, instead of mkstemp's 0600, so other users of a shared file system can evaluate or resume it. The
    temporary file is created with that mode (``O_CREAT | O_EXCL``, the kernel applying the umask and any
    default ACL), so the umask is never read or changed (``os.umask`` is process-global and racy)."""
    _atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(text: str, path: str | Path) -> None:
    """``path.write_text(text)`` (UTF-8) with ``atomic_save``'s guarantee: the old file or the new, never a part."""
    _atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f"{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


TEMP_SUFFIX = ".tmp"


def stale_temporaries(folder: str | Path) -> list[Path]:
    """The temporary files ``atomic_save`` leaves in ``folder`` when its process is killed mid-write (kill -9,
    power loss): ``<name>.<12 hex digits>.tmp``. Only a caller that knows nobody else writes the folder (the
    run folder's lock holder) may delete them."""
    pattern = re.compile(r".+\.[0-9a-f]{12}" + re.escape(TEMP_SUFFIX) + "$")
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and pattern.fullmatch(p.name))


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used. ``path`` is the file, ``cause`` the underlying exception (None
    when the file was read but is not a fastmice checkpoint); raised ``from None``, so a traceback shows one
    error, with the cause kept here and in the message's summary."""

    def __init__(self, message: str, path: Path, cause: BaseException | None = None):
        super().__init__(message)
        self.path = path
        self.cause = cause


_RESTORE = ("restore it from a copy, or start the run again without --resume (in a new folder, or after "
            "deleting this file)")


def _describe_object(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a bare tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        keys = list(obj)
        if keys and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return (f"a bare state_dict of {len(keys)} tensors (model weights only, e.g. {keys[0]!r}), without "
                    f"the run's config, optimizer and progress")
        shown = ", ".join(map(repr, keys[:8])) + (", ..." if len(keys) > 8 else "")
        return f"a dict with the keys {shown or 'none'}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a fastmice checkpoint (``path`` or a run folder holding ``checkpoint.pt``) as the dict
    ``Trainer.state_dict`` wrote.

    Raises FileNotFoundError when there is no such file and one
    :class:`CheckpointError` naming the path and what to do when the file is empty, truncated, not a torch
    file (random bytes), or a torch file that is not a fastmice checkpoint (not a dict, or a dict without
    ``config`` and ``model``). Loads with ``weights_only=False`` (the checkpoint holds RNG states and the
    config, written by fastmice): only read checkpoints you trust."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (a run folder holds {CHECKPOINT_NAME} once training "
                                f"has written one)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (0 bytes), e.g. copied while "
                              f"it was written or cut by a full disk; {_RESTORE}", path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - zip, pickle and storage errors come in many types
        summary = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        damaged = "truncated (the end of the file is missing)" if _looks_truncated(path) else (
            "not a PyTorch file, or corrupt")
        raise CheckpointError(f"cannot read checkpoint {path} ({size} bytes): the file is {damaged} "
                              f"[{type(e).__name__}: {summary}]; {_RESTORE}", path, e) from None
    if not isinstance(obj, Mapping) or any(k not in obj for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a fastmice checkpoint: it holds {_describe_object(obj)}, while a "
                              f"checkpoint written by `fastmice train` holds {', '.join(REQUIRED_KEYS)}, the "
                              f"optimizer and the progress. Give the run folder of a fastmice run (or its "
                              f"{CHECKPOINT_NAME}).", path)
    return dict(obj)


def _looks_truncated(path: Path) -> bool:
    """True for a file that starts like a zip (torch.save's format) but has no readable central directory."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head != b"PK\x03\x04":
            return False
        with zipfile.ZipFile(path):
            return False
    except (OSError, zipfile.BadZipFile):
        return True


def _walk(obj: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted name, leaf) for the tensors, numpy arrays and Python floats in nested dicts/lists/tuples."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, np.ndarray) or isinstance(obj, float):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _walk(value, f"{prefix}.{i}" if prefix else str(i))


def nonfinite_tensors(state: Any) -> list[str]:
    """Dotted names (e.g. ``model.mu``, ``optimizer.state.3.exp_avg``, ``optimizer.param_groups.0.lr``) of
    the floating-point (and complex) tensors, float numpy arrays and Python floats in ``state`` (nested
    dicts, lists, tuples; anything else is ignored) holding at least one NaN or +-inf, in walk order.

    Integer and bool tensors cannot be non-finite and are skipped. Per tensor, ``isfinite(t.sum())`` (a sum
    is finite when every element is, NaN and inf propagating; one reduction, no copy), stacked per device
    and read back with a single ``.tolist()``: one host synchronisation per device for a finite state. Only
    tensors whose sum is not finite are then tested exactly with ``isfinite(t).all()`` (one more sync), so a
    finite tensor whose sum overflows is not reported. Sparse tensors are checked through their values; meta
    tensors (no data) are skipped."""
    bad: list[tuple[int, str]] = []
    per_device: dict[torch.device, tuple[list[int], list[str], list[torch.Tensor]]] = {}
    for order, (name, leaf) in enumerate(_walk(state, "")):
        if isinstance(leaf, float):
            if not math.isfinite(leaf):
                bad.append((order, name))
        elif isinstance(leaf, np.ndarray):
            if leaf.dtype.kind in "fc" and not np.isfinite(leaf).all():
                bad.append((order, name))
        elif leaf.is_floating_point() or leaf.is_complex():
            if leaf.is_meta:
                continue
            t = leaf.coalesce().values() if leaf.is_sparse else leaf
            orders, names, tensors, flags = per_device.setdefault(t.device, ([], [], [], []))
            orders.append(order)
            names.append(name)
            tensors.append(t)
            flags.append(_finite_sum(t))
    for orders, names, tensors, flags in per_device.values():
        suspects = [i for i, ok in enumerate(torch.stack(flags).tolist()) if not ok]   # the one sync per device
        if suspects:   # the exact test, for these only: rules out a sum that overflowed (a second sync)
            exact = torch.stack([torch.isfinite(tensors[i]).all() for i in suspects]).tolist()
            bad.extend((orders[i], names[i]) for i, ok in zip(suspects, exact) if not ok)
    return [name for _, name in sorted(bad)]


def _finite_sum(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool on t's device: True when the sum of t is finite, which it is whenever every element is
    (NaN and inf propagate through additions), unless the sum overflows. 16-bit floats are summed in float32,
    where their sums cannot overflow; about 25x faster on the CPU than ``isfinite(t).all()`` (no bool copy of
    the tensor)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype in (torch.float16, torch.bfloat16):
        return torch.isfinite(t.sum(dtype=torch.float32))
    return torch.isfinite(t.sum())


def nonfinite_message(names: list[str], run_dir: str | Path, step: int, has_checkpoint: bool) -> str:
    """The trainer's error when the state it is about to save is not finite (``names`` from
    :func:`nonfinite_tensors`): what became NaN/inf, that nothing was saved, whether an older checkpoint is
    kept (``has_checkpoint``: one exists in ``run_dir``) and what to try."""
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    kept = (f"the last good checkpoint in {run_dir} is kept (fastmice train --resume {run_dir} continues from "
            f"it)" if has_checkpoint else f"no checkpoint was written yet, so the run has to start again")
    return (f"the model state became NaN/inf by step {step} ({shown}); it was not saved, and {kept}. Try a "
            f"lower optim.lr or a longer optim.warmup_epochs.")


def host_rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_host_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
