"""POLCA's second-order term as a value: which rule, which eigenvalue, and whether it needs per-sample curvature.

For one interval t → t+1, with g_t(x) = ⟨b, ∇L(x; θ_t)⟩ ``[N, K]``, Δg = g_{t+1} − g_t and the projected step
s_t = ⟨b, θ_{t+1} − θ_t⟩ ``[K]``, the rules are (module docstring of :mod:`polca_jax._decomposition`):

- ``"none"``: 0;
- ``"paper"`` (Eqs. 4–5): ½ λ(X,b) s_t² · Δg(x) / Δg(X), with λ the basis' stored eigenvalue
  (``eigenvalues="stored"``) or the current mean curvature bᵀH_t(X)b (``eigenvalues="current"``);
- ``"trapezoid"``: ½ s_t · Δg(x);
- ``"exact"`` (Eq. 3): ½ bᵀH_t(x)b · s_t².
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import numpy as np

from polca_jax.errors import PolcaError

Kind = Literal["none", "paper", "trapezoid", "exact"]
SECOND_ORDER_CHOICES = get_args(Kind)
EIGENVALUE_CHOICES = ("stored", "current")


@dataclasses.dataclass(frozen=True)
class SecondOrder:
    """A second-order rule of POLCA.

    Attributes:
      kind: ``"none" | "paper" | "trapezoid" | "exact"``.
      eigenvalues: for ``"paper"``, ``"stored"`` (the basis' own eigenvalues) or ``"current"`` (bᵀH_t(X)b at every
        checkpoint); None for the other kinds (whatever was given).

    Raises:
      PolcaError: for an unknown kind, or ``"paper"`` with eigenvalues other than ``"stored"`` or ``"current"``.

    Example:
      >>> SecondOrder("paper", "current").needs_curvature
      True
      >>> SecondOrder.of("trapezoid")
      SecondOrder(kind='trapezoid', eigenvalues=None)
    """

    kind: Kind = "paper"
    eigenvalues: Literal["stored", "current"] | None = "stored"

    def __post_init__(self):
        if self.kind not in SECOND_ORDER_CHOICES:
            raise PolcaError(f"second_order must be one of {SECOND_ORDER_CHOICES}, got {self.kind!r}")
        if self.kind != "paper":
            object.__setattr__(self, "eigenvalues", None)
        elif self.eigenvalues not in EIGENVALUE_CHOICES:
            raise PolcaError(f"eigenvalues must be 'stored' or 'current', got {self.eigenvalues!r}")

    @classmethod
    def of(cls, second_order: "SecondOrder | str", eigenvalues: str = "stored") -> "SecondOrder":
        """``second_order`` itself when it is a :class:`SecondOrder`, else the rule it names (with ``eigenvalues``)."""
        if isinstance(second_order, SecondOrder):
            return second_order
        return cls(second_order, eigenvalues)

    @property
    def needs_curvature(self) -> bool:
        """Whether the rule needs the per-sample curvature bᵀH_t(x)b at every checkpoint (a forward-over-forward
        pass per direction): ``"exact"``, and ``"paper"`` with the current eigenvalue."""
        return self.kind == "exact" or (self.kind == "paper" and self.eigenvalues == "current")

    def term(self, g: np.ndarray, g_next: np.ndarray, s: np.ndarray, curvature: np.ndarray | None,
             stored_eigenvalues: np.ndarray | None) -> np.ndarray:
        """``[N, K]`` second-order terms of one interval, from g and the curvature ``[N, K]`` (None unless
        :attr:`needs_curvature`) at its first checkpoint, g at the next ``[N, K]``, the projected step s ``[K]`` and
        the basis' stored eigenvalues ``[K]``. For ``"paper"``, where |Δg(X)| is below 1e-12 times its largest value
        over the directions of the interval, the term is 0."""
        if self.kind == "none":
            return np.zeros_like(g)
        if self.kind == "exact":
            return 0.5 * curvature * s**2
        change = g_next - g  # Δg(x)
        if self.kind == "trapezoid":
            return 0.5 * s * change
        aggregate = change.mean(axis=0)  # Δg(X) [K]
        eigenvalue = np.asarray(stored_eigenvalues, g.dtype) if curvature is None else curvature.mean(axis=0)
        usable = np.abs(aggregate) > 1e-12 * np.max(np.abs(aggregate), initial=0.0)
        ratio = np.divide(change, aggregate, out=np.zeros_like(change), where=usable)
        return 0.5 * eigenvalue * s**2 * ratio


__all__ = ["EIGENVALUE_CHOICES", "SECOND_ORDER_CHOICES", "SecondOrder"]
