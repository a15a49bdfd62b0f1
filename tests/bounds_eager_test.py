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
from gsparse.bounds import row as row_mod
from gsparse.bounds import sparsity as sparsity_mod
from gsparse.bounds.tau import _tau_range_point

NORMS = B.InteractionNorms(3.0, 1.2, 2.0)
_W = np.random.default_rng(0).standard_normal((2, 2, 8, 2, 4)).astype(np.float32)
W_Q, W_K = _W[0], _W[1]  # [layers, d, heads, h]


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


def test_rank_layers_on_concrete_weights_compiles_nothing_after_the_first_call():
  # The first call may stage the weights on the device (once per shape); later calls with
  # new weights, n and sigma run in NumPy.
  jax.block_until_ready(B.rank_layers_by_sparsity(W_Q, W_K, n=64, eps=0.1))

  def calls():
    for i, sigma in enumerate((0.9, 1.1)):
      r = B.rank_layers_by_sparsity(W_Q * np.float32(1 + i), W_K, n=65 + i, eps=0.1, sigma=sigma)
      jax.block_until_ready(r)

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
  # The traced (float32 XLA) and eager (float64 NumPy) evaluations of the one formula agree,
  # float32 rounded upward (docs/theory.md, section 3, "Float32"): never lower up to its own
  # rounding (2e-5), at most 3e-3 higher (measured: 2.8e-5).
  for s, got in zip(sigmas, (first, second, third), strict=True):
    want = np.asarray([float(tail(float(v))) for v in s])
    got = np.asarray(got, np.float64)
    assert np.all(got >= want * (1.0 - 2e-5)) and np.all(got <= want * (1.0 + 3e-3)), (got, want)


def test_grad_through_the_traced_path():
  grad = jax.grad(lambda v: B.topk_error_bound(256, 1.0, NORMS, k=8, value_norm=v).error)(2.0)
  tail = float(B.topk_error_bound(256, 1.0, NORMS, k=8, value_norm=2.0).tail_mass)
  np.testing.assert_allclose(float(grad), 2.0 * tail, rtol=2e-5)  # error = 2 t value_norm


def _linear_scan(fail, n, level):
  """The first m in 1..n-1 with fail(m) <= level, else n: the scan as first written."""
  m = 1.0
  while m < n and np.max(fail(np.float64(m))) > level:
    m += 1.0
  return m


def test_the_m_scan_finds_the_first_admissible_m_of_a_linear_scan():
  # The scan skips m on one witness cell and checks every cell only at candidates; whatever the
  # first witness, it must return the m of the plain scan (the bound need not be monotone in m).
  f64 = np.float64
  with np.errstate(all="ignore"):
    for n, sigma, eps in ((1024, 1.0, 0.01), (64, 1.5, 0.05), (256, 0.7, 0.02)):
      n, sigma, eps, delta = f64(n), f64(sigma), f64(eps), f64(1e-4)
      tlo, thi = _tau_range_point(n, sigma, f64(3.0), f64(1.2), f64(2.0), delta / 2)
      log_row = np.log(delta / 2) - np.log(n)
      parts = sparsity_mod._row_parts(n, tlo, thi, log_row)
      cell_fail, _ = sparsity_mod._fail_fn(n, parts, eps, log_row)
      want = _linear_scan(cell_fail, n, np.exp(log_row))
      assert 1 < want < n, want  # a scan that moves, not a trivial answer
      for witness in (0, 31, 63):
        got = sparsity_mod._first_admissible_m(n, cell_fail, np.exp(log_row), witness)
        assert got == want, (n, witness, got, want)
    n, tau, eps, delta = f64(512), f64(2.5), f64(0.02), f64(1e-4)
    fail = row_mod._row_fail_fn(n, tau, eps, np.log(delta))
    want = _linear_scan(fail, n, delta)
    assert 1 < want < n and row_mod._row_scalar(n, tau, eps, delta)[0] == want
