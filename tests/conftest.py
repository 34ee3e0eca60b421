import os
import sys
from pathlib import Path

import pytest
import torch

# The benchmarks' folder: its naive reference (bench/naive.py) is the oracle some tests compare against.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

# Tests compare runs bit for bit on the CPU; keep the thread count fixed so reductions are ordered alike.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def digits_small():
    """320 of the bundled digits at 8 px (stratified by taking the first 320)."""
    from fastmice.data.sources import load_digits
    ds = load_digits(8)
    return ds.subset(torch.arange(320))


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb offline, quiet, with its settings, cache and data under the test's folder."""
    for var, sub in (("WANDB_DIR", "wandb-dir"), ("WANDB_CONFIG_DIR", "wandb-config"),
                     ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_DATA_DIR", "wandb-data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_TAGS", "WANDB_RUN_GROUP", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
