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
# # POLCA on an English language model, step by step (`tiny` preset)
#
# The `polca english` command runs these steps for you; here each one is a call to the public API, so you can swap
# in your own model or corpus. Every next-token prediction of the evaluation contexts is a POLCA sample. The `tiny`
# preset trains a one-layer model for a few seconds on part of the Lee news corpus that ships with gensim (no
# network needed), so the clusters are not meaningful: the point is the data flow. `polca english --preset cpu`
# gives the real thing.

# %%
import tempfile
from pathlib import Path

import jax
import numpy as np
from IPython.display import Image, Markdown, display

import polca_jax as pj
from polca_jax import analysis
from polca_jax.experiments.english import labels
from polca_jax.experiments.english.config import make_config
from polca_jax.experiments.english.pipeline import Experiment, RunDirectory, run_stages, target_positions

config = make_config("tiny", {"data": "lee"})  # or a .txt / .jsonl file, a directory of them, "hf:NAME"
run = RunDirectory(Path(tempfile.mkdtemp()) / "run", config)
# documents → train/validation split → BPE tokenizer (saved as tokenizer.json) → contexts, model, loss functions
experiment = Experiment(config, run / "tokenizer.json")
print(f"{pj._tree.num_params(experiment.initial_params):,} parameters; "
      f"{len(experiment.train_contexts)} training, {len(experiment.hessian_contexts)} Hessian and "
      f"{len(experiment.eval_contexts)} evaluation contexts of {config.context_length} + 1 tokens")
print("an evaluation context:", repr(experiment.tokenizer.decode(experiment.eval_contexts[0].tolist())))

# %% [markdown]
# ## 1. Train, keeping a checkpoint at every POLCA and basis step
# `polca_jax.training.train` (optax AdamW, orbax `CheckpointManager`). The loss function of the kernels is the
# cross-entropy of every next token: `per_sample_loss_fn(params, batch) -> [n_contexts, context_length]`. The train
# stage also saves the evaluation tokens' ids and texts (`tokens.npz`) for labelling.

# %%
run_stages(run, ["train"], progress=False)
print("checkpoints at steps", pj.OrbaxCheckpoints(run / "checkpoints").steps)
print("per-token losses:", experiment.per_sample_loss_fn(experiment.initial_params, experiment.eval_batch).shape)

# %% [markdown]
# ## 2. The basis: Algorithm 1 over the basis checkpoints
# Each checkpoint contributes the top eigenvector of the Hessian of the mean loss on the Hessian contexts, projected
# onto the complement of the vectors found before (Lanczos on Π⊥HΠ⊥).

# %%
basis_checkpoints = pj.OrbaxCheckpoints(run / "checkpoints", config.basis_steps, template=experiment.initial_params)
basis = pj.hessian_basis(experiment.loss_fn, basis_checkpoints, experiment.hessian_batch,
                         num_iters=config.lanczos_iters, key=jax.random.key(config.seed), progress=False)
print("eigenvalues", np.round(basis.eigenvalues, 3), "found at steps", basis.steps)

# %% [markdown]
# ## 3. POLCA: every evaluation token's loss change along every basis direction
# With many samples per context and few directions, `method="auto"` takes forward mode: one `jvp` per direction gives
# the projected gradient of every token of a context at once.

# %%
print("method:", pj.choose_method(config.context_length, basis.size))
result = pj.polca(experiment.per_sample_loss_fn, run / "checkpoints", experiment.eval_batch, basis,
                  steps=config.polca_steps, second_order=config.second_order, progress=False)
print("projected loss [T, N, K] =", result.projected_loss.shape, f"(N = {config.num_eval_tokens} tokens)")

# %% [markdown]
# ## 4. Filters, HDBSCAN per direction, and a label for each cluster
# The oscillation filter keeps directions whose mean projected loss falls; each kept direction clusters only the
# tokens whose projected loss falls. A cluster's label is the smallest set of tags covering 70% of its members at
# the target and each of the 3 tokens before it (spaCy part-of-speech tags when spaCy is installed, else built-in
# token tags).

# %%
kept = analysis.kept_directions(result.projected_loss)
clusterings = analysis.cluster_directions(result.projected_loss, directions=np.flatnonzero(kept),
                                          min_cluster_size=config.min_cluster_size)
texts = np.load(run / "tokens.npz")["texts"]  # [contexts, context_length + 1]
targets = target_positions(config.num_eval_contexts, config.context_length)  # sample -> (context, target column)
tags = labels.tag_tokens(texts, targets, tagger=labels.default_tagger())
for clustering in clusterings:
    for cluster in range(clustering.num_clusters):
        members = clustering.members(cluster)
        label = labels.label_cluster([tags[i] for i in members])
        medoid = members[analysis.medoid(result.projected_loss[:, members, clustering.direction].T)]
        print(f"direction {clustering.direction}, cluster {cluster} ({members.size} tokens): {label.text}")
        print("   medoid context:", labels.format_context(texts[targets[medoid, 0]], targets[medoid, 1]))

# %% [markdown]
# ## 5. The whole pipeline and its report
# The remaining stages (decompose, cluster POLCA and the exact-loss baseline, label every cluster, report) as the
# CLI runs them, on the same run directory.

# %%
report = run_stages(run, progress=False)
display(Markdown(report.read_text().split("## Summary")[1].split("## Training")[0]))
for figure in sorted((report.parent / "figures").glob("*.png"))[:3]:
    display(Image(filename=str(figure)))
