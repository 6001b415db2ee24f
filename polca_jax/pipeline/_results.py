"""The results' schema: the records of ``metrics.json``, which the score stage writes and the report, the tasks'
report sections and the experiments read. Host code.

``metrics.json`` (:class:`RunMetrics`)::

    schema_version  SCHEMA_VERSION
    settings        window_steps (Δ), threshold_step (τ) and where τ came from, the nulls' settings
    num_samples     N
    filters         per basis with projected-loss trajectories: directions kept by the oscillation filter, dropped
                    ones, and per direction the samples relying on it
    verdicts        per label set: found or not (``label_verdict``), the rule, its best cluster, and the best
                    cluster of the label-free controls with whether the finding beats it
    variants        per strategy: label, basis, trajectory, clusterings, clusters, hidden-breakthrough fraction,
                    breakthroughs, and per label set its class, maximum homogeneity, top clusters (Tables 1, 8, 10),
                    the spread of its directions' best homogeneity and how many clusters beat the permutation null;
                    ``clusters`` lists every cluster with its breakthrough (and its null, when hidden), its scores
                    and p-values against each label set, the causal check (directions of a basis with ``causal/``)
                    and (when the task has sample texts) the samples nearest its medoid

Label sets and strategies are the keys of ``dict[str, ...]`` fields; ``direction`` is a 0-based basis index, None
for a signal with one trajectory per sample (the exact loss, allocation profiles). A record's field is a JSON key of
the same name (``scored_class`` is ``class``); a field marked ``omitted_when_none`` is left out of the file when it
is None. :func:`read_metrics` refuses a missing or unknown key, or a value of another type, naming its path in the
file.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path

from polca_jax.errors import PolcaError
from polca_jax.files import read_json, write_json_atomic

SCHEMA_VERSION = 1
UNVERSIONED = 1  # a file without schema_version: written before the field existed, with version 1's layout
REDO_SCORE = "redo the score stage: polca run TASK --out RUN_DIR --stage score --force"
LabelClass = bool | int | str  # a class of a label set

_record = dataclasses.dataclass(frozen=True, kw_only=True)


def _stored_as(key: str):
    """A field whose JSON key is ``key`` (a Python keyword such as ``class``)."""
    return dataclasses.field(metadata={"json_key": key})


def _omitted_when_none():
    """A field left out of the file when it is None (and read as None when absent)."""
    return dataclasses.field(default=None, metadata={"omitted_when_none": True})


# ---------------------------------------------------------------- records


@_record
class ScoreSettings:
    """The settings the scores came from: Δ of Eq. 9 (``window_steps``), τ of Eq. 10 (``threshold_step``) and
    where it came from (``threshold_source``: ``config`` or how it was chosen), and the nulls' settings."""

    window_steps: int
    threshold_step: int
    threshold_source: str
    null_permutations: int
    breakthrough_shuffles: int
    significance: float


@_record
class FilterSummary:
    """The paper's two filters on one basis' ``[T, N, K]`` projected losses: the directions the oscillation filter
    keeps and drops, each direction's mean projected-loss change over training (``[K]``) and the number of samples
    relying on it (its projected loss falls; ``[K]``)."""

    num_directions: int
    kept_directions: list[int]
    dropped_directions: list[int]
    mean_final_projected_loss: list[float]
    relying_samples: list[int]


@_record
class ClusterPosition:
    """Which cluster: its direction (None for a per-sample signal), its index there and its number of members."""

    direction: int | None
    cluster: int
    size: int


@_record
class LabelScore:
    """One cluster scored against one label set: the class it is scored for, the share of its members in that class
    (homogeneity), recall and F1 (outliers left out), the class's share among the samples its clustering saw
    (base rate), whether it qualifies; its homogeneity's permutation p-value (None when ``testable`` is false: the
    cluster holds every sample its clustering saw), Holm-adjusted across the strategy's clusters, and whether that
    beats the null."""

    scored_class: LabelClass = _stored_as("class")
    homogeneity: float
    recall: float
    f1: float
    base_rate: float
    qualifies: bool
    pvalue: float | None
    pvalue_adjusted: float | None
    beats_null: bool
    testable: bool


@_record
class TopCluster(LabelScore, ClusterPosition):
    """One of a label set's most homogeneous clusters of a strategy: where it is and its scores."""


@_record
class BreakthroughNull:
    """A hidden breakthrough against the cluster's increments shuffled in time: the share of shuffles that would be
    hidden too, the p-value of so late a step, the shuffles' median step, and whether the p-value is significant."""

    null_hidden_rate: float
    pvalue: float
    null_median_step: float
    beats_null: bool


@_record
class Breakthrough(ClusterPosition):
    """A cluster's mean Eq. 9 breakthrough step, whether it is after τ (hidden, Eq. 10) and then its null."""

    mean_step: float
    hidden: bool
    null: BreakthroughNull | None = _omitted_when_none()


