"""Shared pytest configuration."""

import importlib.metadata
import os
import re

import pytest

# Two XLA options for the tests, which run small shapes, where compiling takes
# most of the time and running almost none. The library code is the same; only
# how XLA's CPU backend generates machine code differs. Neither enables
# fast-math; either changes the last bit or two of some elementwise functions
# (tanh, erf, expm1 ...) against the default build, which the tests' tolerances
# allow. The default step passed with both (2026-12-01).
# - LLVM at -O0 (`--xla_backend_optimization_level=0`): XLA's own (HLO) passes
#   still run; only LLVM's code optimisation is off. About 40 % less CPU time
#   for auto_selection_test.py + ranges_test.py (76 s -> 46 s, 2026-11-30).
# - XLA CPU's classic loop emitters instead of its newer MLIR fusion emitters
#   (`--xla_cpu_use_fusion_emitters=false`), which cost more to compile:
#   another 35-45 % off compile-bound tests (ranges_test.py,
#   kernels_backward_test.py and docs_test.py at -n 0: 117 s -> 66 s of test
#   time, 90 s -> 58 s of CPU time; 2026-12-01). jaxlib >= 0.5.3 knows the flag
#   (the declared floor is 0.10.0); XLA aborts on a flag it does not know, so
#   older jaxlibs do not get it.
# To test the default build instead, set either option yourself, e.g.
# XLA_FLAGS="--xla_backend_optimization_level=3 --xla_cpu_use_fusion_emitters=true";
# an option already in XLA_FLAGS is left as it is. Subprocesses started by the
# tests inherit XLA_FLAGS.
_TEST_XLA_FLAGS = {
  "xla_backend_optimization_level": "0",
  "xla_cpu_use_fusion_emitters": "false",
}


def _jaxlib_at_least(version: tuple[int, ...]) -> bool:
  try:
    found = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return False
  parts = tuple(int(p) for p in re.findall(r"\d+", found)[: len(version)])
  return parts >= version


for _flag, _value in _TEST_XLA_FLAGS.items():
  if _flag == "xla_cpu_use_fusion_emitters" and not _jaxlib_at_least((0, 5, 3)):
    continue
  if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{_flag}={_value}").strip()

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads them when it starts)


@pytest.fixture
def x64():
  """Enables float64 for one test and restores the previous setting."""
  prev = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", prev)
