"""`--init-from RUN`: start a method from another run's weights (SimCLR -> MIX'EM, MiCE -> MiCE fine-tuning)."""
from __future__ import annotations

from pathlib import Path

from fastmice.config import config_from_dict
from fastmice.core.checkpoint import load_checkpoint
from fastmice.core.state_match import load_model_state
from fastmice.methods import Method, backbone_weights


def load_pretrained(method: Method, path: str | Path, scope: str = "backbone",
                    config: dict | None = None) -> None:
    """Copy the backbone weights of another run's checkpoint into every backbone of `method` (a student and
    its teacher). scope="model" copies the whole model instead (heads, teacher, prototypes, queue): MiCE
    pre-training + MiCE (Table 4)."""
    checkpoint = load_checkpoint(path)
    state = checkpoint["model"]
    if scope == "model":
        load_model_state(method, state, config_from_dict(checkpoint["config"]).to_dict(), config,
                         where=f"init_from {path}", purpose="init_from")
        return
    weights = backbone_weights(state)
    if not weights:
        raise ValueError(f"init_from: no backbone weights in {path}")
    method.load_backbone_weights(weights)
