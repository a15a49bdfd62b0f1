"""The range of the row scales `tau_i = sigma ||M^T x_i||` (docs/theory.md, Lemma 2)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gsparse.bounds._common import (
  _FIRST_CELL_FRACTION,
  _NUM_CELLS,
  DEFAULT_DELTA,
  _check,
  _check_delta,
  _check_n,
  _float_dtype,
)
from gsparse.bounds.norms import InteractionNorms, _norm_fields


class TauRange(NamedTuple):
  """An interval `[lo, hi]` that holds every `tau_i` with probability `>= 1 - delta`."""

  lo: jax.Array
  hi: jax.Array


def _solve_w_minus_log_w(c, upper):
  """Root `w` of `w - log w = c` (`c >= 1`) with `w <= 1` (`upper=False`) or `w >= 1`."""
  c = jnp.maximum(c, 1.0)
  lo = jnp.where(upper, jnp.zeros_like(c), -c - 1.0)
  hi = jnp.where(upper, c + 1.0, jnp.zeros_like(c))

  def body(_, state):
    lo, hi = state
    mid = 0.5 * (lo + hi)
    f = jnp.exp(mid) - mid - c  # decreasing on v < 0, increasing on v > 0
    go_right = jnp.where(upper, f < 0, f > 0)
    return jnp.where(go_right, mid, lo), jnp.where(go_right, hi, mid)

  lo, hi = jax.lax.fori_loop(0, 64, body, (lo, hi))
  # Round outwards: the lower root down, the upper root up.
  return jnp.exp(jnp.where(upper, hi, lo))


def _quad_form_range(sigma2, frob, op, gram, x):
  """Interval for `sigma2 * g^T A g`, `A = M M^T`, each side failing w.p. `<= e^{-x}`.

  The better (deterministically chosen) of Laurent-Massart (needs `||M||_F`,
  `||M M^T||_F`, `||M||_op`) and the effective-rank Chernoff bound
  (`r = ||M||_F^2 / ||M||_op^2`, docs/theory.md Lemma 2).
  """
  mean = frob * frob
  op2 = op * op
  up_lm = mean + 2.0 * gram * jnp.sqrt(x) + 2.0 * op2 * x
  lo_lm = jnp.maximum(mean - 2.0 * gram * jnp.sqrt(x), 0.0)
  r = mean / jnp.where(op2 > 0, op2, 1.0)
  c = 1.0 + 2.0 * x / jnp.where(r > 0, r, 1.0)
  up_ch = mean * _solve_w_minus_log_w(c, True)
  lo_ch = mean * _solve_w_minus_log_w(c, False)
  up = jnp.where(op2 > 0, jnp.minimum(up_lm, up_ch), 0.0)
  lo = jnp.where(op2 > 0, jnp.maximum(lo_lm, lo_ch), 0.0)
  return sigma2 * lo, sigma2 * up


def tau_range(
  n: ArrayLike, sigma: ArrayLike, norms: InteractionNorms, *, delta: ArrayLike = DEFAULT_DELTA
) -> TauRange:
  """Interval holding all `n` row scales `tau_i = sigma ||M^T x_i||` with prob `>= 1 - delta`.

  `tau_i^2 = sigma^4 g^T M M^T g` with `g ~ N(0, I_d)`; the Laurent-Massart
  inequality with `x = log(2 n / delta)` on each side and a union bound over
  the rows (docs/theory.md, Lemma 2).

  Args:
    n: number of rows (>= 1).
    sigma: input standard deviation (> 0).
    norms: `InteractionNorms` of `M`.
    delta: total failure probability in (0, 1).

  Returns:
    `TauRange(lo, hi)`.
  """
  _check_n(n)
  _check("sigma", sigma, lo=0, lo_open=True)
  _check_delta(delta)
  frob, op, gram = _norm_fields(norms)
  dtype = _float_dtype()
  n, sigma, delta, frob, op, gram = (
    jnp.asarray(v, dtype) for v in (n, sigma, delta, frob, op, gram)
  )
  return TauRange(*_tau_range_jit(n, sigma, frob, op, gram, delta))


def _cells(tau_lo, tau_hi):
  """`[C]` cell endpoints covering `[tau_lo, tau_hi]`: one small first cell, then geometric."""
  start = jnp.maximum(tau_lo, _FIRST_CELL_FRACTION * tau_hi)
  start = jnp.maximum(start, jnp.finfo(tau_hi.dtype).tiny)
  hi_safe = jnp.maximum(tau_hi, start)
  u = jnp.linspace(0.0, 1.0, _NUM_CELLS, dtype=tau_hi.dtype)
  geo = start * jnp.exp(u * (jnp.log(hi_safe) - jnp.log(start)))  # [C]
  a = jnp.concatenate([tau_lo[..., None], geo[..., :-1]], axis=-1)
  b = jnp.concatenate([start[..., None], geo[..., 1:]], axis=-1)
  b = jnp.maximum(a, b)
  return a, b


@jax.jit
def _tau_range_jit(n, sigma, frob, op, gram, delta):
  lo2, hi2 = _quad_form_range(sigma**4, frob, op, gram, jnp.log(2.0 * n / delta))
  return jnp.sqrt(lo2), jnp.sqrt(hi2)


def _tau_range_scalar(n, sigma, frob, op, gram, delta_tau):
  lo2, hi2 = _quad_form_range(sigma**4, frob, op, gram, jnp.log(2.0 * n / delta_tau))
  return jnp.sqrt(lo2), jnp.sqrt(hi2)
