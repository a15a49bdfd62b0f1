"""The two array namespaces that every bound formula is written against.

Each formula in `gsparse.bounds` is written once, for one point of its
arguments, against a namespace `xp` that has NumPy's array functions plus
the special functions and loops the formulas use. `JNP` runs it through
jax (so the public functions jit, vmap and differentiate); `NP` runs it
eagerly through NumPy and SciPy, with no compilation, which is what a call
on Python numbers wants (`_common._on_flat` chooses). `of(*args)` picks the
namespace from the arguments: jax as soon as one of them is a jax array or
tracer.

Two NumPy-only savings keep a call on Python numbers fast without changing a
single bit of its result: `betainc_rows` keeps each row of binomial tails it
computed (those rows depend on `n`, `m` and a fixed grid, not on the data),
and `memo_scalar` remembers a function of a few NumPy scalars (a root found by
bisection, say). Both compute exactly what the plain call computes, once.
The searches of Theorem 1 and its inverse also evaluate only the cells, bounds
and per-cell parts that their comparisons need (`_npsearch`).
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special as sps
from jax.scipy import special as jsp

from gsparse.bounds import _memo


class _Namespace:
  """A module's functions plus a few extras under the same names for both backends."""

  def __init__(self, module, **extras):
    self._module = module
    self.__dict__.update(extras)

  def __getattr__(self, name: str) -> Any:
    value = getattr(self._module, name)
    self.__dict__[name] = value  # found directly from now on (the formulas look names up often)
    return value


def _np_while_loop(cond, body, init):
  state = init
  while cond(state):
    state = body(state)
  return state


def _np_fori_loop(lo, hi, body, init):
  state = init
  for i in range(lo, hi):
    state = body(i, state)
  return state


def _np_cummax(x, axis, reverse=False):
  if reverse:
    return np.flip(np.maximum.accumulate(np.flip(x, axis), axis=axis), axis)
  return np.maximum.accumulate(x, axis=axis)


def _np_logsumexp(a, axis):
  """`log sum exp` over `axis`, shifted by the maximum, as `jax.nn.logsumexp` computes it.

  SciPy's version also separates the maximal terms (for a last bit of
  precision) at about three times the cost.
  """
  top = np.max(a, axis=axis, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)
  shifted = np.subtract(a, top)
  np.exp(shifted, out=shifted)  # in place: one large temporary, not two (same values)
  return np.squeeze(top, axis) + np.log(np.sum(shifted, axis=axis))


# Rows of `_np_betainc_rows` kept, per grid `x` and `(a, b)`: up to about 4096 rows of 65 levels.
_ROWS = _memo.Memo(8 << 20)


