"""Shared pieces of `gsparse.bounds`: checks, padding, special functions, binomial tails."""

from __future__ import annotations

import contextvars
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from gsparse import _checks
from gsparse.bounds import _xp

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


# The package's one range check (`gsparse._checks.check_real`), under the short local name.
_check = _checks.check_real


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


# Up to this many points, values known at trace time go through NumPy (no compilation).
_NUMPY_MAX_POINTS = 256


class PointFormula:
  """One bound's formula for one point of its arguments, and its two evaluators.

  `point(*scalars, **static)` is written against `_xp` and returns a tuple of
  scalars. `flat` is `jit(vmap(point))` over 1-D arrays: traced once per
  padded length and static keyword set, whatever the values (the numeric
  arguments are traced, never static). `numpy` runs `point` eagerly with
  NumPy for each point; `eager=False` keeps a formula whose NumPy evaluation
  costs more than its compilation (Theorem 2R's bisection over `[L, K, Q]`
  grids) on the jax path.
  """

  def __init__(self, point, *, static: tuple[str, ...] = (), eager: bool = True):
    self.point = point
    self.eager = eager
    self.traces = 0  # how many times `flat` was traced (tests check it stays put)

    def flat(*args, **kwargs):
      self.traces += 1
      return jax.vmap(functools.partial(point, **kwargs))(*args)

    self.flat = jax.jit(flat, static_argnames=static)

  def numpy(self, values, dtype, *, margin_dtype, **kwargs) -> list[np.ndarray]:
    """`point` at every broadcast point of NumPy `values`, in `dtype`, with no jax call.

    The float32 safety margins of `_safety` apply when `margin_dtype` is float32.
    """
    # Rounded to `margin_dtype` first: the values a traced call in that dtype would see.
    rounded = (np.asarray(v).astype(margin_dtype).astype(dtype) for v in values)
    args = np.broadcast_arrays(*rounded)
    shape = args[0].shape
    flat = [a.reshape(-1) for a in args]
    token = _MARGIN_DTYPE.set(np.dtype(margin_dtype))
    try:
      with np.errstate(all="ignore"):
        rows = [self.point(*(f[i] for f in flat), **kwargs) for i in range(flat[0].size)]
    finally:
      _MARGIN_DTYPE.reset(token)
    return [np.asarray(list(c)).reshape(shape) for c in zip(*rows, strict=True)]


def _on_flat(formula: PointFormula, values, **kwargs) -> list[jax.Array]:
  """`formula` on `values` broadcast together; the shared path of the public bound functions.

  Values all known at trace time (Python numbers, NumPy or concrete jax
  arrays), at most `_NUMPY_MAX_POINTS` of them after broadcasting, are
  rounded to the default float dtype, evaluated with NumPy and SciPy in
  float64 (SciPy's float32 `betainc` overflows in the tails used here) with
  the safety margins of the default dtype, and cast back to it: no
  compilation, so a first call on Python floats is fast, and an eager and a
  traced call agree up to rounding.

  Otherwise (a tracer under jit/vmap/grad, or many points) the values become
  flat arrays of the default float dtype padded to a power of two
  (`_pad_flat`), one compiled `formula.flat` per padded length serves every
  shape and value, and the outputs come back in the broadcast shape.
  """
  dtype = _float_dtype()
  conc = [_checks.concrete_or_none(v) for v in values]
  if formula.eager and all(c is not None for c in conc):
    size = int(np.prod(np.broadcast_shapes(*(c.shape for c in conc))))
    if 0 < size <= _NUMPY_MAX_POINTS:
      outs = formula.numpy(conc, np.float64, margin_dtype=dtype, **kwargs)
      # Cast on the host: `jnp.asarray(o, dtype)` would compile a conversion per shape.
      return jax.device_put([o.astype(dtype) if o.dtype.kind == "f" else o for o in outs])
  args = jnp.broadcast_arrays(*(jnp.asarray(v, dtype) for v in values))
  return _unpad(formula.flat(*_pad_flat(args), **kwargs), args[0].shape)


def _valid(*conds):
  ok = conds[0]
  for c in conds[1:]:
    ok = ok & c
  return ok


# ------------------------------------------------------------------ special functions


