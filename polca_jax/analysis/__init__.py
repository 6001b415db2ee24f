"""Host-side analysis of POLCA results (numpy + scikit-learn; no JAX): the paper's filters, HDBSCAN clustering,
breakthroughs (Eqs. 9-10) and cluster scores against categorical label sets."""

from polca_jax.analysis._breakthroughs import (
    ClusterBreakthrough,
    breakthrough_scores,
    breakthrough_step,
    cluster_breakthroughs,
    hidden_breakthrough,
    hidden_breakthrough_fraction,
)
from polca_jax.analysis._clustering import (
    DEFAULT_MIN_SAMPLES_DIVISOR,
    NORMALIZATIONS,
    Clustering,
    cluster_directions,
    cluster_signal,
    cluster_trajectories,
    hdbscan_params,
    load_clusterings,
    medoid,
    quartile_curves,
    save_clusterings,
)
from polca_jax.analysis._filters import kept_directions, relying_samples
from polca_jax.analysis._scores import ClusterScore, cluster_label_scores, max_homogeneity, top_clusters

__all__ = [
    "DEFAULT_MIN_SAMPLES_DIVISOR",
    "NORMALIZATIONS",
    "ClusterBreakthrough",
    "ClusterScore",
    "Clustering",
    "breakthrough_scores",
    "breakthrough_step",
    "cluster_breakthroughs",
    "cluster_directions",
    "cluster_label_scores",
    "cluster_signal",
    "cluster_trajectories",
    "hdbscan_params",
    "hidden_breakthrough",
    "hidden_breakthrough_fraction",
    "kept_directions",
    "load_clusterings",
    "max_homogeneity",
    "medoid",
    "quartile_curves",
    "relying_samples",
    "save_clusterings",
    "top_clusters",
]
