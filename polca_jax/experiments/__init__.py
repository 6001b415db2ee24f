"""Experiments of the paper, built only from the public kernels."""
