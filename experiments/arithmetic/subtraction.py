"""3-digit subtraction ``a - b`` with ``a >= b``: the paper's addition task (experiments/arithmetic) with another
operation, labelled per answer token by whether a borrow comes into its place (``borrow``, no qualifier), its place,
both (``skill``) and the answer digit. Run it from the clone's root::

    polca run experiments/arithmetic/subtraction.py:make_task --preset tiny --out runs/subtraction
"""

import numpy as np

from polca_jax.pipeline import Task, import_experiment, task_factory

arithmetic = import_experiment("arithmetic")  # this file is imported by path: the package comes from the clone

SUBTRACTION = arithmetic.problems.Operation("-", np.subtract)


def not_negative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The pairs whose difference is written, a int[M], b int[M] -> bool[M]: a >= b."""
    return a >= b


def borrows(a: np.ndarray, b: np.ndarray, powers: np.ndarray) -> np.ndarray:
    """A borrow comes into place p iff (a mod 10**p) < (b mod 10**p): a int[N, 1], b int[N, 1], powers int[P] ->
    bool[N, P]. So the 1s digit never borrows, nor (as a >= b) the 1000s."""
    return a % powers < b % powers


@task_factory(presets={name: arithmetic.PRESETS[name] for name in ("tiny", "cpu")}, default_preset="cpu")
def make_task(num_layers: int = 3, d_model: int = 512, num_heads: int = 4, d_mlp: int = 2048,
              num_train_problems: int = 400_000, num_eval_problems: int = 1250, num_hessian_problems: int = 1250,
              batch_size: int = 64, seed: int = 0) -> Task:
    """3-digit subtraction with the addition task's model, on disjoint draws from the 500,500 pairs with a >= b (so
    400,000 training problems by default, not addition's 640,000)."""
    return arithmetic.arithmetic_task(
        num_layers=num_layers, d_model=d_model, num_heads=num_heads, d_mlp=d_mlp,
        num_train_problems=num_train_problems, num_eval_problems=num_eval_problems,
        num_hessian_problems=num_hessian_problems, batch_size=batch_size, seed=seed, operation=SUBTRACTION,
        accept=not_negative, rule=borrows, flag="borrow", qualifier=None,
        description=f"3-digit subtraction (a >= b): {num_eval_problems} evaluation problems, 4 answer tokens each.",
    )
