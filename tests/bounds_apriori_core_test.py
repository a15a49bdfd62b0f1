"""The per-row core of the a-priori Theorems 1 and 2 (docs/theory.md, Lemma 6 and Lemma M).

Lemma 6 must hold uniformly over a tau cell [a, b], and Theorem 2R at tau_lo must
bound every row with a larger tau (Lemma M). Both are checked at a per-row level
delta = 0.3, where a wrong constant shows up within a few thousand rows: for a
valid bound the number of rows above it is stochastically below
Binomial(rows, 0.3), and each check fails beyond that law's 1 - 1e-6 quantile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from gsparse.bounds._gcells import _first_admissible_m
from gsparse.bounds.row import _chernoff_fail, _chernoff_parts, _g_grid
from gsparse.bounds.row_tail import _row_tail_scalar

_N, _EPS, _DELTA, _ROWS = 128, 0.02, 0.3, 3000
_LIMIT = scipy.stats.binom.isf(1e-6, _ROWS, _DELTA)


def _rows(key, tau):
  return tau * jax.random.normal(key, (_ROWS, _N - 1))


def test_lemma_6_holds_at_both_ends_of_a_tau_cell():
  # 3 cells x 3 values of tau: false-failure rate <= 9e-6.
  f64 = np.float64
  key = jax.random.key(61)
  nm1 = f64(_N - 1)
  c = _g_grid(nm1, 64, np.float64)
  ks = []
  with np.errstate(all="ignore"):
    for ci, (a, b) in enumerate(((0.5, 1.0), (2.0, 3.0), (6.0, 8.0))):
      parts = _chernoff_parts(f64(_EPS), np.array([a]), np.array([b]), c)

      def fail(m, cells=None, parts=parts):
        return _chernoff_fail(nm1, m, f64(_EPS), c, parts, cells)

      k = float(_first_admissible_m(f64(_N), fail, f64(_DELTA), 0))
      ks.append(k)
      for ti, tau in enumerate((a, 0.5 * (a + b), b)):
        p = jax.nn.softmax(_rows(jax.random.fold_in(key, 3 * ci + ti), tau), axis=-1)
        count = np.asarray(jnp.sum(p > _EPS, axis=-1)) + 1  # the diagonal as one entry
        assert np.sum(count > k) <= _LIMIT, (a, b, tau, k, np.sum(count > k))
  assert all(k < 49 for k in ks), ks  # informative: below the trivial ceil(1/eps) - 1 = 49


def test_theorem_2r_at_tau_lo_bounds_rows_with_larger_tau():
  # Lemma M: 3 values of tau >= tau_lo per k, 2 k: false-failure rate <= 6e-6.
  key = jax.random.key(62)
  tau_lo = 1.5
  for ki, k in enumerate((4, 16)):
    with np.errstate(all="ignore"):  # Theorem 2R through NumPy: no compilation
      (t,) = _row_tail_scalar(*(np.float64(v) for v in (_N, tau_lo, k, _DELTA)))
    t = float(t)
    assert t < 1 - k / _N, (k, t)  # not vacuous
    for ti, tau in enumerate((tau_lo, 2 * tau_lo, 4 * tau_lo)):
      s = _rows(jax.random.fold_in(key, 10 * ki + ti), tau)
      head = jax.nn.logsumexp(jax.lax.top_k(s, k)[0], axis=-1)
      tail = np.asarray(1.0 - jnp.exp(head - jax.nn.logsumexp(s, axis=-1)))
      assert np.sum(tail > t) <= _LIMIT, (k, tau, t, np.sum(tail > t))
