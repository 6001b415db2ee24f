#!/usr/bin/env bash
# The seed spread of the arithmetic results (results.md, "Seed spread"): the cpu preset with 3 seeds and every
# ablation (random and shuffled bases, LCA), and the paper-model setting of item 9 with 3 seeds, each followed by the
# sweep with 15 random directions. Usage: experiments/arithmetic/seed_spread.sh RUNS_DIR  (several hours on 2 cores)
set -euo pipefail
runs=${1:?usage: seed_spread.sh RUNS_DIR}
here=$(dirname "$0")
for seed in 0 1 2; do
  polca arithmetic --preset cpu --set ablations=true --set seed=$seed --out "$runs/cpu-ablations-seed$seed" --quiet
done
for seed in 1 2 0; do
  out="$runs/paper-4000-seed$seed"
  polca arithmetic --preset paper --out "$out" --quiet \
    --set num_steps=4000 --set num_train_problems=256000 --set num_eval_problems=500 --set num_hessian_problems=256 \
    --set polca_every=80 --set basis_every=200 --set basis_until=3000 --set second_order=trapezoid \
    --set ablations=false --set seed=$seed
  python "$here/sweep_clustering.py" "$out" --random-directions 15 > "$out/sweep.txt"
done
