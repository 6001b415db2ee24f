"""The arithmetic report's own sections: the run's carry scores beside the paper's (Tables 1, 8-11).

Reads the run's generic results (``RunView.metrics``, label set ``carry``); a strategy the run did not produce is
"not run".
"""

from __future__ import annotations

from polca_jax.pipeline.reporting import MISSING, markdown_table, number, value_text

PAPER_ARITHMETIC_RESULTS = {
    "exact_loss": {"hidden_breakthrough_fraction": 0.0, "top_clusters": [(0.514, 0.771, 0.617)]},
    "loss_change": {"hidden_breakthrough_fraction": 0.0, "top_clusters": [(0.524, 0.958, 0.678)]},
    "fisher": {
        "hidden_breakthrough_fraction": 0.284,
        "top_clusters": [(0.664, 0.947, 0.781), (0.643, 0.740, 0.688), (0.637, 0.874, 0.737)],
    },
    "lca": {
        "hidden_breakthrough_fraction": 0.019,
        "top_clusters": [(0.792, 0.772, 0.782), (0.614, 0.873, 0.721), (0.592, 0.626, 0.609)],
    },
    "first_order_polca": {
        "hidden_breakthrough_fraction": 0.307,
        "top_clusters": [(0.948, 0.767, 0.848), (0.928, 0.769, 0.841), (0.887, 0.751, 0.813)],
    },
    "polca": {
        "hidden_breakthrough_fraction": 0.355,
        "top_clusters": [(0.973, 0.736, 0.838), (0.946, 0.773, 0.850), (0.903, 0.762, 0.827)],
    },
    "random_basis": {
        "hidden_breakthrough_fraction": 0.031,
        "top_clusters": [(0.902, 0.655, 0.759), (0.858, 0.533, 0.658), (0.838, 0.586, 0.689)],
    },
    "shuffled_hessian": {
        "hidden_breakthrough_fraction": 0.304,
        "top_clusters": [(0.856, 0.699, 0.769), (0.852, 0.734, 0.789), (0.834, 0.730, 0.779)],
    },
}
"""The paper's arithmetic numbers per strategy: the hidden-breakthrough fraction (Tables 1, 9, 11) and the
(homogeneity, recall, F1) of the top carry clusters (Tables 8, 10). Table 1's maximum carry homogeneity is the first
of these rows (0.514, 0.524, 0.792, 0.973 in the paper)."""

TABLE_1_ROWS = (("exact_loss", "Exact loss"), ("loss_change", "Change in exact loss"),
                ("lca", "LCA (Lan et al., 2020)"), ("polca", "POLCA"))
TABLE_8_ROWS = (("exact_loss", "Loss"), ("loss_change", "Change in exact loss"), ("fisher", "Fisher information"),
                ("lca", "LCA"), ("first_order_polca", "First-order POLCA"), ("polca", "POLCA"))
TABLE_10_ROWS = (("random_basis", "Random orthonormal"), ("shuffled_hessian", "Random shuffled Hessian"),
                 ("polca", "POLCA (top Hessian)"))
TOP = 3
LABEL_SET = "carry"
NOT_RUN = "not run"


def paper_report_sections(view) -> list[str]:
    """Markdown sections comparing the run's carry clusters and breakthroughs with the paper's tables."""
    window, threshold = value_text(view.window_steps), value_text(view.threshold_step)
    note = (f"Ours: this run (Δ = {window}, τ = {threshold} steps); paper: Δ = 100, τ = 1000, its 9.5M-parameter "
            f"model over 10,000 steps. `{NOT_RUN}`: the run has no such strategy (`--set baselines=true` / "
            f"`ablations=true` add them); `{MISSING}`: no value (e.g. no cluster qualifies under the paper's rule "
            "that >85% of a cluster's carry tokens lie in the 10s/100s places); `—`: no such row.")
    if view.metrics is None:
        note += " **metrics.json is missing: no number of this run is available.**"
    return [
        "## The paper's tables, beside this run",
        "### Table 1 — cluster quality", note, _summary_table(view, TABLE_1_ROWS, with_homogeneity=True),
        "### Table 8 — top carry clusters per strategy",
        f"The {TOP} most carry-homogeneous qualifying clusters across all directions, with recall and F1 (outliers "
        "excluded).",
        _top_clusters_table(view, TABLE_8_ROWS),
        "### Table 9 — hidden-breakthrough fraction per strategy",
        "Fraction of clusters whose mean breakthrough step (Eq. 9) is later than τ (Eq. 10).",
        _summary_table(view, TABLE_8_ROWS, with_homogeneity=False),
        "### Table 10 — basis ablation: top carry clusters", _top_clusters_table(view, TABLE_10_ROWS),
        "### Table 11 — hidden-breakthrough fraction by basis",
        _summary_table(view, TABLE_10_ROWS, with_homogeneity=False),
    ]


def _summary_table(view, rows, with_homogeneity: bool) -> str:
    header = ["Strategy"]
    if with_homogeneity:
        header += ["Max carry homogeneity (ours)", "(paper)"]
    header += ["Hidden-breakthrough fraction (ours)", "(paper)", "Clusters (ours)"]
    table = []
    for variant, name in rows:
        ours, paper = view.variants.get(variant), PAPER_ARITHMETIC_RESULTS[variant]
        row = [name]
        if with_homogeneity:
            carry = None if ours is None else ours.label_sets.get(LABEL_SET)
            row += [NOT_RUN if ours is None else number(None if carry is None else carry.max_homogeneity),
                    number(paper["top_clusters"][0][0])]
        row += [NOT_RUN if ours is None else number(ours.hidden_breakthrough_fraction),
                number(paper["hidden_breakthrough_fraction"]),
                NOT_RUN if ours is None else str(ours.num_clusters)]
        table.append(row)
    return markdown_table(header, table)


def _top_clusters_table(view, rows) -> str:
    header = ["Strategy", "#", "Direction", "Size", "Homogeneity (ours)", "(paper)", "Recall (ours)", "(paper)",
              "F1 (ours)", "(paper)"]
    table = []
    for variant, name in rows:
        ours = view.variants.get(variant)
        carry = None if ours is None else ours.label_sets.get(LABEL_SET)
        top = [] if carry is None else carry.top_clusters[:TOP]
        paper = PAPER_ARITHMETIC_RESULTS[variant]["top_clusters"]
        for rank in range(max(len(top), len(paper))):
            if ours is None:
                where, scores = [NOT_RUN] * 2, [NOT_RUN] * 3
            elif rank < len(top):
                record = top[rank]
                where = ["—" if record.direction is None else str(record.direction), str(record.size)]
                scores = [number(record.homogeneity), number(record.recall), number(record.f1)]
            else:
                where, scores = ["—"] * 2, ["no qualifying cluster" if rank == 0 else "—", "—", "—"]
            theirs = [number(value) for value in paper[rank]] if rank < len(paper) else ["—"] * 3
            table.append([name if rank == 0 else "", str(rank + 1), *where,
                          *[cell for pair in zip(scores, theirs) for cell in pair]])
    return markdown_table(header, table)
