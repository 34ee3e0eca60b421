"""fastmice: fast, faithful deep clustering with mixtures of contrastive embeddings (MiCE, MIX'EM)."""
from fastmice.data.sources import CIFAR100_SUPERCLASS
from fastmice.ops.kmeans import spherical_kmeans
from fastmice.ops.mice_elbo import mice_elbo
from fastmice.ops.metrics import cluster_metrics
from fastmice.ops.ntxent import nt_xent
from fastmice.ops.prototypes import mmd_prototypes

__all__ = ["mice_elbo", "mmd_prototypes", "cluster_metrics", "spherical_kmeans", "CIFAR100_SUPERCLASS", "nt_xent"]
__version__ = "0.1.0"
