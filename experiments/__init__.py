"""The paper's experiments, each a task for the pipeline with its configs, scripts and results.

``experiments.arithmetic`` (3-digit addition, §2.1 of the paper) and ``experiments.english`` (an English language
model, §2.3-2.4) are importable from a clone of the repository: ``polca arithmetic`` / ``polca english`` find them in
the working directory or in the clone polca_jax was installed from (:func:`polca_jax.pipeline.import_experiment`),
and a script run from the clone's root imports them as ``experiments.arithmetic``. They are not part of the installed
package; the planted task of the quick start is (``polca_jax.pipeline.tasks.planted``).
"""
