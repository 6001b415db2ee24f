"""The English report's own sections: the paper's summary numbers beside the run's (§5.1), and the paper's automatic
label of every POLCA and exact-loss cluster (Appendix E.2) with its most frequent target tokens.

Labels are computed here, from the run's ``tokens.npz`` and clusters, with spaCy part-of-speech tags when spaCy and
``en_core_web_sm`` are installed and the built-in token tags otherwise; they are also written to
``report/cluster_labels.json``. Each label is compared with the base rates of its tags among all evaluation tokens,
and only a label with an informative (enriched) offset counts as simple (the ``labels`` module docstring).
"""

from __future__ import annotations

import json

import numpy as np

from polca_jax.files import load_npz, write_atomic
from polca_jax.pipeline import EXACT_LOSS, POLCA
from polca_jax.pipeline.reporting import MISSING, markdown_table, number
from experiments.english import labels
from experiments.english.text import target_positions

PAPER_EVAL_TOKENS = 12_600  # the paper's evaluation set; min_cluster_size 300 was chosen for it
PAPER_ENGLISH_RESULTS = {
    "num_directions": 30,
    "kept_directions": 26,
    "mean_tokens_dropped": 6655.5,
    "num_samples": PAPER_EVAL_TOKENS,
    "directions_with_simple_label": 22,
    "exact_loss_clusters": ("repeated tokens", "continuing a noun (nouns of several tokens)"),
}
"""The paper's English numbers (§5.1, Appendix E.2, Fig. 9)."""
TOP_TOKENS = 10
TABLE_TOKENS = 5


def paper_report_sections(view) -> list[str]:
    """The summary beside the paper's, then each labelled cluster of POLCA and of the exact-loss baseline."""
    labelled = cluster_labels(view)
    return (["## The paper's English summary, beside this run", _summary_table(view, labelled)]
            + cluster_label_sections(view, labelled))


def cluster_label_sections(view, labelled: dict | None) -> list[str]:
    """Each labelled cluster of POLCA and of the exact-loss baseline (``labelled``: :func:`cluster_labels`), as
    markdown parts; the labels are also written to ``report/cluster_labels.json``."""
    parts = []
    if labelled is None:
        return ["*No automatic labels: tokens.npz or the clusters are missing.*"]
    text = json.dumps(labelled, indent=2, ensure_ascii=False)
    write_atomic(view.directory / "report" / "cluster_labels.json", lambda file: file.write(text.encode()))
    parts.append(f"Labels: `{labelled['tagger']}` tags covering {labelled['coverage']:.0%} of a cluster at each "
                 "offset (target, −1, −2, −3), each with the share of the cluster that carries them vs the share of "
                 "all evaluation tokens that does. An offset is informative when the cluster is enriched at least "
                 f"{labelled['min_enrichment']:g}× (and is not padding); a label is simple if no offset needs more "
                 f"than {labelled['max_simple_tags']} tags (not counting padding) and at least one offset is "
                 "informative. A label with few tags but no informative offset says nothing the base rates do not "
                 "(*uninformative*). All labels: `report/cluster_labels.json`.")
    for variant, title in ((EXACT_LOSS, "Exact-loss clusters (the paper's Fig. 9)"),
                           (POLCA, "POLCA clusters per kept direction (Figs. 5, 10, 11)")):
        records = labelled["variants"].get(variant, [])
        parts.append(f"### {title}")
        if not records:
            parts.append("*No cluster.*")
            continue
        rows = [[MISSING if r["direction"] is None else str(r["direction"]), str(r["cluster"]), str(r["size"]),
                 _label_cell(r["label"]),
                 ", ".join(f"{json.dumps(token, ensure_ascii=False)} ×{count}"
                           for token, count in r["top_tokens"][:TABLE_TOKENS])]
                for r in records]
        parts.append(markdown_table(["Direction", "Cluster", "Tokens", "Label (tags covering the cluster)",
                                     "Top target tokens"], rows))
    return parts


