"""Label-free controls that need no POLCA, on a finished planted-benchmark run: can they find the groups too?

    python experiments/planted/trivial_controls.py RUN_DIR [--steps 10 600]

For each chosen checkpoint (default: the second POLCA checkpoint and the last one), k-means with as many clusters
as there are groups on where each sample's gradient lies: its gradient norm per row of the first layer ``w_in``,
as shares of the sample's total ([N, D] features that sum to 1 per sample; raw norms would cluster by magnitude),
and the adjusted Rand index of that clustering against the planted groups. Beside it, a
supervised upper bound that no strategy may use: the cross-validated ROC AUC of a logistic probe for group A
against the rest on the exact-loss trajectories [N, T]. A planted case shows POLCA at work only where these
controls fail; a case they solve is easy, whatever POLCA does on it.
"""

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import polca_jax as pj
from polca_jax.pipeline import load_labels, load_task_definition


def gradient_norm_shares(task, params) -> np.ndarray:
    """[N, D]: the norm of each sample's loss gradient restricted to each row of ``w_in``, as a share of their sum."""
    def sample_gradient(sample):
        single = jax.tree_util.tree_map(lambda leaf: leaf[None], sample)
        return jax.grad(lambda p: task.per_sample_loss(p, single)[0])(params)["w_in"]

    gradients = jax.jit(jax.vmap(sample_gradient))(task.eval_batch)  # [N, D, H]
    norms = np.asarray(jnp.linalg.norm(gradients, axis=-1), np.float64)
    return norms / np.maximum(norms.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)


def gradient_share_ari(task, params, groups: np.ndarray) -> float:
    """ARI against ``groups`` of k-means (as many clusters as groups) on :func:`gradient_norm_shares`."""
    found = KMeans(np.unique(groups).size, n_init=10, random_state=0).fit_predict(gradient_norm_shares(task, params))
    return adjusted_rand_score(groups, found)


def exact_loss_probe_auc(loss: np.ndarray, groups: np.ndarray, pairs: np.ndarray | None = None) -> float:
    """Cross-validated ROC AUC of a logistic probe for the first group against the rest on the exact-loss
    trajectories ``loss [T, N]``: a supervised upper bound no strategy may use. ``pairs`` (int[N], optional): samples
    that share an id stay in one fold (a mirrored run's sample and its mirror image: split between folds, the twin
    of the other group teaches the probe the opposite answer, and the AUC falls below 0.5)."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    target = groups == np.unique(groups)[0]
    folds = 5 if pairs is None else GroupKFold(5)
    return cross_val_score(probe, np.asarray(loss).T, target, groups=pairs, cv=folds, scoring="roc_auc").mean()


def mirror_pairs(config: dict, num_samples: int) -> np.ndarray | None:
    """int[N]: the pair id of each evaluation sample of a mirrored entangled run (sample i and i + N/2), else None."""
    return np.arange(num_samples) % (num_samples // 2) if config["task_options"].get("mirror") is True else None


def load_planted_run(run_dir: Path) -> tuple[dict, object, np.ndarray]:
    """A finished planted run's config, its task (built by running the task's code) and its group labels [N]."""
    config = json.loads((run_dir / "config.json").read_text())
    label_sets = load_labels(run_dir)[0]
    if "group" not in label_sets:
        raise SystemExit(f"{run_dir} has no label set 'group': it is not a run of the planted benchmark")
    task = load_task_definition(config["task"])(**config["task_options"], seed=config["seed"])
    return config, task, label_sets["group"].values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, nargs="*", help="checkpoint steps (default: the second and the last)")
    args = parser.parse_args()
    _, task, groups = load_planted_run(args.run_dir)
    result = pj.POLCAResult.load(args.run_dir / "polca" / "hessian")
    steps = args.steps or [int(result.steps[1]), int(result.steps[-1])]
    store = pj.OrbaxCheckpoints(args.run_dir / "checkpoints", steps)
    print(f"{args.run_dir}: {groups.size} samples, {np.unique(groups).size} groups")
    for index, step in enumerate(steps):
        ari = gradient_share_ari(task, store[index], groups)
        print(f"gradient norm shares per w_in row, step {step}, k-means: ARI {ari:.2f}")
    auc = exact_loss_probe_auc(result.loss, groups)
    print(f"supervised upper bound, logistic probe on the exact-loss trajectories: ROC AUC {auc:.2f}")


if __name__ == "__main__":
    main()
