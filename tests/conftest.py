import os

import pytest
import torch

# Tests compare runs bit for bit on the CPU; keep the thread count fixed so reductions are ordered alike.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def digits_small():
    """320 of the bundled digits at 8 px (stratified by taking the first 320)."""
    from fastmice.data.sources import load_digits
    ds = load_digits(8)
    return ds.subset(torch.arange(320))