def _np_betainc_rows(a, b, x):
  """`betainc(a[..., None], b[..., None], x)` for a 1-D `x`, each `(a, b, x)` row computed once.

  A row's entries are the same ufunc evaluations as in the broadcast call, so
  the values are identical; a row met again (the same `m` at the same `n`, in
  this call or a later one) is read back instead of recomputed.
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 1:  # a grid per row (Lemma 6's 1/tau grids): nothing to share
    return sps.betainc(
      np.asarray(a, np.float64)[..., None], np.asarray(b, np.float64)[..., None], x
    )
  a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
  grid = x.tobytes()
  keys = [(grid, *ab) for ab in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist(), strict=True)]
  rows = dict(zip(keys, _ROWS.get_many(keys), strict=True))  # each read once (LRU, threads)
  missing = [k for k, row in rows.items() if row is None]
  if missing:
    ma, mb = np.asarray([k[1:] for k in missing]).T
    for k, row in zip(missing, sps.betainc(ma[:, None], mb[:, None], x), strict=True):
      rows[k] = _ROWS.put(k, row.copy())  # a copy: a view would keep the whole block alive
  out = np.stack([rows[k] for k in keys]) if keys else np.zeros((0, x.size))
  return out.reshape(a.shape + x.shape)


# Trials `a + b - 1` above which float32 `I_x(a, b)` is replaced by its Chernoff bound. jax's
# float32 `betainc` takes `lgamma(b) - lgamma(a + b)` in float32, an error of about `u n ln n`
# in the log of the tail: against float64, the worst tail ratio seen (same float32 `x`, `a` up
# to 3000) was 0.994 at n = 1e4, 0.94 at 1e5 (inside the x2 margin `_common._safety`), 0.51
# at 4e5 and 0 from 1e7 on (review of the float32 path, 2026-12-01).
_F32_BETAINC_MAX_TRIALS = 1e5


def _jnp_betainc(a, b, x):
  """`I_x(a, b)`; in float32 above `_F32_BETAINC_MAX_TRIALS` trials an upper bound on it.

  Every use in the bounds needs an upper bound on a binomial tail, `I_x(a, b) = P(Bin(a + b
  - 1, x) >= a)` for integers `a, b >= 1`; above the threshold that is the Chernoff bound
  `exp(-N KL(a / N || x))` (`N = a + b - 1`; 1 where `a / N <= x`), written in logarithms
  of the counts and `log1p` so that its float32 error in the exponent is a few `u` times
  `min(a, b) |log| + a |log x| + b |log1p(-x)|`: far inside the x2 margin (`log 2`)
  wherever the bound is not negligibly small.
  """
  val = jsp.betainc(a, b, x)
  if jnp.finfo(val.dtype).bits > 32:
    return val
  a, b, x = (jnp.asarray(v, val.dtype) for v in (a, b, x))
  bm1 = b - 1.0
  n = a + bm1
  # The exponent `a log(q / x) + (b - 1) log((1 - q) / (1 - x))`, q = a / N, written on the
  # side of the smaller count `s` (`r = s / N <= 1/2`, against `xs`, x or 1 - x) and the
  # other `o`: `s log(r / xs) + o log((1 - r) / xo)`. It is stationary in r at s / N, so
  # the rounding of r and N costs only its square. Near the mean (both ratios in [1/2, 2])
  # it takes `log1p(+-d / .)` of the one difference `d = r - xs` (exact there, Sterbenz);
  # elsewhere differences of logarithms (`log1p` for the complements).
  small = a <= bm1
  s, o = jnp.where(small, a, bm1), jnp.where(small, bm1, a)
  r = s / n
  log_x, log_1x = jnp.log(x), jnp.log1p(-x)
  xs, xo = jnp.where(small, x, 1.0 - x), jnp.where(small, 1.0 - x, x)
  log_xs, log_xo = jnp.where(small, log_x, log_1x), jnp.where(small, log_1x, log_x)
  d = r - xs
  near = (r >= 0.5 * xs) & (r <= 2.0 * xs) & (1.0 - r >= 0.5 * xo) & (1.0 - r <= 2.0 * xo)
  log_s = jnp.where(near, jnp.log1p(d / xs), jnp.log(r) - log_xs)
  log_o = jnp.where(near, jnp.log1p(-d / xo), jnp.log1p(-r) - log_xo)
  expo = s * log_s + jnp.where(o > 0.0, o * log_o, 0.0)  # 0 log 0 = 0 at b = 1
  chernoff = jnp.where(a > n * x, jnp.exp(-expo), 1.0)
  return jnp.where(n > _F32_BETAINC_MAX_TRIALS, chernoff, val)


def _jnp_betainc_rows(a, b, x):
  return _jnp_betainc(jnp.asarray(a)[..., None], jnp.asarray(b)[..., None], x)


# The dtype whose safety margins a NumPy evaluation uses (`_common.PointFormula.numpy` sets
# it, `_common._safety` reads it); here so that `memo_scalar` can key it without a cycle.
MARGIN_DTYPE: contextvars.ContextVar = contextvars.ContextVar("margin_dtype", default=None)


def memo_scalar(fn):
  """`fn` of NumPy scalars and Python bools, remembered per argument bits; jax calls pass through.

  For pure functions of a few scalars that cost more than a lookup (a
  bisection in Python). The key is each argument's dtype and bytes (`_memo.key`),
  so `-0.0` and `0.0` (or two NaNs) are never confused, plus the float32 or
  float64 safety margins the evaluation runs under (`MARGIN_DTYPE`,
  which the result depends on: a float32 call's root was served to a float64
  call before, found in review).
  """
  store = _memo.Memo(1 << 20)

  @functools.wraps(fn)
  def wrapped(*args):
    if of(*args) is not NP or any(np.ndim(a) for a in args):
      return fn(*args)
    k = (str(MARGIN_DTYPE.get()), *_memo.key(*args))
    return store.lookup(k, lambda: fn(*args))

  wrapped.store = store
  return wrapped


def _jnp_cummax(x, axis, reverse=False):
  return jax.lax.cummax(x, axis=axis % x.ndim, reverse=reverse)


NP = _Namespace(
  np,
  betainc=sps.betainc,
  log_ndtr=sps.log_ndtr,
  ndtr=sps.ndtr,
  ndtri=sps.ndtri,
  logsumexp=_np_logsumexp,
  betainc_rows=_np_betainc_rows,
  sigmoid=sps.expit,
  while_loop=_np_while_loop,
  fori_loop=_np_fori_loop,
  cummax=_np_cummax,
)

JNP = _Namespace(
  jnp,
  betainc=_jnp_betainc,
  log_ndtr=jsp.log_ndtr,
  ndtr=jsp.ndtr,
  ndtri=jsp.ndtri,
  logsumexp=jax.nn.logsumexp,
  betainc_rows=_jnp_betainc_rows,
  sigmoid=jax.nn.sigmoid,
  while_loop=jax.lax.while_loop,
  fori_loop=jax.lax.fori_loop,
  cummax=_jnp_cummax,
)


def of(*args) -> _Namespace:
  """`JNP` if any argument is a jax array (a tracer included), else `NP`."""
  return JNP if any(isinstance(a, jax.Array) for a in args) else NP
