"""Shared pieces of `gsparse.bounds`: checks, padding, special functions, binomial tails."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import betainc, log_ndtr, ndtri
from jax.typing import ArrayLike

from gsparse import _checks

DEFAULT_DELTA = 1e-4

# Number of cells of the tau interval and of truncation levels of the
# denominator bound. Fixed (static) so that everything vmaps.
_NUM_CELLS = 64
_NUM_LEVELS = 64
_NUM_GRID = 128
_EPS_BISECTION_STEPS = 14
# Below this fraction of tau_hi the tau interval is covered by one cell [tau_lo, f tau_hi].
_FIRST_CELL_FRACTION = 1e-3


# --------------------------------------------------------------------------- checks


def _float_dtype():
  """float64 when x64 is enabled, else float32."""
  return jnp.result_type(float)


def _check(
  name: str,
  value: Any,
  *,
  lo: float | None = None,
  hi: float | None = None,
  lo_open: bool = False,
  hi_open: bool = False,
  integer: bool = False,
) -> None:
  """Range-checks `value` when it is known at trace time; raises ValueError naming it."""
  if value is None:
    raise TypeError(f"{name} must be a real number or array, got None")
  if isinstance(value, (bool, np.bool_, str)):
    raise TypeError(f"{name} must be a real number or array, got {value!r}")
  conc = _checks.concrete_or_none(value)
  if conc is None:
    return
  if conc.dtype.kind not in "biuf":
    raise TypeError(f"{name} must be real, got dtype {conc.dtype}")
  conc = conc.astype(np.float64)
  if np.any(~np.isfinite(conc)):
    raise ValueError(f"{name}={value!r} must be finite")
  bad = np.zeros(conc.shape, bool)
  if lo is not None:
    bad |= (conc <= lo) if lo_open else (conc < lo)
  if hi is not None:
    bad |= (conc >= hi) if hi_open else (conc > hi)
  if integer:
    bad |= conc != np.round(conc)
  if np.any(bad):
    lb = "(" if lo_open else "["
    rb = ")" if hi_open else "]"
    rng = f"{lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}"
    kind = "an integer in " if integer else "in "
    raise ValueError(f"{name}={value!r} must be {kind}{rng}")


def _check_n(n):
  _check("n", n, lo=1, integer=True)


def _check_eps(eps):
  _check("eps", eps, lo=0, hi=1, lo_open=True, hi_open=True)


def _check_delta(delta):
  _check("delta", delta, lo=0, hi=1, lo_open=True, hi_open=True)


def _pad_flat(args):
  """Flattens broadcast arguments and pads them (with the first entry) to a power of two.

  Keeps the number of distinct compiled shapes small.
  """
  size = int(np.prod(args[0].shape))
  padded = 0 if size == 0 else 1 << (size - 1).bit_length()
  out = []
  for a in args:
    f = a.reshape(-1)
    if padded > size:
      f = jnp.concatenate([f, jnp.broadcast_to(f[:1], (padded - size,))])
    out.append(f)
  return out


def _unpad(outs, shape):
  size = int(np.prod(shape))
  return [o[:size].reshape(shape) for o in outs]


def _on_flat(flat_fn, values, **kwargs) -> list[jax.Array]:
  """`flat_fn` on `values` broadcast together, flattened and padded (`_pad_flat`).

  The shared path of the public bound functions: the values become arrays of
  the default float dtype, one compiled `flat_fn` per padded length serves
  every shape, and the outputs come back in the broadcast shape.
  """
  dtype = _float_dtype()
  args = jnp.broadcast_arrays(*(jnp.asarray(v, dtype) for v in values))
  return _unpad(flat_fn(*_pad_flat(args), **kwargs), args[0].shape)


def _valid(*conds) -> jax.Array:
  ok = jnp.asarray(True)
  for c in conds:
    ok = ok & c
  return ok


# ------------------------------------------------------------------ special functions


def _log1mexp(x):
  """`log(1 - exp(x))` for `x <= 0`, accurate at both ends."""
  x = jnp.minimum(x, 0.0)
  return jnp.where(
    x > -math.log(2.0),
    jnp.log(-jnp.expm1(x)),
    jnp.log1p(-jnp.exp(x)),
  )


def _log_phi_diff(b, a):
  """`log(Phi(b) - Phi(a))` for `a <= b` (`-inf` when `a >= b`)."""
  # Work in the lower tail, where log_ndtr is accurate. One log_ndtr call on a
  # stacked array keeps the compiled graph small.
  a, b = jnp.broadcast_arrays(a, b)
  sym = a > 0
  both = log_ndtr(jnp.stack([jnp.where(sym, -a, b), jnp.where(sym, -b, a)]))
  hi, lo = both[0], both[1]
  out = hi + _log1mexp(lo - hi)
  return jnp.where(b > a, out, -jnp.inf)


def _log_moment(a, lo, hi):
  """`log E[exp(a g) 1{lo < g <= hi}]` for `g ~ N(0, 1)`: `a^2/2 + log(Phi(hi-a) - Phi(lo-a))`."""
  return 0.5 * a * a + _log_phi_diff(hi - a, lo - a)


def _log_moments(specs):
  """`_log_moment` of several `(a, lo, hi)` triples with one special-function call."""
  arrs = [jnp.broadcast_arrays(*(jnp.asarray(v) for v in spec)) for spec in specs]
  shape = jnp.broadcast_shapes(*(x[0].shape for x in arrs))
  stack = lambda i: jnp.stack([jnp.broadcast_to(x[i], shape) for x in arrs])
  out = _log_moment(stack(0), stack(1), stack(2))
  return [out[i] for i in range(len(specs))]


def _norm_isf(p):
  """`Phi_bar^{-1}(p)`."""
  return -ndtri(p)


def _safety(dtype) -> float:
  # float32 betainc agrees with scipy to about 1% relative in the tails we use
  # (tests/bounds_test.py); comparing against delta / 2 absorbs that.
  return 0.5 if dtype == jnp.float32 else 1.0 - 1e-6


def _binom_tail(trials, m, p):
  """`P(X >= m + 1)` for `X ~ Binomial(trials, p)`, `m` integer-valued float."""
  a = m + 1.0
  b = jnp.maximum(trials - m, 1.0)
  pc = jnp.clip(p, 0.0, 1.0)
  val = betainc(a, b, pc)
  val = jnp.where(pc <= 0, 0.0, jnp.where(pc >= 1, 1.0, val))
  return jnp.where(m >= trials, 0.0, jnp.where(m < 0, 1.0, val))


def binomial_upper_quantile(trials: ArrayLike, p: ArrayLike, delta: ArrayLike) -> jax.Array:
  """Smallest integer `m` with `P(Binomial(trials, p) > m) <= delta`.

  Computed exactly through the regularised incomplete beta function,
  `P(X >= m + 1) = I_p(m + 1, trials - m)`, by bisection on `m` (a
  `lax.while_loop`, so it vmaps). In float32 the comparison is made against
  `delta / 2` to absorb the ~1% relative error of float32 `betainc` in far
  tails; this can only make the quantile larger (never invalid).

  Args:
    trials: number of trials, a nonnegative integer-valued number or array
      (exact in float32 up to 2^24).
    p: success probability in `[0, 1]`.
    delta: tail level in `(0, 1)`.

  Returns:
    The quantile, integer-valued, in the default float dtype, broadcast over
    the arguments.
  """
  _check("trials", trials, lo=0, integer=True)
  _check("p", p, lo=0, hi=1)
  _check_delta(delta)
  dtype = _float_dtype()
  trials, p, delta = (jnp.asarray(x, dtype) for x in (trials, p, delta))
  trials, p, delta = jnp.broadcast_arrays(trials, p, delta)
  return _binom_upper_quantile(trials, p, delta)


def _binom_upper_quantile(trials, p, delta):
  level = delta * _safety(trials.dtype)
  lo = jnp.full(trials.shape, -1.0, trials.dtype)  # P(X > -1) = 1 > delta
  hi = trials  # P(X > trials) = 0 <= delta

  def cond(state):
    lo, hi = state
    return jnp.any(hi - lo > 1.0)

  def body(state):
    lo, hi = state
    mid = jnp.floor(0.5 * (lo + hi))
    ok = _binom_tail(trials, mid, p) <= level
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  _, hi = jax.lax.while_loop(cond, body, (lo, hi))
  bad = jnp.isnan(trials) | jnp.isnan(p) | jnp.isnan(delta)
  return jnp.where(bad, jnp.nan, hi)


def _binom_max_p(trials, k, delta):
  """Largest `p` (up to bisection resolution, rounded down) with `P(Bin(trials, p) >= k) <= delta`.

  `k >= 1`. Returns 1 when `k > trials`.
  """
  level = delta * _safety(trials.dtype)
  safe_t = jnp.maximum(trials, 1.0)
  # P(X >= k) <= P(X >= 1) <= trials * p, so p = level / trials is feasible.
  lo = jnp.log(level / safe_t)
  hi = jnp.zeros_like(lo)

  def body(_, state):
    lo, hi = state
    mid = 0.5 * (lo + hi)
    ok = _binom_tail(trials, k - 1.0, jnp.exp(mid)) <= level
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 60, body, (lo, hi))
  return jnp.where(k > trials, 1.0, jnp.exp(lo))


def _binom_min_p(trials, k, delta):
  """Smallest `p` (rounded up) with `P(Binomial(trials, p) <= k - 1) <= delta`.

  Needs `1 <= k <= trials`.
  """
  level = delta * _safety(trials.dtype)
  lo = jnp.zeros_like(trials)
  hi = jnp.ones_like(trials)

  def body(_, state):
    lo, hi = state
    mid = 0.5 * (lo + hi)
    # P(X <= k - 1) = 1 - P(X >= k) = I_{1-p}(trials - k + 1, k).
    low_tail = betainc(jnp.maximum(trials - k + 1.0, 1.0), k, 1.0 - mid)
    ok = low_tail <= level
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  _, hi = jax.lax.fori_loop(0, 60, body, (lo, hi))
  return hi
