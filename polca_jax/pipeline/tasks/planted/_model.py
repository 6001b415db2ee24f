"""The planted-mechanism benchmark's data and model: G groups of samples, each solved by its own input block.

Every sample belongs to one group g. Its input has ``private_dims`` entries in group g's own block (the other
groups' blocks are zero) and ``shared_dims`` entries every group sees. Every group's target is the *same* teacher
function applied to its own [private block, shared block] (a mirror image), so the groups are equally hard and
their exact-loss curves match up to the spread of a finite sample and of the random initialisation.

The student is a one-hidden-layer tanh MLP without hidden bias, ``h = tanh(x @ w_in)``:

- ``w_in [D, H]``: its rows for group g's private block get a gradient from group g's samples only (a group's
  *mechanism*); the rows of the shared block from every group (``shared_dims`` sets how much the mechanisms
  overlap);
- the readout: ``shared_readout=True``: one head ``w_out [H, 1]``, ``b_out [1]`` for every group (the issue's first
  probe); False: one head per group, ``w_out [H, G]``, ``b_out [G]``, a sample reading its group's column. With
  separate heads and ``shared_dims = 0`` no parameter is shared: the loss is a sum of G independent problems.

Losses: ``"mse"`` (regression, (f(x) − y)²) or ``"logistic"`` (binary classification of the teacher's sign,
softplus(−s · f(x)) with s = ±1).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from polca_jax.errors import PolcaError

LOSSES = ("mse", "logistic")
# the pipeline settings of every planted benchmark's presets, and the CI-sized ("tiny") preset's (seconds a run)
BENCHMARK_SETTINGS = dict(learning_rate=1e-2, warmup_steps=10, weight_decay=0.0, reference_num_samples=None,
                          second_order="paper", null_permutations=500, breakthrough_shuffles=100)
TINY_SETTINGS = dict(BENCHMARK_SETTINGS, num_eval_samples=160, num_steps=200, polca_every=5, basis_every=40,
                     lanczos_iters=10, min_cluster_size=12, lca_axes=8, metrics_every=50, null_permutations=200,
                     breakthrough_shuffles=50)


@dataclasses.dataclass(frozen=True)
class PlantedSpec:
    """The shape of one planted benchmark (see the module docstring).

    group_weights: [G] relative group frequencies (training batches, evaluation and Hessian samples alike).
    teacher_units: hidden units of the teacher shared by all groups (its input weights have unit norm).
    noise: standard deviation of Gaussian noise added to every regression target (for ``"logistic"``: the
      probability of flipping a label is Φ(−|t| / noise) for teacher output t; 0 for none).
    """

    group_weights: tuple[float, ...]
    private_dims: int
    shared_dims: int
    width: int
    shared_readout: bool
    loss: str
    noise: float
    teacher_units: int = 2

    def __post_init__(self):
        if len(self.group_weights) < 2 or min(self.group_weights) <= 0:
            raise PolcaError(f"group_weights needs >= 2 positive entries (one per group), got {self.group_weights}")
        for name, low in (("private_dims", 1), ("shared_dims", 0), ("width", 1), ("teacher_units", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise PolcaError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.loss not in LOSSES:
            raise PolcaError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not (np.isfinite(self.noise) and self.noise >= 0):
            raise PolcaError(f"noise must be a finite number >= 0, got {self.noise!r}")

    @property
    def num_groups(self) -> int:
        return len(self.group_weights)

    @property
    def input_dim(self) -> int:
        """D = G · private_dims + shared_dims: the private blocks in group order, then the shared block."""
        return self.num_groups * self.private_dims + self.shared_dims

    def private_rows(self, group: int) -> slice:
        """The rows of ``w_in`` (entries of x) that only group ``group`` uses."""
        return slice(group * self.private_dims, (group + 1) * self.private_dims)

    @property
    def shared_rows(self) -> slice:
        return slice(self.num_groups * self.private_dims, self.input_dim)


def make_teacher(spec: PlantedSpec, rng: np.random.Generator) -> dict:
    """The teacher every group shares: ``u [private_dims + shared_dims, teacher_units]`` with unit-norm columns and
    output weights ``a [teacher_units]`` (a = 1, 1/2, 1/3, ...)."""
    u = rng.normal(size=(spec.private_dims + spec.shared_dims, spec.teacher_units))
    u /= np.linalg.norm(u, axis=0, keepdims=True)
    return {"u": u, "a": 1.0 / np.arange(1, spec.teacher_units + 1)}


def teacher_output(teacher: dict, z: np.ndarray) -> np.ndarray:
    """t(z) = Σ_j a_j tanh(2 u_j · z) for z [n, private_dims + shared_dims] -> [n]."""
    return np.tanh(2.0 * z @ teacher["u"]) @ teacher["a"]


def group_counts(weights: tuple[float, ...], n: int) -> np.ndarray:
    """int[G]: n samples split in proportion to ``weights`` (largest remainders; every group >= 1)."""
    share = np.asarray(weights, float) / np.sum(weights) * n
    counts = np.floor(share).astype(int)
    counts[np.argsort(-(share - counts), kind="stable")[: n - counts.sum()]] += 1
    if counts.min() < 1:
        raise PolcaError(f"{n} samples cannot give each of {len(weights)} groups (weights {weights}) a sample")
    return counts


def make_samples(spec: PlantedSpec, teacher: dict, groups: np.ndarray, rng: np.random.Generator, *,
                 mirror: bool = False) -> dict:
    """Samples of the given groups (int[n]): ``{"x": [n, D], "y": [n], "group": int[n]}`` (float32).

    mirror: the groups' samples are mirror images: the i-th sample of every group (in the order of ``groups``) has
    the same draw z (and noise) on its own block, so group g's samples are the first n_g of one list of draws.
    """
    n = groups.size
    z = rng.normal(size=(n, spec.private_dims + spec.shared_dims))
    noise = rng.normal(size=n)
    if mirror:
        rank = np.zeros(n, dtype=np.int64)  # the i-th sample of its group takes draw i
        for g in range(spec.num_groups):
            rows = np.flatnonzero(groups == g)
            rank[rows] = np.arange(rows.size)
        z, noise = z[rank], noise[rank]
    x = np.zeros((n, spec.input_dim))
    for g in range(spec.num_groups):
        rows = groups == g
        x[rows, spec.private_rows(g)] = z[rows, : spec.private_dims]
    x[:, spec.shared_rows] = z[:, spec.private_dims:]
    target = teacher_output(teacher, z)
    if spec.loss == "mse":
        y = target + spec.noise * noise
    else:
        y = np.sign(target + spec.noise * noise)
        y[y == 0] = 1.0
    return {"x": x.astype(np.float32), "y": y.astype(np.float32), "group": groups.astype(np.int32)}


def sample_groups(spec: PlantedSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """int[n]: groups in proportion to ``spec.group_weights``, shuffled."""
    counts = group_counts(spec.group_weights, n)
    return rng.permutation(np.repeat(np.arange(spec.num_groups), counts))


def init_params(spec: PlantedSpec, key: jax.Array, *, mirror: bool = False) -> dict:
    """``w_in [D, H]`` ~ N(0, 1/(private_dims + shared_dims)) (a sample sees that many inputs),
    ``w_out [H, heads]`` ~ N(0, 1/H), ``b_out [heads]`` = 0, with heads = 1 (shared readout) or G.

    mirror: every group's private rows of w_in are a copy of group A's, and every head a copy of head A's, so at
    step 0 each group computes the same function of its own block.
    """
    heads = 1 if spec.shared_readout else spec.num_groups
    k_in, k_out = jax.random.split(key)
    fan_in = spec.private_dims + spec.shared_dims
    w_in = np.asarray(jax.random.normal(k_in, (spec.input_dim, spec.width))) / np.sqrt(fan_in)
    w_out = np.asarray(jax.random.normal(k_out, (spec.width, heads))) / np.sqrt(spec.width)
    if mirror:
        for g in range(1, spec.num_groups):
            w_in[spec.private_rows(g)] = w_in[spec.private_rows(0)]
        w_out[:] = w_out[:, :1]
    return {"w_in": jnp.asarray(w_in, jnp.float32), "w_out": jnp.asarray(w_out, jnp.float32),
            "b_out": jnp.zeros(heads, jnp.float32)}


@dataclasses.dataclass(frozen=True)
class PerSampleLoss:
    """``(params, batch) -> [n]``: each sample's loss (hashable, so the pipeline's kernels compile once)."""

    shared_readout: bool
    loss: str

    def __call__(self, params, batch):
        outputs = jnp.tanh(batch["x"] @ params["w_in"]) @ params["w_out"] + params["b_out"]  # [n, heads]
        if self.shared_readout:
            prediction = outputs[:, 0]
        else:
            prediction = jnp.take_along_axis(outputs, batch["group"][:, None], axis=1)[:, 0]
        if self.loss == "mse":
            return (prediction - batch["y"]) ** 2
        return jax.nn.softplus(-batch["y"] * prediction)


def parameter_roles(spec: PlantedSpec) -> dict[str, np.ndarray]:
    """Which entries of the flat parameter vector (``jax.flatten_util.ravel_pytree`` order of
    :func:`init_params`) belong to which mechanism: ``"group <g>"`` (used by group g only), ``"shared input"`` (the
    shared block's rows of w_in), ``"readout"`` (w_out and b_out: shared when ``shared_readout``, otherwise each
    head is counted with its group). Values are bool [P] masks; together they cover every entry exactly once."""
    heads = 1 if spec.shared_readout else spec.num_groups
    d, h = spec.input_dim, spec.width
    # ravel_pytree flattens dict leaves in sorted key order: b_out [heads], w_in [D, H], w_out [H, heads]
    sizes = {"b_out": heads, "w_in": d * h, "w_out": h * heads}
    offsets = dict(zip(sizes, np.cumsum([0, *list(sizes.values())[:-1]])))
    total = sum(sizes.values())

    def mask_of(name, index_array):
        mask = np.zeros(total, bool)
        mask[offsets[name] + np.flatnonzero(index_array.reshape(-1))] = True
        return mask

    roles = {}
    for g in range(spec.num_groups):
        rows = np.zeros((d, h), bool)
        rows[spec.private_rows(g)] = True
        roles[f"group {g}"] = mask_of("w_in", rows)
        if not spec.shared_readout:
            column = np.zeros((h, heads), bool)
            column[:, g] = True
            bias = np.zeros(heads, bool)
            bias[g] = True
            roles[f"group {g}"] |= mask_of("w_out", column) | mask_of("b_out", bias)
    shared = np.zeros((d, h), bool)
    shared[spec.shared_rows] = True
    roles["shared input"] = mask_of("w_in", shared)
    if spec.shared_readout:
        roles["readout"] = mask_of("w_out", np.ones((h, heads), bool)) | mask_of("b_out", np.ones(heads, bool))
    return roles
