"""Shared pytest configuration."""

import os

# XLA's LLVM backend at -O0: the tests run small shapes, where compiling takes
# most of the time and running almost none. XLA's own (HLO) passes still run;
# only LLVM's code optimisation is off, so the same programs compile in about
# 40 % less CPU time (auto_selection_test.py + ranges_test.py: 76 s -> 46 s),
# and the heaviest slow tests run faster too (three of them: 28 s -> 22 s).
# Floating-point semantics do not change (no fast-math at either level); the
# default step passed at both levels (2026-11-30).
# To test the optimised build, set the option yourself, e.g.
# XLA_FLAGS=--xla_backend_optimization_level=3; subprocesses started by the
# tests inherit XLA_FLAGS.
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
