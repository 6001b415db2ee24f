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
# # POLCA on an English language model, step by step (`tiny` preset)
#
# `polca run english` runs these steps for you; here each one is a call to the public API, so you can swap in your
# own model or corpus. Every next-token prediction of the evaluation contexts is a POLCA sample. The `tiny` preset
# trains a one-layer model for a few seconds on part of the Lee news corpus that ships with gensim (no network
# needed), so the clusters are not meaningful: the point is the data flow. `polca english --preset cpu` gives the
# real thing.

# %%
import tempfile
from pathlib import Path

import jax
import numpy as np
from IPython.display import Image, Markdown, display

import polca_jax as pj
from polca_jax import analysis, tree
from polca_jax.pipeline import build_task, checkpoint_store, import_experiment, open_run, run_stages

english = import_experiment("english")  # experiments/english of this clone
labels, target_positions = english.labels, english.target_positions

# data="lee", or a .txt / .jsonl file, a directory of them, "hf:NAME"
run, definition = open_run("english", Path(tempfile.mkdtemp()) / "run", preset="tiny", settings={"data": "lee"})
config, options = run.config, run.config.task_options
# documents → train/validation split → BPE tokenizer (kept as tokenizer.json) → contexts, model, loss functions
task = build_task(run)
print(f"{tree.num_params(task.init_params):,} parameters; {task.num_samples} evaluation tokens")
print("a sample:", task.sample_texts[5])

# %% [markdown]
# ## 1. Train, keeping a checkpoint at every POLCA and basis step
# The loss function of the kernels is the cross-entropy of every next token:
# `per_sample_loss(params, batch) -> [n_contexts, context_length]`.

# %%
run_stages(run, definition, ["train"], progress=False)
print("checkpoints at steps", pj.OrbaxCheckpoints(run / "checkpoints").steps)
print("per-token losses:", task.per_sample_loss(task.init_params, task.eval_batch).shape)

# %% [markdown]
# ## 2. The basis: Algorithm 1 over the basis checkpoints
# Each checkpoint contributes the top eigenvector of the Hessian of the mean loss on the Hessian contexts, projected
# onto the complement of the vectors found before (Lanczos on Π⊥HΠ⊥).

# %%
with checkpoint_store(run, task, config.basis_steps) as basis_checkpoints:
    basis = pj.hessian_basis(task.loss, basis_checkpoints, task.hessian_batch, num_iters=config.lanczos_iters,
                             key=jax.random.key(config.seed), progress=False)
print("eigenvalues", np.round(basis.eigenvalues, 3), "found at steps", basis.steps)

# %% [markdown]
# ## 3. POLCA: every evaluation token's loss change along every basis direction
# With many samples per context and few directions, `method="auto"` takes forward mode: one `jvp` per direction gives
# the projected gradient of every token of a context at once.

# %%
print("method:", pj.choose_method(options["context_length"], basis.size))
with checkpoint_store(run, task, config.polca_steps) as polca_checkpoints:
    result = pj.polca(task.per_sample_loss, polca_checkpoints, task.eval_batch, basis,
                      second_order=config.second_order, progress=False)
print("projected loss [T, N, K] =", result.projected_loss.shape)

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
targets = target_positions(options["num_eval_contexts"], options["context_length"])  # sample -> (context, column)
tags = labels.tag_tokens(texts, targets, tagger=labels.default_tagger())
for clustering in clusterings:
    for cluster in range(clustering.num_clusters):
        members = clustering.members(cluster)
        label = labels.label_cluster([tags[i] for i in members])
        medoid = members[analysis.medoid(result.projected_loss[:, members, clustering.direction].T)]
        print(f"direction {clustering.direction}, cluster {cluster} ({members.size} tokens): {label.text}")
        print("   medoid context:", task.sample_texts[medoid])

# %% [markdown]
# ## 5. The whole pipeline and its report
# The remaining stages (decompose, cluster and score POLCA and the exact-loss baseline, report with the paper's
# labels) as the CLI runs them, on the same run directory.

# %%
run_stages(run, definition, progress=False, log=lambda _: None)
report = run / "report" / "report.md"
display(Markdown(report.read_text().split("## What this run found")[1].split("## Strategies")[0]))
for figure in sorted((report.parent / "figures").glob("polca_direction_*.png"))[:2]:
    display(Image(filename=str(figure)))