@_record
class CausalCheck:
    """A cluster's causal check: the mean loss increase of its members and of the other samples its clustering saw
    when its direction's share of the training displacement is removed (None when there are no others), their
    difference, its rank among its direction's clusters (1: hurt most), the difference's permutation p-value,
    Holm-adjusted, the null's standard deviation and whether it is hurt more than the rest (``CAUSAL_RULE``)."""

    member_mean: float
    others_mean: float | None
    difference: float | None
    rank: int
    pvalue: float
    pvalue_adjusted: float
    null_std: float | None
    hurt_more: bool


@_record
class ClusterRecord(ClusterPosition):
    """Every cluster of a strategy: its breakthrough step, whether hidden, and its null (None without a breakthrough
    or when not hidden); its scores per label set; its causal check (a basis with ``causal/``) and the samples
    nearest its medoid (a task with sample texts), the medoid first."""

    breakthrough_step: float | None
    hidden: bool | None
    breakthrough_null: BreakthroughNull | None
    labels: dict[str, LabelScore]
    causal: CausalCheck | None = _omitted_when_none()
    nearest_samples: list[int] | None = _omitted_when_none()


@_record
class DirectionSpread:
    """The spread over directions of each direction's most homogeneous qualifying cluster: how many directions have
    one, and the median and quartiles of their homogeneity (None without any)."""

    directions: int
    median: float | None
    q25: float | None
    q75: float | None


@_record
class LabelSetSummary:
    """A strategy against one label set: the class scored (None: each cluster's majority class), the label set it
    is stratified by, the highest homogeneity of a (qualifying) cluster, the top clusters, the spread over
    directions (None for a per-sample signal) and how many clusters beat the permutation null."""

    scored_class: LabelClass | None = _stored_as("class")
    stratified_by: str | None
    max_homogeneity: float | None
    top_clusters: list[TopCluster]
    per_direction_best: DirectionSpread | None
    clusters_beating_null: int


@_record
class CausalSummary:
    """How a strategy's clusters fare in the causal check: clusters checked, hurt more than the rest beyond noise,
    with a positive difference, the median difference, and the rule."""

    clusters: int
    hurt_more_than_others: int
    positive_difference: int
    median_difference: float | None
    rule: str


@_record
class StrategyResult:
    """One strategy's results: its label, basis and trajectory kind, its number of clusterings and clusters, the
    fraction of its breakthroughs that are hidden and that beat their null (None without breakthroughs), its
    breakthroughs, per label set its summary, its causal summary (None without ``causal/``) and every cluster."""

    label: str
    basis: str
    trajectory: str
    num_directions: int
    num_clusters: int
    hidden_breakthrough_fraction: float | None
    hidden_beating_null_fraction: float | None
    breakthroughs: list[Breakthrough]
    label_sets: dict[str, LabelSetSummary]
    causal: CausalSummary | None
    clusters: list[ClusterRecord]


@_record
class VerdictCluster:
    """A verdict's record of one cluster: its strategy (and label), where it is and its scores for the label set."""

    strategy: str
    label: str
    direction: int | None
    cluster: int
    size: int
    scored_class: LabelClass = _stored_as("class")
    homogeneity: float
    recall: float
    base_rate: float
    pvalue_adjusted: float | None
    beats_null: bool


@_record
class Verdict:
    """Was a label set found (``label_verdict`` in the score stage)? The label set's own condition and the rule; the
    strategies that may find it; whether the random basis has such a cluster too (None: not run); whether the finding
    recovers the class; the best such cluster of the finding's random twin and of the label-free controls, with
    whether the finding beats them (None: nothing found or not run); the best cluster (None: none qualifies)."""

    found: bool
    condition: str
    rule: str
    strategies: list[str]
    random_basis_found: bool | None
    recovers_class: bool | None
    random_twin: VerdictCluster | None
    beyond_random_twin: bool | None
    control: VerdictCluster | None
    beyond_controls: bool | None
    best: VerdictCluster | None


@_record
class RunMetrics:
    """The whole of ``metrics.json``: filters per basis, results per strategy, verdicts per label set.

    The module docstring describes its layout. The score stage writes it; :func:`read_metrics` reads it, checked
    against this schema.

    Attributes:
      schema_version: the layout's version (``SCHEMA_VERSION``).
      settings: Δ, τ and where τ came from, and the nulls' settings (``ScoreSettings``).
      num_samples: N, the evaluation samples scored.
      filters: basis -> the oscillation filter on its projected losses (``FilterSummary``).
      variants: strategy (a ``Variant`` name, e.g. ``POLCA``) -> its results (``StrategyResult``).
      verdicts: label set -> whether it was found, and by which cluster (``Verdict``).

    Example:
      ``out``: the run directory of :func:`polca_jax.pipeline.run`'s example.

      >>> from polca_jax.pipeline import POLCA, read_metrics
      >>> metrics = read_metrics(out / "metrics.json")
      >>> metrics.settings.window_steps, sorted(metrics.verdicts)
      (10, ['group'])
      >>> metrics.variants[POLCA].label, metrics.variants[POLCA].basis
      ('POLCA', 'hessian')
    """

    schema_version: int = SCHEMA_VERSION
    settings: ScoreSettings
    num_samples: int
    filters: dict[str, FilterSummary]
    variants: dict[str, StrategyResult]
    verdicts: dict[str, Verdict]


