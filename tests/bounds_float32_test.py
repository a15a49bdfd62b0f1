"""Traced float32 evaluation of the bounds: never below the float64 value (docs/theory.md, section 3).

Each test here fails on the code before its fix (checked with `git stash`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gsparse.bounds import _xp, row, row_tail, sparsity


def test_lemma4_reads_a_tail_below_0_or_nan_as_1(monkeypatch):
  # jax's float32 betainc returned values down to -inf at n = 1e8 (review of the float32
  # path); `0.5 drow + (-inf) <= drow` would admit any m.
  drow = jnp.float32(0.01)
  m = jnp.asarray([5.0, 200.0], jnp.float32)
  p = jnp.asarray([1e-7, 1e-6, 3e-6], jnp.float32)
  fail = jax.jit(sparsity._union_fail)
  for bad in (-jnp.inf, -7.5e8, jnp.nan):
    monkeypatch.setattr(sparsity, "_binom_tail", lambda t, mm, pp, b=bad: jnp.full((2, 3), b))
    got = np.asarray(fail(jnp.float32(1e8), m, p, drow))
    assert (got >= 1.0).all(), (bad, got)  # 0.5 drow + 1


def test_theorem_2r_reads_a_g_cell_weight_below_0_or_nan_as_1(monkeypatch):
  c = row._g_grid(jnp.float32(1e8 - 1.0), 16, jnp.float32)
  weights = jax.jit(row_tail._tail_weights)
  for bad in (-jnp.inf, -0.5, jnp.nan):
    monkeypatch.setattr(_xp.JNP, "betainc", lambda a, b, x, v=bad: jnp.full(jnp.shape(x), v))
    f, t_top = weights(jnp.float32(1e8 - 1.0), jnp.float32(200.0), c)
    np.testing.assert_array_equal(np.asarray(f), 1.0)
    assert float(t_top) == 1.0
