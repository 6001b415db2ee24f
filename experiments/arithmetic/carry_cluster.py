"""What a run's most carry-homogeneous qualifying cluster is made of: its carry and non-carry tokens per answer place,
beside each place's carry tokens in all.

    python experiments/arithmetic/carry_cluster.py RUN_DIR [RUN_DIR ...] [--strategy polca_gradients]

The cluster is the first of ``metrics.json``'s top clusters for the label set ``carry`` (the report's best
qualifying one); a cluster that spans the 10s and 100s places is a carry mechanism shared across places, one within a
single place may be that place's alone.
"""

import argparse
from pathlib import Path

from polca_jax import analysis
from polca_jax.pipeline import load_labels, read_metrics


def composition(run: Path, strategy: str) -> str:
    """One line: the best carry cluster's direction, size and homogeneity, and per place (carry, non-carry) tokens."""
    best = read_metrics(run / "metrics.json").variants[strategy].label_sets["carry"].top_clusters
    if not best:
        return f"{run.name}: {strategy} has no qualifying carry cluster"
    top = best[0]
    clustering = next(c for c in analysis.load_clusterings(run / "clusters" / f"{strategy}.npz")
                      if c.direction == top.direction)
    members = clustering.members(top.cluster)
    labels = load_labels(run)[0]
    place, carry = labels["place"], labels["carry"].values
    parts = []
    for value, name in sorted((int(value), name) for value, name in place.class_names.items()):
        in_place = place.values[members] == value
        all_carry = int(((place.values == value) & carry).sum())
        parts.append(f"{name} {int((in_place & carry[members]).sum())} carry of {all_carry}, "
                     f"{int((in_place & ~carry[members]).sum())} not")
    return (f"{run.name}: direction {top.direction}, cluster {top.cluster}, {members.size} tokens, homogeneity "
            f"{top.homogeneity:.3f}: " + "; ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--strategy", default="polca_gradients", help="a strategy's name in metrics.json")
    args = parser.parse_args()
    for run in args.runs:
        print(composition(run, args.strategy))


if __name__ == "__main__":
    main()
