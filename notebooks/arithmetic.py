# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # POLCA on 3-digit addition, step by step (`tiny` preset)
#
# The `polca arithmetic` command runs these steps for you; here each one is a call to the public API, so you can
# swap in your own model. The `tiny` preset trains in seconds, so the clusters are not meaningful: the point is the
# data flow. `polca arithmetic --preset cpu` gives the real thing.

# %%
import tempfile
from pathlib import Path

import jax
import numpy as np
from IPython.display import Image, Markdown, display

import polca_jax as pj
from polca_jax import analysis
from polca_jax.experiments.arithmetic import task
from polca_jax.experiments.arithmetic.config import make_config
from polca_jax.experiments.arithmetic.pipeline import Experiment, RunDirectory, run_stages

config = make_config("tiny")
run = RunDirectory(Path(tempfile.mkdtemp()) / "run", config)
experiment = Experiment(config)  # problems, model and loss functions, all determined by the config's seed
print(f"{pj._tree.num_params(experiment.initial_params):,} parameters; "
      f"{len(experiment.eval_problems)} evaluation problems = {4 * len(experiment.eval_problems)} answer tokens")

# %% [markdown]
# ## 1. Train, keeping a checkpoint at every POLCA and basis step
# `polca_jax.training.train` (optax AdamW, orbax `CheckpointManager`); the train stage also saves the place and carry
# label of every evaluation answer token.

# %%
run_stages(run, ["train"], progress=False)
print("checkpoints at steps", pj.OrbaxCheckpoints(run / "checkpoints").steps)

# %% [markdown]
# ## 2. The basis: Algorithm 1 over the basis checkpoints
# Each checkpoint contributes the top eigenvector of the Hessian of the mean training loss, projected onto the
# complement of the vectors found before (Lanczos on Π⊥HΠ⊥).

# %%
basis_checkpoints = pj.OrbaxCheckpoints(run / "checkpoints", config.basis_steps, template=experiment.initial_params)
basis = pj.hessian_basis(experiment.loss_fn, basis_checkpoints, experiment.hessian_batch,
                         num_iters=config.lanczos_iters, key=jax.random.key(config.seed), progress=False)
print("eigenvalues", np.round(basis.eigenvalues, 3), "found at steps", basis.steps)

# %% [markdown]
# ## 3. POLCA: every answer token's loss change along every basis direction

# %%
result = pj.polca(experiment.per_sample_loss_fn, run / "checkpoints", experiment.eval_batch, basis,
                  steps=config.polca_steps, second_order="paper", progress=False)
print("projected loss [T, N, K] =", result.projected_loss.shape)
explained = np.abs(result.decomposed_change).sum() / np.abs(result.loss_change).sum()
print(f"the basis accounts for {explained:.0%} of the per-token |loss change| (in absolute terms)")

# %% [markdown]
# ## 4. Filters, HDBSCAN per direction, carry metrics and breakthroughs

# %%
place, carry = (labels.reshape(-1) for labels in task.answer_labels(experiment.eval_problems))
kept = analysis.kept_directions(result.projected_loss)
clusterings = analysis.cluster_directions(result.projected_loss, directions=np.flatnonzero(kept),
                                          min_cluster_size=config.min_cluster_size)
scores = analysis.carry_cluster_scores(clusterings, place, carry)
for score in analysis.top_carry_clusters(scores, 3, qualifying_only=False):
    print(score)
breakthroughs = analysis.cluster_breakthroughs(clusterings, result.projected_loss, result.steps, config.window_steps)
print("mean breakthrough step per cluster:", [round(b.mean_step) for b in breakthroughs])

# %% [markdown]
# ## 5. The whole pipeline and its report
# The remaining stages (the basis ablations, the baselines, clustering every strategy, the report) as the CLI runs
# them, on the same run directory.

# %%
report = run_stages(run, progress=False)
display(Markdown(report.read_text().split("## Table 1")[1].split("## Table 8")[0]))
for figure in sorted((report.parent / "figures").glob("*.png"))[:4]:
    display(Image(filename=str(figure)))
