"""`--init-from RUN`: start a method from another run's weights (SimCLR -> MIX'EM, MiCE -> MiCE fine-tuning)."""
from __future__ import annotations

from pathlib import Path

from fastmice.core.checkpoint import load_checkpoint
from fastmice.methods import Method, backbone_weights


def load_pretrained(method: Method, path: str | Path, scope: str = "backbone") -> None:
    """Copy the backbone weights of another run's checkpoint into every backbone of `method` (a student and
    its teacher). scope="model" copies the whole model instead (heads, teacher, prototypes, queue): MiCE
    pre-training + MiCE (Table 4)."""
    state = load_checkpoint(path)["model"]
    if scope == "model":
        try:
            method.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"init_from {path} with train.init_scope=model: the checkpoint's model does not match "
                             f"this config's (same method, architecture, K, D and queue size needed): {e}") from e
        return
    weights = backbone_weights(state)
    if not weights:
        raise ValueError(f"init_from: no backbone weights in {path}")
    method.load_backbone_weights(weights)
