"""Hessian-vector products (forward-over-reverse)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from polca_jax import tree
from polca_jax.checks import batch_size, check_params

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]


def hvp(loss_fn: LossFn, params: PyTree, v: PyTree, batch: PyTree) -> PyTree:
    """H(params) v for the scalar ``loss_fn(params, batch)``; ``v`` and the result are shaped like ``params``.

    Forward-over-reverse (``jvp`` of ``grad``): about two gradients of cost, no Hessian is formed.
    Wrap in ``jax.jit`` (``loss_fn`` static) or use :class:`FlatHessianMatvec` to compile once.

    Args:
      loss_fn: ``(params, batch) -> scalar``, the loss whose Hessian is taken.
      params: the point, a pytree of floating arrays of one dtype.
      v: the vector, a pytree like ``params``.
      batch: the loss' batch (leaves with a leading sample axis).

    Returns:
      The pytree ``H v``, like ``params``.

    Raises:
      PolcaError: for an empty batch or parameters that are not all of one floating dtype (the check reads only
        shapes and dtypes, so it also runs under ``jit``, at trace time).

    Example:
      The least-squares problem the other examples use (``params``, ``batch``, ``per_sample_loss``, ``loss``):

      >>> import jax, jax.numpy as jnp, numpy as np, polca_jax as pj
      >>> params = {"w": jnp.zeros(3)}  # least squares, whose Hessian is xᵀx / n at every point
      >>> batch = {"x": jnp.array([[2.0, 0, 0], [0, 1, 0], [0, 0, 0.5], [1, 1, 1]]),
      ...          "y": -jnp.array([1.0, 1, 2, 0.5])}
      >>> def per_sample_loss(p, b):
      ...     return 0.5 * (b["x"] @ p["w"] - b["y"]) ** 2
      >>> def loss(p, b):
      ...     return per_sample_loss(p, b).mean()
      >>> pj.hvp(loss, params, {"w": jnp.array([1.0, 0, 0])}, batch)["w"].tolist()  # the first column of xᵀx / 4
      [1.25, 0.25, 0.25]
    """
    batch_size(batch, "hvp")
    check_params(params, "hvp")
    return jax.jvp(lambda p: jax.grad(loss_fn)(p, batch), (params,), (v,))[1]


@dataclasses.dataclass(frozen=True)
class FlatHessianMatvec:
    """``v [P] -> H v [P]`` for ``loss_fn`` at ``(params, batch)``, usable as a Lanczos ``matvec``.

    Hashable by ``loss_fn`` alone, so ``top_eigenpairs(FlatHessianMatvec(loss_fn), ..., matvec_args=(params, batch))``
    compiles once and is reused for every checkpoint with parameters of the same shapes. The vectors are flat, in
    ``ravel_pytree`` order of ``params``; the product is :func:`hvp`'s.

    Attributes:
      loss_fn: ``(params, batch) -> scalar``, the loss whose Hessian is applied.

    Example:
      ``params``, ``batch``, ``loss``: the least squares of :func:`polca_jax.hvp`'s example.

      >>> pj.FlatHessianMatvec(loss)(jnp.array([1.0, 0, 0]), params, batch).tolist()  # the first column of xᵀx / 4
      [1.25, 0.25, 0.25]
    """

    loss_fn: LossFn

    def __call__(self, v: jax.Array, params: PyTree, batch: PyTree) -> jax.Array:
        """``H v [P]`` for a flat ``v [P]``, at ``(params, batch)``."""
        return tree.ravel(hvp(self.loss_fn, params, tree.unravel(v, params), batch))


@dataclasses.dataclass(frozen=True)
class GradientCovarianceMatvec:
    """``v -> S C S v`` on params-shaped vectors: C = (1/N) Σ_x (g(x) − ḡ)(g(x) − ḡ)ᵀ the covariance of the per-sample
    gradients of ``per_sample_loss_fn`` at ``(params, batch)`` (every entry of its output a sample) and S = diag(s)
    for a params-shaped scale ``s``: one forward-mode pass gives the N directional derivatives ⟨g(x), S v⟩, one
    reverse-mode pass contracts them back; no per-sample gradient is formed."""

    per_sample_loss_fn: Callable[[PyTree, PyTree], jax.Array]

    def __call__(self, v: PyTree, params: PyTree, batch: PyTree, scale: PyTree) -> PyTree:
        def losses(p):
            return self.per_sample_loss_fn(p, batch).reshape(-1)

        scaled = jax.tree_util.tree_map(jnp.multiply, scale, v)
        _, directional = jax.jvp(losses, (params,), (scaled,))  # [N] ⟨g(x), S v⟩
        centered = (directional - directional.mean()) / directional.size
        _, pullback = jax.vjp(losses, params)
        (back,) = pullback(centered.astype(directional.dtype))
        return jax.tree_util.tree_map(jnp.multiply, scale, back)


@dataclasses.dataclass(frozen=True)
class HessianMatvec:
    """``v -> H v`` on params-shaped vectors for ``loss_fn`` at ``(params, batch)``: the pytree form of
    :class:`FlatHessianMatvec`, whose vectors stay split over a mesh like the parameters."""

    loss_fn: LossFn

    def __call__(self, v: PyTree, params: PyTree, batch: PyTree) -> PyTree:
        return hvp(self.loss_fn, params, v, batch)


@dataclasses.dataclass(frozen=True)
class ScaledHessianMatvec:
    """``v -> S H S v`` on params-shaped vectors, S = diag(s) for a params-shaped scale ``s``: the Hessian of
    ``loss_fn`` in the coordinates u of θ = S u (the preconditioned loss), one HVP per product."""

    loss_fn: LossFn

    def __call__(self, v: PyTree, params: PyTree, batch: PyTree, scale: PyTree) -> PyTree:
        product = hvp(self.loss_fn, params, jax.tree_util.tree_map(jnp.multiply, scale, v), batch)
        return jax.tree_util.tree_map(jnp.multiply, scale, product)
