"""Host-side analysis of POLCA results (numpy + scikit-learn; no JAX): the paper's filters, HDBSCAN clustering,
breakthroughs (Eqs. 9-10), cluster scores against categorical label sets, and what a cluster must beat to count:
permutation and shuffled-increment nulls, and the causal check's per-cluster effects; alternatives to the paper's
unsupervised step (allocation profiles, joint trajectories, shape features) and ground-truth scores (ARI, group
recovery) for planted benchmarks."""

from polca_jax.analysis._breakthroughs import (
    ClusterBreakthrough,
    breakthrough_scores,
    breakthrough_step,
    cluster_breakthroughs,
    hidden_breakthrough,
    hidden_breakthrough_fraction,
)
from polca_jax.analysis._causal import AblationEffect, AblationTest, ablation_effects, ablation_pvalues
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
from polca_jax.analysis._nulls import (
    ADJUST_METHODS,
    BreakthroughNull,
    PermutationTest,
    adjust_pvalues,
    breakthrough_null,
    homogeneity_pvalues,
)
from polca_jax.analysis._unsupervised import (
    CLUSTERERS,
    STRATEGIES,
    GroupRecovery,
    adjusted_rand,
    allocation_profiles,
    ari_pvalue,
    cluster_features,
    group_recovery,
    joint_features,
    shape_features,
    strategy_clusterings,
)
from polca_jax.analysis._scores import ClusterScore, cluster_label_scores, max_homogeneity, top_clusters

__all__ = [
    "CLUSTERERS",
    "STRATEGIES",
    "GroupRecovery",
    "adjusted_rand",
    "allocation_profiles",
    "ari_pvalue",
    "cluster_features",
    "group_recovery",
    "joint_features",
    "shape_features",
    "strategy_clusterings",
    "ADJUST_METHODS",
    "AblationEffect",
    "AblationTest",
    "BreakthroughNull",
    "PermutationTest",
    "ablation_effects",
    "ablation_pvalues",
    "adjust_pvalues",
    "breakthrough_null",
    "homogeneity_pvalues",
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
