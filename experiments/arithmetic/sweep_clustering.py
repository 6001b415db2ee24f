"""Re-cluster a finished arithmetic run under other second-order rules and clustering settings, without retraining.

    python experiments/arithmetic/sweep_clustering.py RUN_DIR

For each second-order rule that is free given the stored projections (none, trapezoid, and the run's own), each
trajectory normalisation (none, unit, standardize) and min_cluster_size, prints the directions kept by the oscillation filter, the number of
clusters, the three most carry-homogeneous clusters that qualify under the paper's 10s/100s rule, and the most
homogeneous cluster of any kind.

First it prints how well each direction separates carry from no-carry tokens before any clustering: the ROC AUC of
a token's final projected loss as a carry predictor, within the 100s and within the 10s place (0.5: no signal; a
cluster of carry homogeneity >= 0.9 with real recall needs a direction far above 0.5). It also prints a supervised
upper bound: the 5-fold cross-validated ROC AUC of a logistic regression on a token's whole trajectory in one
direction (again within the 100s and within the 10s place). A high probe AUC with a low final-value AUC means the
carry signal is in the trajectories' shape, and what fails is finding it without labels; the same probe on the
exact-loss trajectories is the baseline it has to beat. Last, the final-value AUC within each answer digit (averaged
over the digits), and the per-digit means of the best 10s direction: whether the answer digit masks the carry.

    python experiments/arithmetic/sweep_clustering.py RUN_DIR --random-directions 20

also decomposes the run's checkpoints along that many random orthonormal directions (first order; this recomputes
projections, a few minutes on a CPU), prints their carry separability, to tell a weak basis from a weak signal, and
clusters them as the Hessian basis' first-order trajectories are clustered (the random-basis null of the sweep).
"""

import argparse
import itertools
import json
from pathlib import Path

import jax
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import polca_jax as pj
from polca_jax import analysis
from polca_jax.pipeline import RunDirectory, build_task, checkpoint_store, load_labels

LABEL_SETS = ("place", "carry", "digit")  # the arithmetic task's answer place, carry and answer digit per token
QUALIFYING_PLACES = (1, 2)  # the paper's rule: a carry cluster counts when >85% of its carry tokens are 100s or 10s


def projected_losses(result: pj.POLCAResult) -> dict[str, np.ndarray]:
    """``[T, N, K]`` projected loss under each second-order rule computable from the stored arrays."""
    return {"none": result.projected_loss_with("none"), "trapezoid": result.projected_loss_with("trapezoid"),
            f"run ({result.config['second_order']})": result.projected_loss}


def carry_separability(projected: np.ndarray, place: np.ndarray, carry: np.ndarray) -> np.ndarray:
    """``[K, 2]`` ROC AUC (direction-free: max(a, 1 - a)) of the final projected loss for carry, in the 100s and 10s."""
    auc = np.empty((projected.shape[2], 2))
    for column, place_index in enumerate((1, 2)):  # ANSWER_PLACES[1] = 100s, [2] = 10s
        tokens = place == place_index
        for direction in range(projected.shape[2]):
            value = roc_auc_score(carry[tokens], projected[-1, tokens, direction])
            auc[direction, column] = max(value, 1 - value)
    return auc


