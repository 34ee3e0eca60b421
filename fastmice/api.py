"""The notebook API: `from fastmice.api import Clustering` (it lives in fastmice.eval.api)."""
from fastmice.eval.api import Clustering

__all__ = ["Clustering"]