def _log1mexp(x):
  """`log(1 - exp(x))` for `x <= 0`, accurate at both ends."""
  xp = _xp.of(x)
  x = xp.minimum(x, 0.0)
  if xp is _xp.NP:  # each branch only where it is taken (the same values)
    near = x > -math.log(2.0)
    out = np.empty_like(x)
    out[near] = np.log(-np.expm1(x[near]))
    out[~near] = np.log1p(-np.exp(x[~near]))
    return out
  return xp.where(
    x > -math.log(2.0),
    xp.log(-xp.expm1(x)),
    xp.log1p(-xp.exp(x)),
  )


def _log_phi_diff(b, a):
  """`log(Phi(b) - Phi(a))` for `a <= b` (`-inf` when `a >= b`)."""
  # Work in the lower tail, where log_ndtr is accurate. One log_ndtr call on a
  # stacked array keeps the compiled graph small.
  xp = _xp.of(a, b)
  if xp is _xp.NP:
    return _np_log_phi_diff(b, a)
  a, b = xp.broadcast_arrays(a, b)
  sym = a > 0
  both = xp.log_ndtr(xp.stack([xp.where(sym, -a, b), xp.where(sym, -b, a)]))
  hi, lo = both[0], both[1]
  out = hi + _log1mexp(lo - hi)
  return xp.where(b > a, out, -xp.inf)


def _np_log_phi_diff(b, a):
  """`_log_phi_diff` in NumPy; where `a > 0` is all true or all false, `log_ndtr` at each own shape.

  (`a [C, 1]` against `b [C, L]`: `C` evaluations for `a`, not `C L`; the same values.)
  """
  dtype = np.result_type(a, b)
  a, b = np.asarray(a, dtype), np.asarray(b, dtype)
  shape = np.broadcast_shapes(a.shape, b.shape)
  log_ndtr = _xp.NP.log_ndtr
  sym = a > 0
  if not sym.any():
    hi, lo = log_ndtr(b), log_ndtr(a)
  elif sym.all():
    hi, lo = log_ndtr(-a), log_ndtr(-b)
  else:
    a, b = np.broadcast_arrays(a, b)
    sym = a > 0
    hi, lo = log_ndtr(np.where(sym, -a, b)), log_ndtr(np.where(sym, -b, a))
  hi, lo = np.broadcast_to(hi, shape), np.broadcast_to(lo, shape)
  out = hi + _log1mexp(lo - hi)
  return np.where(b > a, out, -np.inf)


def _log_moment(a, lo, hi):
  """`log E[exp(a g) 1{lo < g <= hi}]` for `g ~ N(0, 1)`: `a^2/2 + log(Phi(hi-a) - Phi(lo-a))`."""
  return 0.5 * a * a + _log_phi_diff(hi - a, lo - a)


def _log_moments(specs):
  """`_log_moment` of several `(a, lo, hi)` triples with one special-function call.

  In NumPy each triple is evaluated on its own instead (`_np_log_moment`: no
  call of the jax version's fusion to save, and repeated values computed once).
  """
  xp = _xp.of(*(v for spec in specs for v in spec))
  if xp is _xp.NP:
    outs = [_np_log_moment(*spec) for spec in specs]
    shape = np.broadcast_shapes(*(o.shape for o in outs))
    return [np.broadcast_to(o, shape) for o in outs]
  arrs = [xp.broadcast_arrays(*(xp.asarray(v) for v in spec)) for spec in specs]
  shape = xp.broadcast_shapes(*(x[0].shape for x in arrs))
  stack = lambda i: xp.stack([xp.broadcast_to(x[i], shape) for x in arrs])
  out = _log_moment(stack(0), stack(1), stack(2))
  return [out[i] for i in range(len(specs))]


def _np_log_moment(a, lo, hi):
  """`_log_moment(a, lo, hi)` in NumPy at the triple's own broadcast shape, each value once.

  When `a` is a column (`[C, 1]`) and `lo`, `hi` rows (`[1, L]` or scalars), a
  run of equal `(lo, hi)` columns (truncation levels that clip to the same
  value, say) is evaluated once and spread back: the same elementwise values.
  """
  a, lo, hi = (np.asarray(v) for v in (a, lo, hi))
  row = lambda v: v.ndim <= 2 and (v.ndim < 2 or v.shape[0] == 1)
  if a.ndim == 2 and a.shape[1] == 1 and row(lo) and row(hi):
    width = np.broadcast_shapes(lo.shape, hi.shape, (1,))[-1]
    lo_r, hi_r = np.broadcast_to(lo, (1, width))[0], np.broadcast_to(hi, (1, width))[0]
    # A new column wherever (lo, hi) changes: the levels come in runs (clipped at 0).
    new = np.ones(width, bool)
    new[1:] = (lo_r[1:] != lo_r[:-1]) | (hi_r[1:] != hi_r[:-1])
    if not new.all():
      first = np.flatnonzero(new)
      inv = np.cumsum(new) - 1
      lo, hi = (v if v.ndim == 0 else v_r[first][None, :] for v, v_r in ((lo, lo_r), (hi, hi_r)))
      return np.broadcast_to(_log_moment(a, lo, hi), (a.shape[0], first.size))[:, inv]
  # Unbroadcast: `_np_log_phi_diff` evaluates a column or scalar operand at its own shape.
  return np.broadcast_to(_log_moment(a, lo, hi), np.broadcast_shapes(a.shape, lo.shape, hi.shape))