def carry_probe(projected: np.ndarray, place: np.ndarray, carry: np.ndarray) -> np.ndarray:
    """``[K, 2]`` cross-validated ROC AUC of a linear probe for carry on whole trajectories, in the 100s and 10s."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    auc = np.empty((projected.shape[2], 2))
    for column, place_index in enumerate((1, 2)):
        tokens = place == place_index
        for direction in range(projected.shape[2]):
            trajectories = projected[:, tokens, direction].T  # [n, T]
            auc[direction, column] = cross_val_score(probe, trajectories, carry[tokens], cv=5, scoring="roc_auc").mean()
    return auc


def within_digit_separability(projected: np.ndarray, place: np.ndarray, carry: np.ndarray,
                              digit: np.ndarray) -> np.ndarray:
    """``[K, 2]`` ROC AUC of the final projected loss for carry within each answer digit, averaged over the digits
    (then direction-free), in the 100s and 10s: the separability left once the answer digit is known."""
    auc = np.empty((projected.shape[2], 2))
    for column, place_index in enumerate((1, 2)):
        for direction in range(projected.shape[2]):
            per_digit = [roc_auc_score(carry[tokens], projected[-1, tokens, direction])
                         for tokens in ((place == place_index) & (digit == d) for d in range(10))
                         if 0 < carry[tokens].sum() < tokens.sum()]
            value = np.mean(per_digit)
            auc[direction, column] = max(value, 1 - value)
    return auc


def digit_means(projected: np.ndarray, place: np.ndarray, carry: np.ndarray, digit: np.ndarray,
                direction: int) -> str:
    """The final projected loss of 10s-place tokens in ``direction``, averaged per answer digit and carry."""
    final = projected[-1, :, direction]
    means = np.array([[final[(place == 2) & (digit == d) & (carry == c)].mean() for c in (False, True)]
                      for d in range(10)])  # [digit, (no carry, carry)]
    higher = int(np.sum(means[:, 1] > means[:, 0]))
    return (f"direction {direction}, 10s place: per-digit means {means.min():+.2f} to {means.max():+.2f}; carry "
            f"tokens above no-carry tokens for {higher} of 10 answer digits")


def print_separability(name: str, projected: np.ndarray, labels, digit: np.ndarray) -> None:
    auc = carry_separability(projected, labels["place"], labels["carry"])
    probe = carry_probe(projected, labels["place"], labels["carry"])
    within = within_digit_separability(projected, labels["place"], labels["carry"], digit)
    print(f"- linear probe on whole trajectories, {name}: best direction AUC 100s {probe[:, 0].max():.2f} "
          f"(direction {probe[:, 0].argmax()}), 10s {probe[:, 1].max():.2f} (direction {probe[:, 1].argmax()})")
    best = np.argsort(-auc.max(axis=1))[:3]
    print(f"- carry separability, {name}: best directions "
          + ", ".join(f"{k} (AUC 100s {auc[k, 0]:.2f}, 10s {auc[k, 1]:.2f})" for k in best)
          + f"; median direction 100s {np.median(auc[:, 0]):.2f}, 10s {np.median(auc[:, 1]):.2f}")
    print(f"- within one answer digit, {name}: best AUC 100s {within[:, 0].max():.2f} (direction "
          f"{within[:, 0].argmax()}), 10s {within[:, 1].max():.2f} (direction {within[:, 1].argmax()}); "
          + digit_means(projected, labels["place"], labels["carry"], digit, int(auc[:, 1].argmax())))


def random_basis_trajectories(run_dir: Path, num_directions: int) -> np.ndarray:
    """``[T, N, K]`` first-order projected loss of the run's evaluation tokens along random orthonormal directions
    (the run's task is rebuilt and checked against the data the run started with)."""
    run = RunDirectory(run_dir)
    task = build_task(run)
    basis = pj.random_basis(task.init_params, num_directions, jax.random.key(run.config.seed + 7))
    with checkpoint_store(run, task, run.config.polca_steps) as store:
        result = pj.polca(task.per_sample_loss, store, task.eval_batch, basis, second_order="none",
                          mask=task.eval_mask)
    return result.projected_loss


def run_labels(run_dir: Path) -> dict[str, np.ndarray]:
    """The run's ``place``, ``carry`` and ``digit`` label of every evaluation token, as the run stored them."""
    label_sets, _ = load_labels(run_dir)
    missing = [name for name in LABEL_SETS if name not in label_sets]
    if missing:
        raise SystemExit(f"{run_dir} has no label set(s) {missing} (it has {sorted(label_sets)}): this sweep reads "
                         "the arithmetic task's answer place, carry and digit")
    return {name: label_sets[name].values for name in LABEL_SETS}


def describe(clusters) -> str:
    return ", ".join(f"dir {c.direction}: {c.size} tokens, h={c.homogeneity:.2f}, r={c.recall:.2f}" for c in clusters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--min-cluster-sizes", type=int, nargs="+", default=[150, 60])
    parser.add_argument("--random-directions", type=int, default=0, metavar="K",
                        help="also measure the carry separability along K random directions")
    args = parser.parse_args()
    config = json.loads((args.run_dir / "config.json").read_text())
    labels = run_labels(args.run_dir)
    result = pj.POLCAResult.load(args.run_dir / "polca" / "hessian")
    print(f"run {args.run_dir}: {result.loss.shape[1]} tokens, {result.projections.shape[2]} directions, "
          f"reference_num_samples={config['reference_num_samples']}")
    steps_along = np.asarray(result.step_projection)  # [T-1, K]
    sign_changes = (np.sign(steps_along[1:]) != np.sign(steps_along[:-1])).mean(axis=0)
    print(f"- the basis holds a median {1 - np.median(result.outside_fraction):.1%} of |θ_t+1 − θ_t|²; the projected "
          f"step changes sign between consecutive intervals {sign_changes.min():.0%}–{sign_changes.max():.0%} of the "
          "time, per direction")
    exact_probe = carry_probe(np.asarray(result.loss)[:, :, None], labels["place"], labels["carry"])[0]
    print(f"- linear probe on exact-loss trajectories (the baseline to beat): AUC 100s {exact_probe[0]:.2f}, "
          f"10s {exact_probe[1]:.2f}")
    trajectories = projected_losses(result)
    shuffled = np.random.default_rng(0).permutation(labels["carry"])
    control = carry_probe(trajectories["none"], labels["place"], shuffled).max(axis=0)
    print(f"- linear probe with shuffled carry labels (chance level), best direction: AUC 100s {control[0]:.2f}, "
          f"10s {control[1]:.2f}")
    digit = labels["digit"]
    for rule, projected in trajectories.items():
        print_separability(f"second order {rule}", projected, labels, digit)
    if args.random_directions:
        random = random_basis_trajectories(args.run_dir, args.random_directions)
        print_separability(f"{args.random_directions} random directions, first order", random, labels, digit)
        trajectories[f"none along {args.random_directions} random directions"] = random
    for (rule, projected), normalize, size in itertools.product(
        trajectories.items(), [None, "unit", "standardize"], args.min_cluster_sizes
    ):
        kept = np.flatnonzero(analysis.kept_directions(projected))
        clusterings = analysis.cluster_directions(
            projected, directions=kept, min_cluster_size=size, normalize=normalize,
            reference_num_samples=config["reference_num_samples"],
        ) if kept.size else []
        scores = analysis.cluster_label_scores(clusterings, labels["carry"], positive=True,
                                               qualifying=np.isin(labels["place"], QUALIFYING_PLACES))
        print(f"- second order {rule}, normalize={normalize}, min_cluster_size={size}: kept {kept.size} directions, "
              f"{sum(c.num_clusters for c in clusterings)} clusters")
        print(f"    qualifying top 3: {describe(analysis.top_clusters(scores, 3)) or 'none'}")
        print(f"    most carry-homogeneous of any place: "
              f"{describe(analysis.top_clusters(scores, 1, qualifying_only=False)) or 'none'}")


if __name__ == "__main__":
    main()
