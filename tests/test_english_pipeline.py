"""The English experiment end to end on the tiny preset (artifacts, labels of every cluster, resume), rejected configs
and run directories, and per-token projections of a language model against a loop of ``jax.grad``."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import polca_jax as pj
from polca_jax import _tree as tree, analysis
from polca_jax.cli import main
from polca_jax.experiments.english.config import make_config, parse_overrides
from polca_jax.experiments.english.pipeline import (
    STAGES,
    VARIANTS,
    Experiment,
    RunDirectory,
    language_model_loss_fns,
    target_positions,
    training_batches,
)
from polca_jax.experiments.english.report import write_report
from polca_jax.models import TransformerConfig, init_params


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory, kill_cli_run_after):
    """A tiny run killed right after its basis stage, then resumed to the end with the CLI."""
    run_dir = tmp_path_factory.mktemp("english") / "run"
    finished_before = kill_cli_run_after(["english", "--preset", "tiny", "--data", "lee"], run_dir)
    tokenizer_before = (run_dir / "tokenizer.json").read_text()
    assert not (run_dir / "stages" / "decompose.json").exists()
    assert main(["english", "--out", str(run_dir), "--quiet"]) == 0
    assert (run_dir / "tokenizer.json").read_text() == tokenizer_before  # reused, not retrained
    return run_dir, finished_before


def test_resume_skips_finished_stages(interrupted_then_resumed):
    run_dir, finished_before = interrupted_then_resumed
    for stage, record in finished_before.items():
        assert (run_dir / "stages" / f"{stage}.json").read_text() == record  # not redone
    for stage in STAGES:
        assert json.loads((run_dir / "stages" / f"{stage}.json").read_text())["wall_seconds"] >= 0


def test_every_artifact_is_written(interrupted_then_resumed):
    run_dir, _ = interrupted_then_resumed
    config = make_config("tiny")
    assert pj.OrbaxCheckpoints(run_dir / "checkpoints").steps == config.checkpoint_steps
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == config.num_steps // config.metrics_every
    assert all(np.isfinite(row["loss"]) and np.isfinite(row["validation_loss"]) for row in log)
    tokens = np.load(run_dir / "tokens.npz")
    assert tokens["ids"].shape == tokens["texts"].shape == (config.num_eval_contexts, config.context_length + 1)
    basis = pj.Basis.load(run_dir / "basis" / "hessian")
    assert basis.size == len(config.basis_steps)
    np.testing.assert_allclose(basis.vectors @ basis.vectors.T, np.eye(basis.size), atol=1e-4)
    result = pj.POLCAResult.load(run_dir / "polca" / "hessian")
    assert result.projected_loss.shape == (len(config.polca_steps), config.num_eval_tokens, basis.size)
    assert np.all(np.isfinite(result.projected_loss))
    # samples are the evaluation tokens in (context, position) order: the exact loss at the end of training is the
    # model's per-token loss on the saved evaluation ids
    experiment = Experiment(config, run_dir / "tokenizer.json")
    np.testing.assert_array_equal(experiment.eval_contexts, tokens["ids"])
    with pj.OrbaxCheckpoints(run_dir / "checkpoints", [config.num_steps], experiment.initial_params) as final:
        per_token = experiment.per_sample_loss_fn(final[0], {"tokens": tokens["ids"]})
    np.testing.assert_allclose(result.loss[-1], np.asarray(per_token).reshape(-1), rtol=1e-4)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    kept = analysis.kept_directions(result.projected_loss)
    assert metrics["filters"]["kept_directions"] == np.flatnonzero(kept).tolist()
    polca = analysis.load_clusterings(run_dir / "clusters" / "polca.npz")
    assert [c.direction for c in polca] == np.flatnonzero(kept).tolist()
    (exact,) = analysis.load_clusterings(run_dir / "clusters" / "exact_loss.npz")
    assert exact.direction is None and exact.num_samples == config.num_eval_tokens
    report = (run_dir / "report" / "report.md").read_text()
    assert "## Summary" in report and "kept by the oscillation filter" in report
    for link in [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (run_dir / "report" / link).is_file()


def test_every_cluster_is_labelled(interrupted_then_resumed):
    run_dir, _ = interrupted_then_resumed
    config = make_config("tiny")
    texts = np.load(run_dir / "tokens.npz")["texts"]
    targets = target_positions(config.num_eval_contexts, config.context_length)
    labels = json.loads((run_dir / "labels.json").read_text())
    total = 0
    for variant in VARIANTS:
        records = {(r["direction"], r["cluster"]): r for r in labels["variants"][variant]}
        clusterings = analysis.load_clusterings(run_dir / "clusters" / f"{variant}.npz")
        expected = {(c.direction, k) for c in clusterings for k in range(c.num_clusters)}
        assert set(records) == expected
        for clustering in clusterings:
            for cluster in range(clustering.num_clusters):
                record, members = records[clustering.direction, cluster], clustering.members(cluster)
                assert record["size"] == members.size
                assert set(record["label"]) == {"positions", "coverage", "simple", "text"}
                assert len(record["label"]["positions"]) == 4  # the target and the 3 tokens before it
                member_texts = texts[targets[members, 0], targets[members, 1]].tolist()
                assert all(member_texts.count(token) == count for token, count in record["top_tokens"])
                assert record["nearest_samples"][0] in members
                assert set(record["nearest_samples"]) <= set(members.tolist())
                assert len(record["nearest_contexts"]) == min(config.num_medoid_contexts, members.size)
                assert all("⟦" in context for context in record["nearest_contexts"])
                total += 1
    assert total > 0, "the tiny run should find at least one cluster"


def test_report_of_a_run_that_has_not_clustered(tmp_path):
    RunDirectory(tmp_path / "run", make_config("tiny"))
    report = write_report(tmp_path / "run").read_text()
    assert "metrics.json missing" in report and "labels.json missing" in report
    assert "clusters/polca.npz or polca/hessian/ is missing" in report


def test_training_batches_are_a_function_of_the_step():
    contexts = np.arange(10 * 3).reshape(10, 3)
    batches = training_batches(contexts, 4, seed=0)
    first_epoch = np.concatenate([batches(step)["tokens"] for step in (0, 1)])
    assert len({tuple(row) for row in first_epoch}) == 8  # no context twice within an epoch
    np.testing.assert_array_equal(training_batches(contexts, 4, seed=0)(5)["tokens"], batches(5)["tokens"])
    assert not np.array_equal(batches(0)["tokens"], batches(2)["tokens"])  # the next epoch is reshuffled


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        make_config("tiny", {"model_context_length": 8})
    with pytest.raises(ValueError, match="unknown config key"):
        make_config("tiny", {"context_lenght": 8})
    with pytest.raises(ValueError, match="validation_fraction must lie strictly between 0 and 1"):
        make_config("tiny", {"validation_fraction": 1.0})
    with pytest.raises(ValueError, match="must be divisible by num_heads"):
        make_config("tiny", {"num_heads": 3})
    with pytest.raises(ValueError, match="multiple of polca_every"):
        make_config("tiny", {"num_steps": 41})
    with pytest.raises(ValueError, match="expected int"):
        parse_overrides(["context_length=long"])
    assert parse_overrides(["max_documents=none", "data=notes.txt", "label_coverage=0.8"]) == {
        "max_documents": None, "data": "notes.txt", "label_coverage": 0.8}
    assert make_config("paper").context_length == make_config("paper").model_length == 128


def test_paper_preset_has_the_paper_model():
    from polca_jax.models import parameter_count

    config = make_config("paper")
    model = TransformerConfig(vocab_size=config.vocab_size, context_length=config.model_length,
                              num_layers=config.num_layers, d_model=config.d_model, num_heads=config.num_heads,
                              d_mlp=config.d_mlp)
    assert parameter_count(model) == 40_274_737
    assert len(config.basis_steps) == 30 and len(config.polca_steps) == 71
    assert pj.choose_method(config.context_length, len(config.basis_steps)) == "forward"


def test_cli_refuses_another_config_and_deletes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    RunDirectory(run_dir, make_config("tiny"))
    (run_dir / "tokenizer.json").write_text("{}")
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    assert main(["english", "--preset", "tiny", "--data", "other.txt", "--out", str(run_dir)]) == 2
    assert "data: 'lee' on disk vs 'other.txt'" in capsys.readouterr().err
    assert main(["english", "--preset", "tiny", "--set", "learning_rate=0.5", "--out", str(run_dir)]) == 2
    assert "learning_rate: 0.003 on disk vs 0.5" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before
    assert main(["english", "label", "--out", str(run_dir)]) == 2
    assert "stage 'train' has not finished" in capsys.readouterr().err
    other = tmp_path / "other"
    assert main(["english", "--preset", "tiny", "--set", "model_context_length=8", "--out", str(other)]) == 2
    assert "exceeds the model's context length" in capsys.readouterr().err
    assert not other.exists()


@pytest.mark.parametrize("method", ["forward", "reverse", "auto"])
def test_per_token_projections_match_a_loop_of_grad(method):
    """⟨b, ∇L(x)⟩ of every next-token loss of a float64 language model against a loop of `jax.grad`."""
    model = TransformerConfig(vocab_size=11, context_length=6, num_layers=1, d_model=8, num_heads=2, d_mlp=16,
                              param_dtype="float64")
    graphdef, params = init_params(model, seed=0)
    per_sample_loss_fn, _ = language_model_loss_fns(graphdef)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (3, model.context_length + 1), 0, model.vocab_size))
    basis = pj.random_basis(params, 4, jax.random.key(2))
    projections = pj.per_sample_projections(per_sample_loss_fn, params, {"tokens": tokens}, basis, method=method)

    @jax.jit
    def token_gradient(params, context, position):
        return tree.ravel(jax.grad(lambda p: per_sample_loss_fn(p, {"tokens": context[None]})[0, position])(params))

    expected = jnp.stack([  # samples in (context, position) order
        basis.vectors @ token_gradient(params, tokens[c], p) for c in range(3) for p in range(model.context_length)
    ])
    assert projections.shape == (3 * model.context_length, basis.size)
    np.testing.assert_allclose(projections, expected, rtol=1e-9, atol=1e-12)