# ---------------------------------------------------------------- reading and writing


def write_metrics(path: str | Path, metrics: RunMetrics) -> None:
    """Write ``metrics`` to ``path`` (``metrics.json``) atomically."""
    write_json_atomic(path, _to_json(metrics))


def read_metrics(path: str | Path) -> RunMetrics:
    """The records of ``path`` (``metrics.json``, which the score stage writes) as a :class:`RunMetrics`.

    A file without ``schema_version`` is read as version ``UNVERSIONED`` (1).

    Args:
      path: the file.

    Returns:
      Its records, every field checked against the schema.

    Raises:
      PolcaError: the file is missing, not JSON or not a JSON object, of another schema version, or has a
        missing or unknown key or a value of another type (naming the file and the key's path in it); the message
        says to redo the score stage.

    Example:
      ``out``: the run directory of :func:`polca_jax.pipeline.run`'s example (160 evaluation samples).

      >>> import json
      >>> import tempfile
      >>> from pathlib import Path
      >>> from polca_jax import PolcaError
      >>> from polca_jax.pipeline import read_metrics
      >>> metrics = read_metrics(out / "metrics.json")
      >>> metrics.num_samples, sorted(metrics.variants)
      (160, ['exact_loss', 'gradient_norms', 'polca'])
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = Path(directory) / "metrics.json"
      ...     _ = path.write_text(json.dumps({"schema_version": 2}))
      ...     try:
      ...         read_metrics(path)
      ...     except PolcaError as error:
      ...         print(error)
      /.../metrics.json has schema version 2, this polca_jax reads version 1: redo the score stage: polca run TASK
      --out RUN_DIR --stage score --force
    """
    contents = read_json(path)
    if not isinstance(contents, dict):
        raise PolcaError(f"{path}: not a JSON object; {REDO_SCORE}")
    version = contents.get("schema_version", UNVERSIONED)
    if version != SCHEMA_VERSION:
        raise PolcaError(f"{path} has schema version {version!r}, this polca_jax reads version {SCHEMA_VERSION}: "
                         f"{REDO_SCORE}")
    try:
        return _from_json({**contents, "schema_version": version}, RunMetrics, "")
    except _Mismatch as mismatch:
        where, problem = mismatch.args
        raise PolcaError(f"{path}: {where + ': ' if where else ''}{problem}; {REDO_SCORE}") from None


_type_hints = functools.cache(typing.get_type_hints)


class _Mismatch(Exception):
    """A value that does not match the schema: (its path in the file, what is wrong)."""


def _field_key(field: dataclasses.Field) -> str:
    return field.metadata.get("json_key", field.name)


def _to_json(value):
    """Records as JSON values: a record as an object of its fields' keys (``omitted_when_none`` ones left out when
    None), lists and dicts item by item, scalars as they are."""
    if dataclasses.is_dataclass(value):
        return {_field_key(field): _to_json(getattr(value, field.name)) for field in dataclasses.fields(value)
                if not (field.metadata.get("omitted_when_none") and getattr(value, field.name) is None)}
    if isinstance(value, list):
        return [_to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    return value


def _from_json(value, hint, where: str):
    """``value`` read from JSON as the type ``hint``: a record, ``X | None``, ``list[X]``, ``dict[str, X]`` or a
    JSON scalar; ``where``: its path in the file (``variants.polca.clusters[3]``)."""
    if dataclasses.is_dataclass(hint):
        return _record_from_json(value, hint, where)
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in arguments if option is not type(None)]
        if value is None and len(options) < len(arguments):
            return None
        if len(options) == 1:
            return _from_json(value, options[0], where)
        if any(_is_scalar(value, option) for option in options):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_from_json(item, arguments[0], f"{where}[{index}]") for index, item in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return {key: _from_json(item, arguments[1], _key_path(where, key)) for key, item in value.items()}
    elif _is_scalar(value, hint):
        return float(value) if hint is float else value
    raise _Mismatch(where, f"expected {_type_name(hint)}, got {value!r:.80}")


def _record_from_json(value, record_type, where: str):
    if not isinstance(value, dict):
        raise _Mismatch(where, f"expected an object ({record_type.__name__}), got {value!r:.80}")
    hints = _type_hints(record_type)
    fields = {_field_key(field): field for field in dataclasses.fields(record_type)}
    unknown = [key for key in value if key not in fields]
    if unknown:
        raise _Mismatch(where, f"unknown key {unknown[0]!r}")
    arguments = {}
    for key, field in fields.items():
        if key in value:
            arguments[field.name] = _from_json(value[key], hints[field.name], _key_path(where, key))
        elif not field.metadata.get("omitted_when_none"):
            raise _Mismatch(where, f"missing key {key!r}")
    return record_type(**arguments)


def _is_scalar(value, kind) -> bool:
    """Whether a JSON value is of the scalar type ``kind`` (an int counts as a float; a bool as neither)."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return kind in (int, str) and isinstance(value, kind)


def _key_path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint)