def cluster_labels(view) -> dict | None:
    """Every POLCA and exact-loss cluster's automatic label and top target tokens; None when the run lacks its
    evaluation tokens or clusters."""
    tokens_file = view.directory / "tokens.npz"
    if not tokens_file.is_file() or not {POLCA, EXACT_LOSS} & set(view.clusterings):
        return None
    texts = load_npz(tokens_file, ["texts"])["texts"]
    targets = target_positions(texts.shape[0], texts.shape[1] - 1)
    options = view.config.get("task_options", {})
    coverage, max_simple = options.get("label_coverage", 0.7), options.get("max_simple_tags", 2)
    tagger = labels.default_tagger()
    tags = labels.tag_tokens(texts, targets, tagger=tagger)
    population = labels.base_rates(tags)  # every evaluation token: what each cluster's label is compared with
    variants = {}
    for variant in (POLCA, EXACT_LOSS):
        variants[variant] = [
            {"direction": clustering.direction, "cluster": cluster, "size": int(members.size),
             "label": labels.label_cluster([tags[i] for i in members], coverage=coverage,
                                           max_simple_tags=max_simple, base_rates=population).to_dict(),
             "top_tokens": labels.top_tokens(texts[targets[members, 0], targets[members, 1]].tolist(), k=TOP_TOKENS)}
            for clustering in view.clusterings.get(variant, [])
            for cluster in range(clustering.num_clusters)
            for members in [clustering.members(cluster)]
        ]
    return {"tagger": "spacy" if labels.spacy_pipeline() is not None else "builtin", "coverage": coverage,
            "max_simple_tags": max_simple, "min_enrichment": labels.MIN_ENRICHMENT, "variants": variants}


def _summary_table(view, labelled: dict | None) -> str:
    paper = PAPER_ENGLISH_RESULTS
    filters = view.hessian_filter
    rows = []
    if filters is None:
        rows.append(["directions kept by the oscillation filter", "metrics.json missing",
                     str(paper["kept_directions"])])
    else:
        kept, num_samples = filters.kept_directions, view.metrics.num_samples
        dropped_tokens = [num_samples - filters.relying_samples[k] for k in kept]
        rows += [
            ["basis directions", str(filters.num_directions), str(paper["num_directions"])],
            ["kept by the oscillation filter (mean projected loss falls)", str(len(kept)),
             str(paper["kept_directions"])],
            ["dropped by it", ", ".join(map(str, filters.dropped_directions)) or "none",
             str(paper["num_directions"] - paper["kept_directions"])],
            ["tokens dropped per kept direction (mean; their projected loss rises)",
             f"{np.mean(dropped_tokens):.1f} of {num_samples}" if kept else MISSING,
             f"{paper['mean_tokens_dropped']} of {paper['num_samples']}"],
        ]
    kept_count = 0 if filters is None else len(filters.kept_directions)
    if labelled is None:
        simple = "labels missing"
    else:  # the paper's rule counts tags only; an uninformative label (every token would get it) is not counted here
        polca = labelled["variants"][POLCA]
        informative, few_tags = ({r["direction"] for r in polca if r["label"][key]} for key in ("simple", "few_tags"))
        simple = (f"{len(informative)} of {kept_count} (by the tag count alone, uninformative labels included: "
                  f"{len(few_tags)})")
    rows.append(["kept directions with a simply-labelled cluster", simple,
                 f"{paper['directions_with_simple_label']} of {paper['kept_directions']}"])
    threshold = view.threshold_step
    for variant, name in ((POLCA, "POLCA"), (EXACT_LOSS, "exact-loss baseline")):
        info = view.variants.get(variant)
        rows.append([f"{name} clusters", MISSING if info is None else str(info.num_clusters),
                     "not reported" if variant == POLCA else "2"])
        rows.append([f"{name}: fraction of clusters with a breakthrough after τ = {threshold}",
                     MISSING if info is None else number(info.hidden_breakthrough_fraction), "not reported"])
    return markdown_table(["Quantity", "This run", "Paper"], rows)


def _label_cell(label: dict) -> str:
    """A label for the report's table: marked simple, or uninformative when it has few tags but says nothing."""
    if label["simple"]:
        return "**simple**: " + label["text"]
    if label.get("few_tags") and label.get("informative") is not None:
        return "*uninformative*: " + label["text"]
    return label["text"]
