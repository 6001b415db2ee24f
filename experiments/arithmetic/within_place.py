"""Within one answer place, does one direction's projected-gradient trajectory split carry from non-carry tokens?

    python experiments/arithmetic/within_place.py RUN_DIR [RUN_DIR ...] [--bases hessian,random]

For each finished arithmetic run, basis and answer place (the place is each token's position, known without labels),
every direction's unit-norm projected-gradient trajectory over every POLCA checkpoint (the per-direction features of
``gradient_directions=each``, ``gradient_window=1.0``) of that place's tokens, reduced to 10 principal components and
split in two by a Gaussian mixture. A two-way split is a supervised choice of the count, so this is a diagnostic of
where the carry signal lies, not a strategy. Prints the three directions whose split agrees best with carry (ARI),
each with the carry-richer half's homogeneity / recall within the place.
"""

import argparse
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

import polca_jax as pj
from polca_jax.pipeline import load_labels

PLACES = {1: "100s", 2: "10s"}  # the places whose carry tokens the paper's rule counts (label set "place")


def two_way_splits(trajectories: np.ndarray, carry: np.ndarray) -> list[tuple[float, int, float, float]]:
    """(ARI with ``carry [n]``, direction, homogeneity, recall of the carry-richer half) per direction of
    ``trajectories [T, n, K]``, best first."""
    unit = trajectories / np.maximum(np.linalg.norm(trajectories, axis=0, keepdims=True), 1e-30)
    rows = []
    for direction in range(unit.shape[2]):
        features = PCA(n_components=10, random_state=0).fit_transform(unit[:, :, direction].T)
        halves = GaussianMixture(2, n_init=3, random_state=0).fit_predict(features)
        richer = max((0, 1), key=lambda half: carry[halves == half].mean())
        members = halves == richer
        rows.append((adjusted_rand_score(carry, halves), direction, carry[members].mean(),
                     carry[members].sum() / carry.sum()))
    return sorted(rows, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--bases", default="hessian,random", help="comma-separated bases the runs decomposed")
    args = parser.parse_args()
    print("| Run | Basis | Place (carry rate) | Best three directions: ARI (homogeneity / recall within the place) |")
    print("|---|---|---|---|")
    for run in args.runs:
        labels = load_labels(run)[0]
        place, carry = labels["place"].values, labels["carry"].values.astype(bool)
        for basis in args.bases.split(","):
            projections = np.asarray(pj.POLCAResult.load(run / "polca" / basis).projections)
            for index, name in PLACES.items():
                here = place == index
                best = two_way_splits(projections[:, here], carry[here])[:3]
                cells = ", ".join(f"d{d} {a:.2f} ({h:.2f} / {r:.2f})" for a, d, h, r in best)
                print(f"| {run.name} | {basis} | {name} ({carry[here].mean():.2f}) | {cells} |", flush=True)


if __name__ == "__main__":
    main()
