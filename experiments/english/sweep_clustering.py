"""Re-examine a finished English run without retraining: clustering settings, second-order rules, basis coverage.

    python experiments/english/sweep_clustering.py RUN_DIR

Prints, from the run's stored POLCA arrays:
- POLCA clusters per kept direction and exact-loss clusters under the paper's HDBSCAN settings and looser ones;
- how many directions the oscillation filter keeps under each second-order rule computable from the stored arrays;
- how much of the step the basis holds, and how large the per-token projected losses are.
"""

import argparse
import json
from pathlib import Path

import numpy as np

import polca_jax as pj
from polca_jax import analysis
from polca_jax.pipeline import variant_trajectories

# (min_cluster_size, min_samples divisor, normalize); the first row is the paper's setting
SETTINGS = [(300, 15, None), (300, 15, "unit"), (50, 15, None), (300, 200, None), (50, 200, None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    config = json.loads((args.run_dir / "config.json").read_text())
    result = pj.POLCAResult.load(args.run_dir / "polca" / "hessian")
    projected = result.projected_loss
    loss, _ = variant_trajectories(result, "loss")
    kept = np.flatnonzero(analysis.kept_directions(projected))
    print(f"run {args.run_dir}: {loss.shape[1]} tokens, {projected.shape[2]} directions, kept {kept.tolist()}")

    for min_cluster_size, divisor, normalize in SETTINGS:
        options = dict(min_cluster_size=min_cluster_size, min_samples_divisor=divisor, normalize=normalize,
                       reference_num_samples=config["reference_num_samples"])
        polca = analysis.cluster_directions(projected, directions=kept, **options)
        exact = analysis.cluster_signal(loss, **options)
        per_direction = {c.direction: c.num_clusters for c in polca if c.num_clusters}
        print(f"- min_cluster_size {min_cluster_size}, min_samples tokens/{divisor}, normalize {normalize}: "
              f"POLCA clusters per direction {per_direction or 'none'}, exact-loss clusters {exact.num_clusters}")

    basis = pj.Basis.load(args.run_dir / "basis" / "hessian")
    for rule in ("none", "trapezoid", "paper"):  # "paper" with the basis' stored eigenvalues
        kept_by_rule = analysis.kept_directions(result.projected_loss_with(rule, basis.eigenvalues))
        print(f"- second order {rule}: the oscillation filter keeps {int(kept_by_rule.sum())} of "
              f"{kept_by_rule.size} directions")
    print(f"- stored eigenvalues {basis.eigenvalues.min():.1f} to {basis.eigenvalues.max():.1f}")

    print(f"- median share of |θ_t+1 − θ_t|² in the basis: {1 - np.median(result.outside_fraction):.4f}")
    print(f"- mean decomposed loss change per token {projected[-1].sum(axis=1).mean():.3f}, "
          f"true {float(np.mean(loss[-1] - loss[0])):.3f}")
    final = projected[-1][:, kept]  # [N, kept]
    print(f"- at the last checkpoint, 90% of tokens within ±{np.quantile(np.abs(final), 0.9, axis=0).max():.2f} "
          f"in every kept direction; medians within ±{np.abs(np.median(final, axis=0)).max():.3f}")


if __name__ == "__main__":
    main()
