"""fastmice: fast, faithful deep clustering with mixtures of contrastive embeddings (MiCE, MIX'EM)."""
from fastmice.data.sources import CIFAR100_SUPERCLASS
from fastmice.kmeans import spherical_kmeans
from fastmice.loss import mice_elbo
from fastmice.metrics import cluster_metrics
from fastmice.ntxent import nt_xent
from fastmice.prototypes import mmd_prototypes

__all__ = ["mice_elbo", "mmd_prototypes", "cluster_metrics", "spherical_kmeans", "CIFAR100_SUPERCLASS", "nt_xent"]
__version__ = "0.1.0"
