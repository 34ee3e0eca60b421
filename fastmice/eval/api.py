"""A small Python API for notebooks: load a trained run, embed and cluster images.

    from fastmice.api import Clustering
    c = Clustering.load("runs/cifar10")
    clusters, confidence = c.predict(["a.jpg", "b.png"])     # same results as `fastmice predict`
    emb = c.embed(images_uint8)                               # {"gating": (N, D), "features": (N, F), ...}

Inputs: a uint8 or float (values in [0, 1]) tensor or array (N, 3, H, W) or (3, H, W); a list of image
paths; or a list of PIL images. Files and PIL images are resized to the run's image size like the training
folder reader (shorter side, centre crop, bilinear); tensors of another size are centre-cropped and resized
like the binary datasets.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image

from fastmice.config import Config
from fastmice.data.folder import decode_image
from fastmice.data.sources import DataError, resize_images
from fastmice.eval.predict import cluster_probabilities, iter_decoded
from fastmice.eval.run import LoadedRun, load_run

Images = Union[torch.Tensor, np.ndarray, Sequence[Union[str, Path, Image.Image]]]


class Clustering:
    """A trained run ready for inference (eval mode, on its device)."""

    def __init__(self, run: LoadedRun):
        self.run = run

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto", overrides: dict[str, Any] | None = None
             ) -> Clustering:
        """Load RUN/checkpoint.pt; device "auto" takes the GPU when there is one."""
        return cls(load_run(run_dir, device, overrides))

    @property
    def num_clusters(self) -> int:
        return self.run.cfg.method.num_clusters

    @property
    def config(self) -> Config:
        return self.run.cfg

    @property
    def image_size(self) -> int:
        return self.run.image_size

    @property
    def device(self) -> torch.device:
        return self.run.device

    def __repr__(self) -> str:
        return (f"Clustering({str(self.run.run_dir)!r}, K={self.num_clusters}, image_size={self.image_size}, "
                f"epoch={self.run.epoch}, device={self.device})")

    # ---- inference ----------------------------------------------------------------------------------
    def infer(self, x: Images) -> dict[str, np.ndarray]:
        """All readouts of the model as numpy: for MiCE posterior and probs (N, K), gating prior (N, K),
        g = embedding (N, D), features (N, F); other methods: features, embedding and probs if any."""
        if _is_array(x):
            return _to_numpy(self.run.infer(self._tensor(x)))
        paths_or_pils = list(x)
        if not paths_or_pils:
            raise ValueError("no images given")
        if all(isinstance(e, (str, Path)) for e in paths_or_pils):
            return self._infer_files([str(e) for e in paths_or_pils])
        images = np.stack([self._decode_one(e) for e in paths_or_pils]).transpose(0, 3, 1, 2)
        return _to_numpy(self.run.infer(torch.from_numpy(np.ascontiguousarray(images))))

    def embed(self, x: Images) -> dict[str, np.ndarray]:
        """{"gating": MiCE's gating embeddings (N, D), unit length (absent for other methods);
        "embedding": the unit-length representation k-means clusters (MiCE: = gating);
        "features": backbone features (N, F)}."""
        out = self.infer(x)
        names = {"gating": "g", "embedding": "embedding", "features": "features"}
        return {name: out[key] for name, key in names.items() if key in out}

    def predict(self, x: Images) -> tuple[np.ndarray, np.ndarray]:
        """(cluster ids (N,) int64, confidence (N,) float32): argmax and max of the cluster probabilities
        (MiCE: the posterior), as `fastmice predict` writes them."""
        probs = cluster_probabilities(self.infer(x), self.run)
        return probs.argmax(1).astype(np.int64), probs.max(1).astype(np.float32)

    # ---- input conversion ---------------------------------------------------------------------------
    def _tensor(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(x)
        if t.dim() == 3:
            t = t.unsqueeze(0)
        if t.dim() != 4 or t.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) or (3, H, W), got shape {tuple(t.shape)}")
        if t.is_floating_point():
            if t.numel() and (t.min() < 0 or t.max() > 1):
                raise ValueError("float images must hold values in [0, 1]; pass uint8 for 0..255")
            # The model was trained on uint8 images: quantise like them.
            t = (t * 255).round().to(torch.uint8)
        elif t.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 or float, got {t.dtype}")
        t = t.cpu()
        if t.shape[-2:] != (self.image_size, self.image_size):
            t = resize_images(t, self.image_size)
        return t

    def _infer_files(self, paths: list[str]) -> dict[str, np.ndarray]:
        """Chunked like `fastmice predict` (same decoder, same batches), but every file must be readable."""
        parts: list[dict[str, np.ndarray]] = []
        for part in iter_decoded(paths, self.image_size):
            if part.skipped:
                p, reason = part.skipped[0]
                raise DataError(f"cannot read image {p}: {reason} ({len(part.skipped)} unreadable in this "
                                f"batch; `fastmice predict` skips and lists such files)")
            parts.append(_to_numpy(self.run.infer(torch.from_numpy(part.images))))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _decode_one(self, item: str | Path | Image.Image) -> np.ndarray:
        """(H, W, 3) uint8 at the run's size, through the training folder reader's decoder."""
        if isinstance(item, (str, Path)):
            return decode_image(str(item), self.image_size)
        if not isinstance(item, Image.Image):
            raise TypeError(f"expected image paths or PIL images, got {type(item).__name__}")
        # Re-encode losslessly so the one decoder (RGB conversion, crop, resize) handles it too.
        buf = io.BytesIO()
        (item if item.mode == "RGB" else item.convert("RGB")).save(buf, format="PNG", compress_level=0)
        buf.seek(0)
        return decode_image(buf, self.image_size)


def _is_array(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray))


def _to_numpy(out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.float().cpu().numpy() for k, v in out.items()}
