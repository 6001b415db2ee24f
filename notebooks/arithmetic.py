# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # POLCA on 3-digit addition, step by step (`tiny` preset)
#
# `polca run arithmetic` runs these steps for you; here each one is a call to the public API, so you can swap in
# your own model. The `tiny` preset trains in seconds, so the clusters are not meaningful: the point is the data
# flow. `polca arithmetic --preset cpu` gives the real thing.

# %%
import tempfile
from pathlib import Path

import jax
import numpy as np
from IPython.display import Image, Markdown, display

import polca_jax as pj
from polca_jax import analysis
from polca_jax.pipeline import build_task, checkpoint_store, open_run, run_stages

# a run directory bound to the task and its tiny preset; the task holds the data, model and loss functions
run, definition = open_run("arithmetic", Path(tempfile.mkdtemp()) / "run", preset="tiny")
config = run.config
task = build_task(run)
print(f"{task.num_samples} evaluation samples (answer tokens); label sets {list(task.labels)}")
print("a sample:", task.sample_texts[1])

# %% [markdown]
# ## 1. Train, keeping a checkpoint at every POLCA and basis step
# The train stage runs optax AdamW and saves orbax checkpoints (`polca_jax.CheckpointRecorder` does the same in a
# training loop of your own).

# %%
run_stages(run, definition, ["train"], progress=False)
print("checkpoints at steps", pj.OrbaxCheckpoints(run / "checkpoints").steps)

# %% [markdown]
# ## 2. The basis: Algorithm 1 over the basis checkpoints
# Each checkpoint contributes the top eigenvector of the Hessian of the mean training loss, projected onto the
# complement of the vectors found before (Lanczos on Π⊥HΠ⊥).

# %%
with checkpoint_store(run, task, config.basis_steps) as basis_checkpoints:
    basis = pj.hessian_basis(task.loss, basis_checkpoints, task.hessian_batch, num_iters=config.lanczos_iters,
                             key=jax.random.key(config.seed), progress=False)
print("eigenvalues", np.round(basis.eigenvalues, 3), "found at steps", basis.steps)

# %% [markdown]
# ## 3. POLCA: every answer token's loss change along every basis direction

# %%
with checkpoint_store(run, task, config.polca_steps) as polca_checkpoints:
    result = pj.polca(task.per_sample_loss, polca_checkpoints, task.eval_batch, basis, second_order="paper",
                      progress=False)
print("projected loss [T, N, K] =", result.projected_loss.shape)
explained = np.abs(result.decomposed_change).sum() / np.abs(result.loss_change).sum()
print(f"the basis accounts for {explained:.0%} of the per-token |loss change| (in absolute terms)")

# %% [markdown]
# ## 4. Filters, HDBSCAN per direction, carry scores and breakthroughs

# %%
carry, place = task.labels["carry"].values, task.labels["place"].values
kept = analysis.kept_directions(result.projected_loss)
clusterings = analysis.cluster_directions(result.projected_loss, directions=np.flatnonzero(kept),
                                          min_cluster_size=config.min_cluster_size)
scores = analysis.cluster_label_scores(clusterings, carry, positive=True, qualifying=np.isin(place, (1, 2)))
for score in analysis.top_clusters(scores, 3, qualifying_only=False):
    print(score)
breakthroughs = analysis.cluster_breakthroughs(clusterings, result.projected_loss, result.steps, config.window)
print("mean breakthrough step per cluster:", [round(b.mean_step) for b in breakthroughs])

# %% [markdown]
# ## 5. The whole pipeline and its report
# The remaining stages (the basis ablations, the baselines, clustering and scoring every strategy, the report) as
# the CLI runs them, on the same run directory.

# %%
run_stages(run, definition, progress=False, log=lambda _: None)
report = run / "report" / "report.md"
display(Markdown(report.read_text().split("## What this run found")[1].split("## Strategies")[0]))
for figure in ("directions_overview", "exact_loss_clusters", "exact_loss_per_class"):
    display(Image(filename=str(report.parent / "figures" / f"{figure}.png")))
