"""One line per strategy and run (after each basis' directions kept by the oscillation filter): clusters, the best
qualifying carry cluster with its recall and Holm-corrected permutation p-value, how many clusters beat the null in any label set, hidden breakthroughs beyond their null, and
the causal check.

    python experiments/arithmetic/seed_summary.py RUN_DIR [RUN_DIR ...]
"""

import argparse
import json
from pathlib import Path

from polca_jax.pipeline import VARIANTS, read_metrics


def describe(info) -> str:
    """One strategy's line, from its results (a ``StrategyResult`` of :func:`read_metrics`)."""
    carry = info.label_sets.get("carry")
    top = [] if carry is None else carry.top_clusters
    best = "none qualifies" if not top else (
        f"{top[0].homogeneity:.3f} (recall {top[0].recall:.3f}, p {top[0].pvalue_adjusted:.3g}, "
        f"{top[0].size} tokens, base rate {top[0].base_rate:.3f})" if top[0].testable else
        f"{top[0].homogeneity:.3f} (not testable)")
    beating = sum(any(s.beats_null for s in c.labels.values()) for c in info.clusters)
    carry_beating = 0 if carry is None else carry.clusters_beating_null
    hidden = [b for b in info.breakthroughs if b.hidden]
    hidden_beating = sum(b.null is not None and b.null.beats_null for b in hidden)
    causal = info.causal
    causal_text = (f"; causal: {causal.hurt_more_than_others} of {causal.clusters} hurt more"
                   if causal is not None and causal.clusters else "")
    return (f"{info.num_clusters} clusters; best carry {best}; beating the null: {carry_beating} for carry, "
            f"{beating} for some label set; hidden {len(hidden)} ({hidden_beating} beyond their null){causal_text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    for run in parser.parse_args().runs:
        config = json.loads((run / "config.json").read_text())
        metrics = read_metrics(run / "metrics.json")
        kept = ", ".join(f"{basis} {len(f.kept_directions)} of {f.num_directions}"
                         for basis, f in metrics.filters.items())
        print(f"{run.name} (seed {config['seed']}): directions kept by the oscillation filter: {kept}")
        for name in (variant.name for variant in VARIANTS if variant.name in metrics.variants):
            print(f"  {metrics.variants[name].label}: {describe(metrics.variants[name])}")


if __name__ == "__main__":
    main()
