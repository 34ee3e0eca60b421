"""infer_dataset's input transform: normalised by data.mean/std, or left in [0, 1] (eval.normalize: false, as
MIX'EM's public cluster_eval.py evaluates)."""
import pytest
import torch

from fastmice.config import load_config
from fastmice.eval.inference import infer_dataset


class MeanPixel(torch.nn.Module):
    def infer(self, x):
        return {"embedding": x.float().mean((2, 3))}


@pytest.mark.parametrize("normalize, want", [("true", (1.0 - 0.5) / 0.25), ("false", 1.0)])
def test_eval_normalize_switch(normalize, want):
    cfg = load_config("digits", ["--data.mean=[0.5,0.5,0.5]", "--data.std=[0.25,0.25,0.25]",
                                 f"--eval.normalize={normalize}"])
    images = torch.full((3, 3, 4, 4), 255, dtype=torch.uint8)            # white: 1.0 in [0, 1]
    out = infer_dataset(MeanPixel(), images, cfg, torch.device("cpu"), crop_size=4)
    assert torch.allclose(out["embedding"], torch.full((3, 3), want))
