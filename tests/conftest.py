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
