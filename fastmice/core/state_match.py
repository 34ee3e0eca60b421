"""A model that does not fit its checkpoint, explained by the settings that differ ("the checkpoint has K=10
clusters (mu: (10, 128)) but the config asks for 5 (method.num_clusters)") instead of torch's list of every
tensor; the model is left untouched in that case (shapes are compared before anything is copied).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["CheckpointMismatch", "explain_state_mismatch", "load_model_state"]


class CheckpointMismatch(ValueError):
    """The checkpoint's model does not fit the model built from the config. ``settings`` lists
    (setting, checkpoint value, config value or None) for the differing settings found; ``shapes`` the
    (name, checkpoint shape, model shape) of the tensors that differ; ``missing``/``unexpected`` the tensor
    names only the model / only the checkpoint has."""

    def __init__(self, message: str, settings: list[tuple[str, Any, Any]], shapes: list[tuple[str, tuple, tuple]],
                 missing: list[str], unexpected: list[str]):
        super().__init__(message)
        self.settings, self.shapes, self.missing, self.unexpected = settings, shapes, missing, unexpected


# Settings that change the model's tensors (names or shapes); a difference in another one (tau, lr, ...) cannot
# cause a mismatch, so it is not mentioned.
_STRUCTURAL = ("method.name", "backbone.arch", "backbone.stem", "backbone.width", "method.num_clusters",
               "method.embed_dim", "method.queue_size", "method.hidden_dim", "method.shared_head", "method.prior",
               "method.omega_learned", "method.omega_init", "method.class_term", "method.mu_grad")
# Settings that are a dimension of some tensor, with how to say it: (noun phrase with {v}, what the config asks).
_DIMENSIONS = {
    "method.num_clusters": "K={v} clusters",
    "method.embed_dim": "embeddings of D={v}",
    "method.queue_size": "a queue of V={v} keys",
    "method.hidden_dim": "projection MLPs {v} wide",
    "backbone.width": "a backbone {v} channels wide at its first stage",
}


def _setting(config: Mapping[str, Any] | None, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _evidence(shapes: list[tuple[str, tuple, tuple]], saved: Any, new: Any) -> tuple[str, tuple, tuple] | None:
    """The mismatched tensor (shortest name first: ``mu`` before ``student.experts.weight``) with a dimension
    equal to ``saved`` in the checkpoint and to ``new`` (or anything else when None) in the model."""
    if not isinstance(saved, int) or isinstance(saved, bool):
        return None
    for name, s, m in sorted(shapes, key=lambda x: (len(x[0]), x[0])):
        if len(s) == len(m) and any(a == saved and b != saved and (new is None or b == new) for a, b in zip(s, m)):
            return name, s, m
    return None


def _fmt_shape(shape: tuple) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _advice(purpose: str, flags: list[str], saved_config: Mapping[str, Any] | None) -> str:
    drop = " and ".join(flags)
    if purpose == "resume":
        return ("resume keeps the run's model settings" + (f": drop {drop} from the command" if flags else "")
                + ". To train with other settings, start a new run in another folder (--run-dir), with "
                  "--init-from RUN to start from this run's backbone.")
    if purpose == "init_from":
        want = " ".join(f"{f}={_setting(saved_config, f[2:])}" for f in flags)
        return ("--init-from with train.init_scope=model copies the whole model, so the model settings must be "
                "the run's" + (f" ({want})" if want else "") + "; or use --train.init_scope=backbone to copy "
                "only the backbone.")
    return ("a trained run is evaluated with its own model settings" + (f": drop {drop}" if flags else "") + ".")


def explain_state_mismatch(model_state: Mapping[str, Any], saved_state: Mapping[str, Any],
                           saved_config: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
                           where: str = "the checkpoint", purpose: str = "resume") -> CheckpointMismatch | None:
    """Compare a model's state_dict (``model_state``; tensors, or anything with ``.shape``) with a saved one;
    None when every name and shape agrees, else a :class:`CheckpointMismatch` (not raised) whose message
    names ``where``, the settings that differ and what to do for ``purpose`` ("resume", "init_from" or
    "load": evaluation/report/API with overrides).

    Settings come from comparing ``saved_config`` (the checkpoint's ``config``, as written, before any
    override) with ``config`` (the config the model was built from) over the settings that shape the model;
    each dimension setting (K, D, V, widths) is backed by a tensor whose shape shows it, e.g. ``mu: (10, 128)``
    for K=10. Without ``config`` the dimension settings are inferred from the shapes alone (a saved K=10 whose
    dimension is 5 in the model). When no setting explains the difference (a checkpoint of another model),
    the message says how many tensors differ and gives examples."""
    shapes = [(k, tuple(saved_state[k].shape), tuple(v.shape)) for k, v in model_state.items()
              if k in saved_state and hasattr(saved_state[k], "shape")
              and tuple(saved_state[k].shape) != tuple(v.shape)]
    missing = [k for k in model_state if k not in saved_state]
    unexpected = [k for k in saved_state if k not in model_state]
    if not (shapes or missing or unexpected):
        return None
    settings: list[tuple[str, Any, Any]] = []
    phrases: list[str] = []
    for name in _STRUCTURAL:
        saved_v = _setting(saved_config, name)
        new_v = _setting(config, name) if config is not None else None
        if config is not None and (saved_v is None or new_v is None or saved_v == new_v):
            continue
        if name in _DIMENSIONS:
            ev = _evidence(shapes, saved_v, new_v)
            if config is None:
                if ev is None:
                    continue
                new_v = next(b for a, b in zip(ev[1], ev[2]) if a == saved_v and b != saved_v)
            what = _DIMENSIONS[name]
            shown = f" ({ev[0]}: {_fmt_shape(ev[1])})" if ev else ""
            phrases.append(f"the checkpoint has {what.format(v=saved_v)}{shown} but the "
                           f"{'config' if config is not None else 'model'} asks for {new_v} ({name})")
        elif config is None:
            continue
        elif name == "method.name":
            phrases.append(f"the checkpoint is a {saved_v} model but the config builds {new_v}")
        else:
            phrases.append(f"{name} is {saved_v!r} in the checkpoint but {new_v!r} in the config")
        settings.append((name, saved_v, new_v))
    if phrases:
        body = "; ".join(phrases)
    else:
        parts = []
        if shapes:
            k, s, m = shapes[0]
            parts.append(f"{len(shapes)} tensor(s) differ in shape (e.g. {k}: {_fmt_shape(s)} in the checkpoint, "
                         f"{_fmt_shape(m)} in the model)")
        if missing:
            parts.append(f"{len(missing)} the model has are not in the checkpoint (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} in the checkpoint are not in the model (e.g. {unexpected[0]})")
        body = ("; ".join(parts) + ": it was written by a different model (method, architecture or head "
                "settings)")
    flags = [f"--{name}" for name, _, _ in settings if name != "method.name"]
    message = f"{where} does not fit the model of this config: {body}. {_advice(purpose, flags, saved_config)}"
    return CheckpointMismatch(message, settings, shapes, missing, unexpected)


def load_model_state(model: torch.nn.Module, state_dict: Mapping[str, Any], saved_config: Mapping[str, Any] | None,
                     config: Mapping[str, Any] | None = None, *, where: str = "the checkpoint",
                     purpose: str = "resume") -> None:
    """``model.load_state_dict(state_dict)`` (strict), after checking names and shapes: on a difference it
    raises the :class:`CheckpointMismatch` of :func:`explain_state_mismatch` (``from None``) and leaves the
    model untouched (torch's own load copies the matching tensors before it reports the others). Any other
    failure of load_state_dict (e.g. a dtype that cannot be copied) becomes a CheckpointMismatch too, with
    torch's first line in the message. A model with an ``upgrade_state(state_dict)`` method (every
    fastmice Method) first brings a checkpoint of an earlier version to its current names."""
    upgrade = getattr(model, "upgrade_state", None)
    if callable(upgrade):
        state_dict = upgrade(state_dict)
    mismatch = explain_state_mismatch(model.state_dict(), state_dict, saved_config, config, where, purpose)
    if mismatch is not None:
        raise mismatch from None
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise CheckpointMismatch(f"{where} does not fit the model of this config: {first}", [], [], [], []) from None
