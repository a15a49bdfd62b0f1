"""The bound functions compile once per structure, and not at all on Python numbers.

Checks the structure (what compiles and what is traced), never wall time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.dispatch import BACKEND_COMPILE_EVENT

import gsparse.bounds as B
from gsparse.bounds import error as error_mod

NORMS = B.InteractionNorms(3.0, 1.2, 2.0)


def _compiles(fn) -> int:
  """Number of XLA compilations while `fn()` runs."""
  events = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == BACKEND_COMPILE_EVENT:
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    fn()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return len(events)


def test_python_number_calls_compile_nothing():
  # New values each call (a slider in a notebook): none of them may compile.
  def calls():
    for i, sigma in enumerate((0.9, 1.1)):  # 2 x 6 calls
      jax.block_until_ready(B.tau_range(512 + i, sigma, NORMS))
      jax.block_until_ready(B.sparsity_bound(64 + i, sigma, NORMS, eps=0.05 + 0.01 * i))
      jax.block_until_ready(B.sparsity_eps_bound(64, sigma, NORMS, k=4 + i))
      jax.block_until_ready(B.topk_error_bound(64, sigma, NORMS, k=4 + i, value_norm=1.0))
      jax.block_until_ready(B.value_norm_bound(64, sigma, NORMS, delta=1e-3))
      jax.block_until_ready(B.row_sparsity_bound(16, 2.0 * sigma, eps=0.1, delta=1e-3))

  jnp.zeros(()).block_until_ready()  # the device itself
  assert _compiles(calls) == 0


def test_eager_results_are_default_dtype_arrays():
  sb = B.sparsity_bound(64, 1.0, NORMS, eps=0.05)
  assert isinstance(sb.k, jax.Array) and sb.k.dtype == jnp.result_type(float)
  assert sb.informative.dtype == jnp.bool_
  assert B.tau_range(64, np.array([1.0, 2.0]), NORMS).lo.shape == (2,)


def test_traced_calls_trace_once_per_structure_and_match_eager():
  def tail(s):
    return B.topk_error_bound(256, s, NORMS, k=8, value_norm=1.0).tail_mass

  sigmas = [jnp.array([0.8, 1.0]), jnp.array([1.3, 0.7]), jnp.array([0.9, 1.2])]
  first = jax.jit(jax.vmap(tail))(sigmas[0])
  traces = error_mod._ERROR.traces
  # New values, and a new outer function of the same structure: no new trace of the formula.
  second = jax.jit(jax.vmap(tail))(sigmas[1])
  third = jax.vmap(tail)(sigmas[2])
  assert error_mod._ERROR.traces == traces
  # The traced (float32 XLA) and eager (float64 NumPy) evaluations of the one formula agree.
  for s, got in zip(sigmas, (first, second, third), strict=True):
    want = [float(tail(float(v))) for v in s]
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5)


def test_grad_through_the_traced_path():
  grad = jax.grad(lambda v: B.topk_error_bound(256, 1.0, NORMS, k=8, value_norm=v).error)(2.0)
  tail = float(B.topk_error_bound(256, 1.0, NORMS, k=8, value_norm=2.0).tail_mass)
  np.testing.assert_allclose(float(grad), 2.0 * tail, rtol=2e-5)  # error = 2 t value_norm
