"""Shared pytest configuration."""

import os

# XLA's LLVM backend at -O0: the tests run small shapes, where compiling takes
# most of the time and running almost none; unoptimised code compiles in about
# 40 % less CPU time (measured on auto_selection_test.py + ranges_test.py).
# XLA's numerics do not depend on the LLVM optimisation level (no fast-math
# either way). Set the option in XLA_FLAGS yourself (e.g.
# `--xla_backend_optimization_level=3`) to test the optimised build instead;
# subprocesses started by the tests inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  ).strip()

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads them when it starts)
import pytest


@pytest.fixture
def x64():
  """Enables float64 for one test and restores the previous setting."""
  prev = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", prev)