def _norm_isf(p):
  """`Phi_bar^{-1}(p)`."""
  return -_xp.of(p).ndtri(p)


# The dtype whose margins a NumPy evaluation uses (`PointFormula.numpy`), so that an
# eager call and a traced one in the same dtype make the same comparisons.
_MARGIN_DTYPE: contextvars.ContextVar = _xp.MARGIN_DTYPE  # defined there: memo_scalar keys it


def _safety(dtype) -> float:
  # float32 betainc was measured within a factor 0.94 of scipy's float64 value up to 1e5
  # trials (0.994 at 1e4), and above that the jax namespace uses the Chernoff bound
  # (_xp._jnp_betainc); comparing against delta / 2 absorbs the first (validated, not proven).
  margin = _MARGIN_DTYPE.get()
  return 0.5 if (dtype if margin is None else margin) == jnp.float32 else 1.0 - 1e-6


def _binom_tail(trials, m, p):
  """`P(X >= m + 1)` for `X ~ Binomial(trials, p)`, `m` integer-valued float."""
  xp = _xp.of(trials, m, p)
  a = m + 1.0
  b = xp.maximum(trials - m, 1.0)
  pc = xp.clip(p, 0.0, 1.0)
  val = xp.betainc(a, b, pc)
  val = xp.where(pc <= 0, 0.0, xp.where(pc >= 1, 1.0, val))
  return xp.where(m >= trials, 0.0, xp.where(m < 0, 1.0, val))


def binomial_upper_quantile(trials: ArrayLike, p: ArrayLike, delta: ArrayLike) -> jax.Array:
  """Smallest integer `m` with `P(Binomial(trials, p) > m) <= delta`.

  Computed exactly through the regularised incomplete beta function,
  `P(X >= m + 1) = I_p(m + 1, trials - m)`, by bisection on `m` (a
  `lax.while_loop`, so it vmaps). In float32 the comparison is made against
  `delta / 2` to absorb the error of float32 `betainc` (within a factor 0.94
  up to 1e5 trials, measured; above, a Chernoff bound replaces it); this can
  only make the quantile larger.

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
  xp = _xp.of(trials, k, delta)
  level = delta * _safety(trials.dtype)
  safe_t = xp.maximum(trials, 1.0)
  # P(X >= k) <= P(X >= 1) <= trials * p, so p = level / trials is feasible.
  lo = xp.log(level / safe_t)
  hi = xp.zeros_like(lo)

  def body(_, state):
    lo, hi = state
    mid = 0.5 * (lo + hi)
    ok = _binom_tail(trials, k - 1.0, xp.exp(mid)) <= level
    return xp.where(ok, mid, lo), xp.where(ok, hi, mid)

  lo, _ = xp.fori_loop(0, 60, body, (lo, hi))
  return xp.where(k > trials, 1.0, xp.exp(lo))


def _binom_min_p(trials, k, delta):
  """Smallest `p` (rounded up) with `P(Binomial(trials, p) <= k - 1) <= delta`.

  Needs `1 <= k <= trials`.
  """
  xp = _xp.of(trials, k, delta)
  level = delta * _safety(trials.dtype)
  lo = xp.zeros_like(trials)
  hi = xp.ones_like(trials)

  def body(_, state):
    lo, hi = state
    mid = 0.5 * (lo + hi)
    # P(X <= k - 1) = 1 - P(X >= k) = I_{1-p}(trials - k + 1, k).
    low_tail = xp.betainc(xp.maximum(trials - k + 1.0, 1.0), k, 1.0 - mid)
    ok = low_tail <= level
    return xp.where(ok, lo, mid), xp.where(ok, mid, hi)

  _, hi = xp.fori_loop(0, 60, body, (lo, hi))
  return hi
