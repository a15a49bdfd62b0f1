"""Rigorous sparsity and top-k error bounds for attention on Gaussian input.

Setting (docs/theory.md, section 2): rows `x_i ~ N(0, sigma^2 I_d)` i.i.d.,
scores `s_ij = x_i^T M x_j` with `M = scale * W_Q W_K^T`, `p_i = softmax(s_i)`
over all `n` keys (the diagonal included). Given `x_i`, the `n - 1`
off-diagonal scores are i.i.d. `N(0, tau_i^2)` with `tau_i = sigma ||M^T x_i||`.

Everything here is a pure function of scalars (and of weight norms), built from
`jnp` only, so it runs under `jax.jit` and `jax.vmap` over every argument, `n`
included (all arithmetic is in floating point). It works in float32 and uses
float64 when `jax_enable_x64` is on; delicate quantities are kept in log space.

Public pieces (each proven in docs/theory.md):

* `interaction_norms`, `interaction_norms_from_weights`: the three norms of a
  matrix that the bounds need.
* `tau_range`: an interval holding every `tau_i` with high probability.
* `sparsity_bound` (Theorem 1) and its inverse `sparsity_eps_bound`.
* `topk_error_bound` (Theorem 2) and `value_norm_bound`.
* `binomial_upper_quantile`: the exact binomial quantile through `betainc`.
* The n^C view: `power_law_k`, `power_law_error_bound`,
  `predicted_tail_mass`, `predicted_effective_support`, `rem_boundaries`,
  `rem_regime`.
* `rank_layers_by_sparsity`: which layers are sparsest, from their weights.

The deterministic certificate (fact 4) lives in `gsparse.certificate` and is
re-exported here as `tail_mass_certificate` / `output_error_certificate`.

Arguments whose values are known at trace time (Python numbers, NumPy arrays,
closed-over constants under `jit`) are range-checked and raise `ValueError`
naming the argument. Traced arguments (vmapped sweeps) cannot be checked; an
out-of-range traced value gives NaN in the result.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import betainc, log_ndtr, ndtr, ndtri
from jax.typing import ArrayLike

from gsparse import _checks
from gsparse.certificate import output_error_certificate, tail_mass_certificate

__all__ = [
  "DEFAULT_DELTA",
  "ErrorBound",
  "InteractionNorms",
  "LayerRanking",
  "RemBoundaries",
  "SparsityBound",
  "SparsityEpsBound",
  "TauRange",
  "binomial_upper_quantile",
  "interaction_norms",
  "interaction_norms_from_weights",
  "output_error_certificate",
  "power_law_error_bound",
  "power_law_k",
  "predicted_effective_support",
  "predicted_tail_mass",
  "rank_layers_by_sparsity",
  "rem_boundaries",
  "rem_regime",
  "sparsity_bound",
  "sparsity_eps_bound",
  "tail_mass_certificate",
  "tau_range",
  "topk_error_bound",
  "value_norm_bound",
]

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


def _valid(*conds) -> jax.Array:
  ok = jnp.asarray(True)
  for c in conds:
    ok = ok & c
  return ok


# --------------------------------------------------------------------------- norms


class InteractionNorms(NamedTuple):
  """The norms of a matrix `M` that the bounds use (all `>= 0`).

  Attributes:
    frobenius: `||M||_F`; `sigma^4 ||M||_F^2 = E tau^2`.
    operator: `||M||_op`, the largest singular value.
    gram_frobenius: `||M M^T||_F = sqrt(sum of singular values^4)`.
  """

  frobenius: jax.Array
  operator: jax.Array
  gram_frobenius: jax.Array


def interaction_norms(m: ArrayLike) -> InteractionNorms:
  """Frobenius, operator and Gram-Frobenius norms of `m` over its last two axes.

  Use it on the interaction matrix `M = scale W_Q W_K^T` (`[..., d, d]`) for the
  sparsity bound, and on `W_V` (`[..., d, h_v]`, one head) for the value-norm
  bound: both need the same three norms.

  Args:
    m: `[..., a, b]` floating array.

  Returns:
    `InteractionNorms` with fields of shape `[...]`.
  """
  m = _checks.check_float_array("m", m, min_ndim=2)
  sv = jnp.linalg.svd(m.astype(jnp.promote_types(m.dtype, jnp.float32)), compute_uv=False)
  op = jnp.max(sv, axis=-1)
  # Powers of the singular values relative to the largest: sv^4 itself underflows in float32
  # for ||M|| < ~1e-10 (giving gram_frobenius = 0 and an invalid tau_range) and overflows for
  # ||M|| > ~1e9 (giving inf).
  rel = sv / jnp.where(op > 0, op, 1.0)[..., None]
  rel2 = rel * rel
  return InteractionNorms(
    frobenius=op * jnp.sqrt(jnp.sum(rel2, axis=-1)),
    operator=op,
    gram_frobenius=op * op * jnp.sqrt(jnp.sum(rel2 * rel2, axis=-1)),
  )


def interaction_norms_from_weights(
  w_q: ArrayLike, w_k: ArrayLike, *, scale: float | None = None
) -> InteractionNorms:
  """`interaction_norms` of `M = scale W_Q W_K^T` per head.

  Args:
    w_q: `[d, heads, h]` (as in `gsparse.Weights`) or `[d, h]`.
    w_k: same shape as `w_q`.
    scale: default `1/sqrt(h)`.

  Returns:
    `InteractionNorms` with fields `[heads]` (or scalars for 2-D inputs).
  """
  from gsparse.gaussian import interaction_matrix

  return interaction_norms(interaction_matrix(w_q, w_k, scale=scale))


def _norm_fields(norms) -> tuple[Any, Any, Any]:
  if not isinstance(norms, InteractionNorms):
    if isinstance(norms, (tuple, list)) and len(norms) == 3:
      norms = InteractionNorms(*norms)
    else:
      raise TypeError(f"norms must be an InteractionNorms (or 3-tuple), got {type(norms).__name__}")
  _check("norms.frobenius", norms.frobenius, lo=0)
  _check("norms.operator", norms.operator, lo=0)
  _check("norms.gram_frobenius", norms.gram_frobenius, lo=0)
  return norms.frobenius, norms.operator, norms.gram_frobenius


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


# ------------------------------------------------------------------------- tau range


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


# ------------------------------------------------------------- denominator lower bound


def _log_z_lower(nm1, ta, tb, log_dz):
  """Lower bound on `log Z_i` valid for every `tau_i` in the cell `[ta, tb]`.

  Off-diagonal part only (`Z_i` also has the positive diagonal term). Holds
  with probability `>= 1 - exp(log_dz)` given `tau_i` in the cell. The best of
  three candidates, each chosen from `(n, cell, delta)` only (never the data):
  AM-GM, the maximum, and a lower-tail Bernstein bound on truncated summands.

  Args:
    nm1: `n - 1 >= 1`, scalar.
    ta, tb: `[C]` cell endpoints.
    log_dz: scalar log failure probability.

  Returns:
    `[C]` lower bounds (may be `-inf`).
  """
  ell = -log_dz
  lnm1 = jnp.log(nm1)
  # AM-GM: log Z >= log(n-1) + mean_j s_ij, the mean ~ N(0, tau^2/(n-1)).
  z = _norm_isf(jnp.exp(log_dz))
  amgm = lnm1 - jnp.maximum(tb * z, ta * z) / jnp.sqrt(nm1)
  # Maximum: P(max_j g_j < c) = Phi(c)^(n-1) = dz  =>  Phi_bar(c*) = 1 - dz^(1/(n-1)).
  cstar = _norm_isf(-jnp.expm1(log_dz / nm1))
  maxb = jnp.where(cstar >= 0, ta * cstar, tb * cstar)
  # Truncated summands Y = e^{tb g} (g <= 0), e^{ta g} (0 < g <= c), e^{ta c} (g > c).
  cmax = jnp.sqrt(2.0 * lnm1) + 1.0
  c = jnp.linspace(0.0, 1.0, _NUM_LEVELS, dtype=ta.dtype) * cmax  # [G]
  ta_, tb_, c_ = ta[:, None], tb[:, None], c[None, :]
  ninf = jnp.asarray(-jnp.inf, ta.dtype)
  l_tail = log_ndtr(-c_)
  m_neg, m_mid, m2_neg, m2_mid = _log_moments(
    [(tb_, ninf, 0.0), (ta_, 0.0, c_), (2.0 * tb_, ninf, 0.0), (2.0 * ta_, 0.0, c_)]
  )
  ley = jnp.logaddexp(jnp.logaddexp(m_neg, m_mid), ta_ * c_ + l_tail)
  ley2 = jnp.logaddexp(jnp.logaddexp(m2_neg, m2_mid), 2.0 * ta_ * c_ + l_tail)
  r = 0.5 * jnp.log(2.0 * ell / nm1) + 0.5 * ley2 - ley
  bern = jnp.where(r < 0, lnm1 + ley + _log1mexp(jnp.minimum(r, 0.0)), -jnp.inf)
  bern = jnp.max(bern, axis=-1)
  return jnp.maximum(jnp.maximum(amgm, maxb), bern)


# ------------------------------------------------------------------- Theorem 1


class SparsityBound(NamedTuple):
  """Result of `sparsity_bound` (all fields broadcast over the arguments).

  Attributes:
    k: the certified k (integer-valued float): with probability `>= 1 - delta`
      every row is (eps, k)-sparse. `min(k_gauss, trivial_k)`.
    trivial_k: `min(floor(1/eps), n)`, true for every probability row.
    informative: `k_gauss < trivial_k`, i.e. the Gaussian structure helped.
    k_gauss: the Gaussian bound before taking the minimum with `trivial_k`.
    exceed_prob: `p*`, the worst-case probability that one off-diagonal score
      exceeds the threshold `log(eps * Z_lower)`.
    tau_lo, tau_hi: the tau interval used.
  """

  k: jax.Array
  trivial_k: jax.Array
  informative: jax.Array
  k_gauss: jax.Array
  exceed_prob: jax.Array
  tau_lo: jax.Array
  tau_hi: jax.Array


def _trivial_k(n, eps):
  return jnp.minimum(jnp.floor(1.0 / eps), n)


def _exceed_log_prob(theta, ta, tb):
  """`log max_{tau in {ta, tb}} Phi_bar(theta / tau)` per cell (tau = 0 handled)."""

  def one(t):
    x = jnp.where(t > 0, theta / jnp.where(t > 0, t, 1.0), jnp.where(theta >= 0, jnp.inf, -jnp.inf))
    return log_ndtr(-x)

  return jnp.maximum(one(ta), one(tb))


def _orderstat_fail(nm1, m, eps, ta, tb, c):
  """Bound on `P(at least m off-diagonal p_ij > eps)` per tau cell, by the m-th order statistic.

  Conditioning on the m-th largest standardised score `G = c`, the other
  `n - 1 - m` lower ones are i.i.d. `N(0, 1)` truncated to `(-inf, c)`; the
  event needs `e^{tau G} (1 - eps m) > eps Z_rest`, a lower-tail (Bernstein)
  event for the truncated sum. Summed over a grid of cells of `G`
  (docs/theory.md, Lemma 5).

  Args:
    nm1: `n - 1`.
    m: number of exceedances (>= 1).
    eps: threshold.
    ta, tb: `[C]` tau cells.
    c: `[L + 1]` increasing grid of standardised levels.

  Returns:
    `[C]` probability bounds.
  """
  dt = ta.dtype
  inv_safe = 1.0 / _safety(dt)
  slack = 1.0 - eps * m
  cnt = nm1 - m
  ninf = jnp.asarray(-jnp.inf, dt)
  cp = c[:-1][None, :]  # truncation levels c_{l-1}, [1, L]
  cn = c[1:][None, :]  # cell tops c_l
  ta_, tb_ = ta[:, None], tb[:, None]
  lo_part = jnp.minimum(cp, 0.0)
  hi_part = jnp.maximum(cp, 0.0)
  m1n, m1p, m2n, m2p = _log_moments(
    [
      (tb_, ninf, lo_part),
      (ta_, 0.0, hi_part),
      (2.0 * tb_, ninf, lo_part),
      (2.0 * ta_, 0.0, hi_part),
    ]
  )
  lphi = log_ndtr(cp)
  log_cnt = jnp.log(jnp.maximum(cnt, 1.0))
  log_mu = log_cnt + jnp.logaddexp(m1n, m1p) - lphi
  log_v = log_cnt + jnp.logaddexp(m2n, m2p) - lphi
  log_lam = jnp.log(jnp.maximum(slack, 1e-30)) - jnp.log(eps) + jnp.maximum(ta_ * cn, tb_ * cn)
  gap = _log1mexp(jnp.minimum(log_lam - log_mu, 0.0))
  b = jnp.where(
    (log_lam < log_mu) & (cnt >= 1.0),
    jnp.exp(-0.5 * jnp.exp(2.0 * (log_mu + gap) - log_v)),
    1.0,
  )
  # The m - 1 scores above G: if the largest exceeds G by Delta, the m-th entry
  # cannot exceed eps. P(all below G + Delta | G = c) is largest at the cell top.
  ta_safe = jnp.where(ta_ > 0, ta_, 1.0)
  log_r = jnp.log(jnp.maximum(1.0 - eps * (m - 1.0), 1e-30)) - jnp.log(eps)
  delta_c = jnp.where(ta_ > 0, jnp.maximum(log_r, 0.0) / ta_safe, jnp.inf)
  tails = log_ndtr(-jnp.stack(jnp.broadcast_arrays(cn + delta_c, cn)))
  log_q = (m - 1.0) * _log1mexp(jnp.minimum(tails[0] - tails[1], 0.0))
  b = b * jnp.exp(jnp.where(m > 1.0, log_q, 0.0))
  bt = jax.lax.cummax(b, axis=1)  # [C, L], non-decreasing in l
  # T_l = P(G > c_l) = P(Binomial(n-1, Phi_bar(c_l)) >= m), rounded up.
  t = jnp.minimum(betainc(m, jnp.maximum(nm1 - m + 1.0, 1.0), ndtr(-c)) * inv_safe, 1.0)
  head = jnp.minimum(betainc(jnp.maximum(nm1 - m + 1.0, 1.0), m, ndtr(c[0])) * inv_safe, 1.0)
  body = jnp.sum(t[None, 1:-1] * (bt[:, 1:] - bt[:, :-1]), axis=1)
  total = head + t[0] * bt[:, 0] + body + t[-1] * (1.0 - bt[:, -1])
  return jnp.where(slack <= 0, 0.0, jnp.minimum(total, 1.0))


def _fail_fn(n, tau_lo, tau_hi, eps, log_drow):
  """`(fail, p*)`: `fail(m)` bounds `P(at least m off-diagonal entries > eps)` for one row.

  The better of the union bound and the order-statistic bound, per tau cell,
  worst cell; `p*` is the union bound's exceedance probability.
  """
  nm1 = jnp.maximum(n - 1.0, 1.0)
  ta, tb = _cells(tau_lo, tau_hi)
  drow = jnp.exp(log_drow)
  # Union bound: Z >= Z_lower with prob 1 - drow/2; then a binomial count.
  log_dz = log_drow - jnp.log(2.0)
  lz = _log_z_lower(nm1, ta, tb, log_dz)
  theta = jnp.log(eps) + lz
  p_cell = jnp.exp(_exceed_log_prob(theta, ta, tb))  # [C]
  c = jnp.linspace(-3.0, 1.0, _NUM_GRID + 1, dtype=ta.dtype)
  c = c + jnp.where(c > 0, c * (jnp.sqrt(2.0 * jnp.log(nm1)) + 2.0) - c, 0.0)
  inv_safe = 1.0 / _safety(ta.dtype)

  def fail(m):  # bound on P(at least m off-diagonal entries > eps), max over cells
    p1 = 0.5 * drow + jnp.minimum(_binom_tail(n - 1.0, m - 1.0, p_cell) * inv_safe, 1.0)
    p2 = _orderstat_fail(nm1, m, eps, ta, tb, c)
    return jnp.max(jnp.minimum(p1, p2))

  return fail, jnp.max(p_cell)


def _sparsity_core(n, tau_lo, tau_hi, eps, log_drow):
  """Scalar core of Theorem 1 for a given tau interval: `(k_gauss, p*)`."""
  fail, p_star = _fail_fn(n, tau_lo, tau_hi, eps, log_drow)
  drow = jnp.exp(log_drow)

  # Linear scan from m = 1: the first m whose bound is <= drow. (A bisection
  # would need the bound to be monotone in m, which it need not be; the first
  # hit makes k monotone in eps.) The scan stops by m = ceil(1/eps), where the
  # order-statistic bound is 0, and by m = n (only n - 1 off-diagonal entries).
  def cond(m):
    return (m < n) & (fail(m) > drow)

  m = jax.lax.while_loop(cond, lambda m: m + 1.0, jnp.ones_like(n))
  k = jnp.minimum(m, n)  # m - 1 off-diagonal entries plus the diagonal
  return jnp.where(n <= 1.0, n, k), p_star


def sparsity_bound(
  n: ArrayLike,
  sigma: ArrayLike,
  norms: InteractionNorms,
  *,
  eps: ArrayLike,
  delta: ArrayLike = DEFAULT_DELTA,
) -> SparsityBound:
  """Theorem 1: a k such that every row is (eps, k)-sparse with prob `>= 1 - delta`.

  For `n` i.i.d. rows `x_i ~ N(0, sigma^2 I_d)` and scores `x_i^T M x_j`, with
  probability at least `1 - delta` every one of the `n` rows of the softmax
  matrix has at most `k` entries larger than `eps`. The failure probability
  is split in two halves: `delta / 2` for the tau interval (`tau_range`) and
  `delta / 2` for the rows, `delta / (2 n)` each by a union bound. Per row,
  given tau in a cell of the interval, the better of two bounds on
  `P(at least m off-diagonal entries > eps)` is used: a union bound (half for a
  lower bound on the normaliser, half for a binomial count of exceedances) and
  an order-statistic bound (docs/theory.md, Theorem 1).

  Everything is a jnp function of its arguments: jit and vmap over any of them.

  Args:
    n: sequence length (integer-valued, >= 1).
    sigma: input standard deviation (> 0).
    norms: `InteractionNorms` of `M` (`interaction_norms(M)` or
      `interaction_norms_from_weights(w_q, w_k)`), each `>= 0`.
    eps: threshold in (0, 1).
    delta: failure probability in (0, 1), default 1e-4.

  Returns:
    `SparsityBound`; `k` never exceeds the trivial `min(floor(1/eps), n)` and
    `informative` says whether the Gaussian bound beat it.
  """
  _check_n(n)
  _check("sigma", sigma, lo=0, lo_open=True)
  _check_eps(eps)
  _check_delta(delta)
  frob, op, gram = _norm_fields(norms)
  dtype = _float_dtype()
  args = jnp.broadcast_arrays(
    *(jnp.asarray(v, dtype) for v in (n, sigma, eps, delta, frob, op, gram))
  )
  shape = args[0].shape
  out = _sparsity_flat(*_pad_flat(args))
  return SparsityBound(*_unpad(out, shape))


def _sparsity_scalar(n, sigma, eps, delta, frob, op, gram):
  tlo, thi = _tau_range_scalar(n, sigma, frob, op, gram, delta / 2.0)
  log_row = jnp.log(delta / 2.0) - jnp.log(n)
  k_g, p = _sparsity_core(n, tlo, thi, eps, log_row)
  triv = _trivial_k(n, eps)
  ok = _valid(
    n >= 1, sigma > 0, eps > 0, eps < 1, delta > 0, delta < 1, frob >= 0, op >= 0, gram >= 0
  )
  nan = jnp.asarray(jnp.nan, n.dtype)
  k = jnp.where(ok, jnp.minimum(k_g, triv), nan)
  return (
    k,
    triv,
    ok & (k_g < triv),
    jnp.where(ok, k_g, nan),
    jnp.where(ok, p, nan),
    tlo,
    thi,
  )


@jax.jit
def _tau_range_jit(n, sigma, frob, op, gram, delta):
  lo2, hi2 = _quad_form_range(sigma**4, frob, op, gram, jnp.log(2.0 * n / delta))
  return jnp.sqrt(lo2), jnp.sqrt(hi2)


def _tau_range_scalar(n, sigma, frob, op, gram, delta_tau):
  lo2, hi2 = _quad_form_range(sigma**4, frob, op, gram, jnp.log(2.0 * n / delta_tau))
  return jnp.sqrt(lo2), jnp.sqrt(hi2)


class SparsityEpsBound(NamedTuple):
  """Result of `sparsity_eps_bound`.

  Attributes:
    eps: with probability `>= 1 - delta` every row is (eps, k)-sparse;
      `min(eps_gauss, trivial_eps)` (0 when `k >= n`).
    trivial_eps: `1 / (k + 1)`, true for every probability row.
    informative: `eps_gauss < trivial_eps`.
    eps_gauss: the Gaussian bound alone.
  """

  eps: jax.Array
  trivial_eps: jax.Array
  informative: jax.Array
  eps_gauss: jax.Array


def sparsity_eps_bound(
  n: ArrayLike,
  sigma: ArrayLike,
  norms: InteractionNorms,
  *,
  k: ArrayLike,
  delta: ArrayLike = DEFAULT_DELTA,
) -> SparsityEpsBound:
  """Inverse of Theorem 1: the eps achieved for a given k.

  Returns `eps` such that, with probability `>= 1 - delta`, every row has at
  most `k` entries above `eps`. Same events and split as `sparsity_bound`, so
  `sparsity_bound(..., eps=e).k <= k` for every `e` slightly above the
  returned `eps_gauss` (up to the bisection resolution of the binomial
  inversion, which errs on the safe side).

  Args:
    n: sequence length (integer-valued, >= 1).
    sigma: input standard deviation (> 0).
    norms: `InteractionNorms` of `M`.
    k: number of allowed large entries (integer-valued, >= 1).
    delta: failure probability in (0, 1).

  Returns:
    `SparsityEpsBound`.
  """
  _check_n(n)
  _check("sigma", sigma, lo=0, lo_open=True)
  _check("k", k, lo=1, integer=True)
  _check_delta(delta)
  frob, op, gram = _norm_fields(norms)
  dtype = _float_dtype()
  args = jnp.broadcast_arrays(
    *(jnp.asarray(v, dtype) for v in (n, sigma, k, delta, frob, op, gram))
  )
  shape = args[0].shape
  out = _eps_flat(*_pad_flat(args))
  return SparsityEpsBound(*_unpad(out, shape))


def _eps_scalar(n, sigma, k, delta, frob, op, gram):
  tlo, thi = _tau_range_scalar(n, sigma, frob, op, gram, delta / 2.0)
  log_row = jnp.log(delta / 2.0) - jnp.log(n)
  triv = jnp.where(k >= n, 0.0, 1.0 / (k + 1.0))
  # Bisection on log eps; `hi` is always an eps whose Theorem-1 k is <= k (verified).
  lo = jnp.log(1e-3 / n)
  hi = jnp.log(triv)
  drow = jnp.exp(log_row)
  kk = jnp.minimum(k, n)

  def admissible(log_eps):
    # fail(k) <= drow implies the first admissible m of Theorem 1 is <= k, for
    # this eps and (fail being non-increasing in eps) every larger one.
    fail, _ = _fail_fn(n, tlo, thi, jnp.exp(log_eps), log_row)
    return fail(kk) <= drow

  found = admissible(hi)

  def body(_, state):
    lo, hi = state
    mid = 0.5 * (lo + hi)
    ok = admissible(mid)
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  _, hi = jax.lax.fori_loop(0, _EPS_BISECTION_STEPS, body, (lo, hi))
  eps_g = jnp.where(k >= n, 0.0, jnp.where(found, jnp.exp(hi), jnp.inf))
  ok = _valid(n >= 1, sigma > 0, k >= 1, delta > 0, delta < 1, frob >= 0, op >= 0, gram >= 0)
  nan = jnp.asarray(jnp.nan, n.dtype)
  eps = jnp.minimum(eps_g, triv)
  return (
    jnp.where(ok, eps, nan),
    triv,
    ok & (eps_g < triv),
    jnp.where(ok, eps_g, nan),
  )


# ------------------------------------------------------------------- Theorem 2


def value_norm_bound(
  n: ArrayLike, sigma: ArrayLike, value_norms: InteractionNorms, *, delta: ArrayLike
) -> jax.Array:
  """Bound on `max_j ||v_j||`, `v_j = W_V^T x_j`, holding with probability `>= 1 - delta`.

  `||v_j||^2 = sigma^2 g^T W_V W_V^T g`; Laurent-Massart upper tail with
  `x = log(n / delta)` and a union bound over the `n` rows.

  Args:
    n: number of rows.
    sigma: input standard deviation.
    value_norms: `interaction_norms(W_V)` for one head's `W_V` `[d, h_v]`.
    delta: failure probability.

  Returns:
    The bound, broadcast over the arguments.
  """
  _check_n(n)
  _check("sigma", sigma, lo=0, lo_open=True)
  _check_delta(delta)
  frob, op, gram = _norm_fields(value_norms)
  dtype = _float_dtype()
  n, sigma, delta, frob, op, gram = (
    jnp.asarray(v, dtype) for v in (n, sigma, delta, frob, op, gram)
  )
  return _value_norm_jit(n, sigma, frob, op, gram, delta)


@jax.jit
def _value_norm_jit(n, sigma, frob, op, gram, delta):
  _, hi2 = _quad_form_range(sigma * sigma, frob, op, gram, jnp.log(n / delta))
  return jnp.sqrt(hi2)


class ErrorBound(NamedTuple):
  """Result of `topk_error_bound`.

  Attributes:
    error: with probability `>= 1 - delta`, every row's
      `||o_i - o_i^{(k)}||_2 <= error`.
    tail_mass: the bound on every row's tail mass `t_i` (in `[0, 1]`).
    value_norm: the bound on `max_j ||v_j||` used (or the one given).
  """

  error: jax.Array
  tail_mass: jax.Array
  value_norm: jax.Array


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


def _tail_core(n, tau_lo, tau_hi, k, log_drow):
  """Log bound on every row's top-k tail mass, per-row failure `exp(log_drow)` given tau in range.

  Conditions on `G`, the k-th largest off-diagonal standardised score
  (docs/theory.md, Lemma 6): `G` lies in `[c_lo, c_hi]` (binomial quantiles,
  half of the budget), the `n - 1 - k` scores below it are i.i.d. truncated
  normals whose exponential sum is bounded above by Bernstein (a quarter), and
  the largest of the `k - 1` above it exceeds `G` by at least `Delta` (a
  quarter). Then `t <= x / (x + y)` with `x = e^{tau G} + T_rest` and
  `y = (k - 2) e^{tau G} + e^{tau (G + Delta)}`.
  """
  dt = tau_hi.dtype
  nm1 = jnp.maximum(n - 1.0, 1.0)
  ta, tb = _cells(tau_lo, tau_hi)
  drow = jnp.exp(log_drow)
  d_side = 0.25 * drow
  d_rest = 0.25 * drow
  d_top = 0.25 * drow
  kk = jnp.clip(k, 2.0, nm1)
  c_hi = _norm_isf(_binom_max_p(nm1, kk, d_side))
  c_lo = _norm_isf(_binom_min_p(nm1, kk, d_side))
  u = jnp.linspace(0.0, 1.0, _NUM_LEVELS + 1, dtype=dt)
  grid = c_lo + u * (c_hi - c_lo)
  c1 = grid[:-1][None, :]  # [1, G]
  c2 = grid[1:][None, :]
  ta_, tb_ = ta[:, None], tb[:, None]  # [C, 1]
  ninf = jnp.asarray(-jnp.inf, dt)
  # Rest: n - 1 - k scores with g < c2, coupled to W = e^{tb g} (g > 0), e^{ta g} (g <= 0).
  cnt = jnp.maximum(nm1 - kk, 0.0)
  lo_part = jnp.minimum(c2, 0.0)
  hi_part = jnp.maximum(c2, 0.0)
  m1n, m1p, m2n, m2p = _log_moments(
    [
      (ta_, ninf, lo_part),
      (tb_, 0.0, hi_part),
      (2.0 * ta_, ninf, lo_part),
      (2.0 * tb_, 0.0, hi_part),
    ]
  )
  lphi = log_ndtr(c2)
  ell = -jnp.log(d_rest)
  log_cnt = jnp.log(jnp.maximum(cnt, 1e-30))
  lb = tb_ * hi_part + ta_ * lo_part
  rest = jnp.stack(
    jnp.broadcast_arrays(
      log_cnt + jnp.logaddexp(m1n, m1p) - lphi,
      0.5 * (jnp.log(2.0 * ell) + log_cnt + jnp.logaddexp(m2n, m2p) - lphi),
      lb + jnp.log(ell / 3.0),
    )
  )
  log_rest = jnp.where(cnt > 0, jax.nn.logsumexp(rest, axis=0), -jnp.inf)
  log_g_up = jnp.maximum(ta_ * c2, tb_ * c2)  # e^{tau G} <= this
  log_x = jnp.logaddexp(log_g_up, log_rest)
  # Top: P(max of k-1 scores above G < G + Delta | G = c) <= d_top.
  log_rho = _log1mexp(jnp.log(d_top) / jnp.maximum(kk - 1.0, 1.0))
  top = _norm_isf(jnp.exp(log_rho + log_ndtr(-c1)))  # c + Delta at c = c1
  log_g_lo = jnp.minimum(ta_ * c1, tb_ * c1)
  log_top = jnp.minimum(ta_ * top, tb_ * top)
  log_km2 = jnp.log(jnp.maximum(kk - 2.0, 1e-30))
  log_y = jnp.where(kk > 2.0, jnp.logaddexp(log_km2 + log_g_lo, log_top), log_top)
  log_t = log_x - jnp.logaddexp(log_x, log_y)
  log_t = jnp.max(log_t)
  return jnp.where(k < 2.0, 0.0, jnp.minimum(log_t, 0.0))


def topk_error_bound(
  n: ArrayLike,
  sigma: ArrayLike,
  norms: InteractionNorms,
  *,
  k: ArrayLike,
  value_norms: InteractionNorms | None = None,
  value_norm: ArrayLike | None = None,
  delta: ArrayLike = DEFAULT_DELTA,
) -> ErrorBound:
  """Theorem 2: with prob `>= 1 - delta`, the top-k output error of every row.

  With `t_i` the softmax mass outside the k largest scores of row i,
  `||o_i - o_i^{(k)}|| = t_i ||mu_tail - mu_head|| <= 2 t_i max_j ||v_j||`
  (exact identity, docs/theory.md Lemma 1). The tail mass is bounded by
  conditioning on the k-th largest off-diagonal score (docs/theory.md,
  Theorem 2).

  Failure-probability split: `delta / 4` for the tau interval, `delta / 2` for
  the rows (`delta / (2 n)` each: half for where the k-th largest score lies,
  a quarter for the sum below it, a quarter for the largest score above it),
  and `delta / 4` for `max_j ||v_j||` from `value_norms` (unused, so the
  statement is conservative, when a deterministic `value_norm` is given).

  Args:
    n: sequence length (integer-valued, >= 1).
    sigma: input standard deviation (> 0).
    norms: `InteractionNorms` of `M`.
    k: number of kept keys per row (integer-valued, >= 1).
    value_norms: `interaction_norms(W_V)` (one head), used when `value_norm`
      is None.
    value_norm: a known bound on `max_j ||v_j||` (e.g. from the data).
    delta: failure probability in (0, 1).

  Returns:
    `ErrorBound(error, tail_mass, value_norm)`.
  """
  _check_n(n)
  _check("sigma", sigma, lo=0, lo_open=True)
  _check("k", k, lo=1, integer=True)
  _check_delta(delta)
  frob, op, gram = _norm_fields(norms)
  if (value_norms is None) == (value_norm is None):
    raise ValueError("exactly one of value_norms and value_norm must be given")
  dtype = _float_dtype()
  if value_norm is not None:
    _check("value_norm", value_norm, lo=0)
    vf = vo = vg = jnp.zeros((), dtype)
    vn = jnp.asarray(value_norm, dtype)
  else:
    vf, vo, vg = _norm_fields(value_norms)
    vn = jnp.zeros((), dtype)
  args = jnp.broadcast_arrays(
    *(jnp.asarray(v, dtype) for v in (n, sigma, k, delta, frob, op, gram, vf, vo, vg, vn))
  )
  shape = args[0].shape
  out = _error_flat(*_pad_flat(args), given=value_norm is not None)
  return ErrorBound(*_unpad(out, shape))


def _error_scalar(n, sigma, k, delta, frob, op, gram, vf, vo, vg, vn, *, given):
  dpart = delta / 4.0
  tlo, thi = _tau_range_scalar(n, sigma, frob, op, gram, dpart)
  log_row = jnp.log(2.0 * dpart) - jnp.log(n)
  log_t = _tail_core(n, tlo, thi, k, log_row)
  t = jnp.where(k >= n, 0.0, jnp.exp(log_t))
  if given:
    vmax = vn
  else:
    _, hi2 = _quad_form_range(sigma * sigma, vf, vo, vg, jnp.log(n / dpart))
    vmax = jnp.sqrt(hi2)
  ok = _valid(n >= 1, sigma > 0, k >= 1, delta > 0, delta < 1, frob >= 0, op >= 0, gram >= 0)
  ok = ok & (vn >= 0) & (vf >= 0) & (vo >= 0) & (vg >= 0)
  nan = jnp.asarray(jnp.nan, n.dtype)
  err = 2.0 * t * vmax
  return jnp.where(ok, err, nan), jnp.where(ok, t, nan), jnp.where(ok, vmax, nan)


_sparsity_flat = jax.jit(jax.vmap(_sparsity_scalar))
_eps_flat = jax.jit(jax.vmap(_eps_scalar))


@functools.partial(jax.jit, static_argnames=("given",))
def _error_flat(*args, given):
  return jax.vmap(functools.partial(_error_scalar, given=given))(*args)


# ----------------------------------------------------------------- the n^C view


def power_law_k(n: ArrayLike, *, alpha: ArrayLike, C: ArrayLike) -> jax.Array:
  """The k policy `k = alpha * n^C` of the n^C view.

  Rounding: `k = clip(ceil(alpha * n^C), 1, n)` computed in floating point (so
  a product that lands on an integer up to rounding, e.g. `1 * 1024^0.5`, gives
  that integer). Use `int(power_law_k(...))` for the static `k` of
  `gsparse.topk_attention`.

  Args:
    n: sequence length (integer-valued, >= 1).
    alpha: prefactor, > 0.
    C: exponent in [0, 1].

  Returns:
    int32 array broadcast over the arguments.
  """
  _check_n(n)
  _check("alpha", alpha, lo=0, lo_open=True)
  _check("C", C, lo=0, hi=1)
  dtype = _float_dtype()
  n, alpha, C = (jnp.asarray(v, dtype) for v in (n, alpha, C))
  raw = alpha * jnp.power(n, C)
  # Snap values within a few ulps of an integer before the ceiling.
  snapped = jnp.where(
    jnp.abs(raw - jnp.round(raw)) <= 8 * jnp.finfo(dtype).eps * raw, jnp.round(raw), raw
  )
  return jnp.clip(jnp.ceil(snapped), 1.0, n).astype(jnp.int32)


def power_law_error_bound(
  n: ArrayLike,
  sigma: ArrayLike,
  norms: InteractionNorms,
  *,
  alpha: ArrayLike,
  C: ArrayLike,
  value_norms: InteractionNorms | None = None,
  value_norm: ArrayLike | None = None,
  delta: ArrayLike = DEFAULT_DELTA,
) -> ErrorBound:
  """Theorem 2 evaluated at the policy `k = power_law_k(n, alpha=alpha, C=C)`.

  Vmap or broadcast over `n` to see how the certified error falls with `n`.
  """
  k = power_law_k(n, alpha=alpha, C=C)
  return topk_error_bound(
    n, sigma, norms, k=k, value_norms=value_norms, value_norm=value_norm, delta=delta
  )


def predicted_tail_mass(n: ArrayLike, tau: ArrayLike, *, k: ArrayLike) -> jax.Array:
  """Typical (not certified) tail mass of top-k for i.i.d. `N(0, tau^2)` scores.

  Random-energy-model prediction valid while the row is not condensed
  (`tau < sqrt(2 ln n)`): the k largest of n standard Gaussians lie above
  `q = Phi_bar^{-1}(k/n)` and the softmax with inverse temperature tau weighs
  the level `g` by `e^{tau g}`, i.e. the tilted law `N(tau, 1)`, so the mass
  below `q` is `Phi(q - tau)`. Under `k = alpha n^C` and fixed tau it tends to
  1 as n grows (`q ~ sqrt(2 (1-C) ln n)`); it falls with n only when tau
  grows at least like `sqrt(2 (1-C) ln n)` (docs/theory.md, section 5).

  Args:
    n: sequence length.
    tau: score scale (>= 0).
    k: kept entries (1 <= k <= n).

  Returns:
    The prediction in `[0, 1]`.
  """
  _check_n(n)
  _check("tau", tau, lo=0)
  _check("k", k, lo=1)
  dtype = _float_dtype()
  n, tau, k = (jnp.asarray(v, dtype) for v in (n, tau, k))
  q = _norm_isf(jnp.clip(k / n, 0.0, 1.0))
  return jnp.where(k >= n, 0.0, ndtr(q - tau))


class RemBoundaries(NamedTuple):
  """Regime boundaries in tau for sequence length n (random energy model).

  Attributes:
    diffuse: `sqrt(ln n / 2)`: below, effective support ~ `n e^{-tau^2}`.
    collapse: `sqrt(2 ln n)`: above, the row condenses onto O(1) entries.
  """

  diffuse: jax.Array
  collapse: jax.Array


def rem_boundaries(n: ArrayLike) -> RemBoundaries:
  """The tau values where the effective support changes regime.

  See `predicted_effective_support`.
  """
  _check_n(n)
  ln = jnp.log(jnp.asarray(n, _float_dtype()))
  return RemBoundaries(jnp.sqrt(0.5 * ln), jnp.sqrt(2.0 * ln))


def rem_regime(n: ArrayLike, tau: ArrayLike) -> jax.Array:
  """0 = diffuse (`tau < sqrt(ln n / 2)`), 1 = n^C-like, 2 = collapsed (`tau >= sqrt(2 ln n)`)."""
  b = rem_boundaries(n)
  _check("tau", tau, lo=0)
  tau = jnp.asarray(tau, _float_dtype())
  return (tau >= b.diffuse).astype(jnp.int32) + (tau >= b.collapse).astype(jnp.int32)


def predicted_effective_support(n: ArrayLike, tau: ArrayLike) -> jax.Array:
  """Leading-order prediction of `1 / sum_j p_j^2` for n i.i.d. `N(0, tau^2)` scores.

  With `a = sqrt(2 ln n)` (random energy model, docs/theory.md section 5):
  `log ESS = ln n - tau^2` for `tau <= a/2`, `(a - tau)^2` for
  `a/2 <= tau <= a`, and 0 (ESS of order one) beyond. Continuous, decreasing,
  exact at exponential scale only (sub-exponential factors are not modelled).
  The exponent `C = log ESS / ln n` is `1 - tau^2/ln n`, then
  `2 (1 - tau/a)^2`: n^C-sparsity with `C < 1` needs `tau^2` proportional
  to `ln n`.

  Returns:
    The predicted effective support, in `[1, n]`.
  """
  _check_n(n)
  _check("tau", tau, lo=0)
  dtype = _float_dtype()
  n, tau = (jnp.asarray(v, dtype) for v in (n, tau))
  ln = jnp.log(n)
  a = jnp.sqrt(2.0 * ln)
  log_ess = jnp.where(tau <= 0.5 * a, ln - tau * tau, jnp.where(tau <= a, (a - tau) ** 2, 0.0))
  return jnp.exp(log_ess)


# ------------------------------------------------------------ layer ranking


class LayerRanking(NamedTuple):
  """Result of `rank_layers_by_sparsity` for L layers with H heads each.

  Attributes:
    order: `[L]` int32 layer indices, sparsest first.
    expected_tau: `[L, H]` `sqrt(E tau^2) = sigma^2 ||M||_F` per head.
    effective_support: `[L, H]` `predicted_effective_support(n, expected_tau)`.
    layer_log_support: `[L]` mean over heads of the log effective support (the
      ranking key, smaller = sparser).
    k: `[L, H]` Theorem-1 k per head at the given eps (certified; note that a
      diffuse row also has few entries above eps, so k alone does not rank).
  """

  order: jax.Array
  expected_tau: jax.Array
  effective_support: jax.Array
  layer_log_support: jax.Array
  k: jax.Array


def rank_layers_by_sparsity(
  w_q: ArrayLike | Sequence[ArrayLike],
  w_k: ArrayLike | Sequence[ArrayLike],
  *,
  n: int | ArrayLike,
  eps: float | ArrayLike = 0.01,
  sigma: float | ArrayLike = 1.0,
  scale: float | None = None,
  delta: float | ArrayLike = DEFAULT_DELTA,
) -> LayerRanking:
  """Ranks layers by predicted attention sparsity, sparsest first (fact 8).

  Sparsity here means concentration of the softmax mass: each head's typical
  row scale `sqrt(E tau^2) = sigma^2 ||M||_F` gives the predicted effective
  support `1 / sum_j p_j^2` at length n (`predicted_effective_support`, random
  energy model); layers are ordered by the mean log effective support over
  their heads (ties: larger mean tau first, then lower index). Larger
  `||W_Q W_K^T||` means a smaller support, i.e. a layer to sparsify first.
  The certified Theorem-1 k at `eps` is returned alongside.

  Args:
    w_q: `[L, d, heads, h]` stacked query weights, or a sequence of L
      `[d, heads, h]` arrays (as in `gsparse.Weights.w_q`).
    w_k: same layout as `w_q`.
    n: sequence length at which sparsity is predicted.
    eps: threshold of (eps, k)-sparsity for the returned `k`.
    sigma: input standard deviation.
    scale: logit scale, default `1/sqrt(h)`.
    delta: failure probability of Theorem 1.

  Returns:
    `LayerRanking`.
  """
  if isinstance(w_q, (list, tuple)):
    w_q = jnp.stack([jnp.asarray(w) for w in w_q])
  if isinstance(w_k, (list, tuple)):
    w_k = jnp.stack([jnp.asarray(w) for w in w_k])
  w_q = _checks.check_float_array("w_q", w_q)
  w_k = _checks.check_float_array("w_k", w_k)
  if w_q.ndim != 4 or w_q.shape != w_k.shape:
    raise ValueError(
      f"w_q and w_k must both be [layers, d, heads, h], got {w_q.shape} and {w_k.shape}"
    )
  if w_q.shape[0] < 1:
    raise ValueError(f"need at least one layer, got w_q.shape={w_q.shape}")
  norms = jax.vmap(lambda q, k: interaction_norms_from_weights(q, k, scale=scale))(w_q, w_k)
  sb = sparsity_bound(n, sigma, norms, eps=eps, delta=delta)
  dt = _float_dtype()
  tau = jnp.asarray(sigma, dt) ** 2 * norms.frobenius.astype(dt)
  ess = predicted_effective_support(n, tau)
  layer_log = jnp.mean(jnp.log(ess), axis=-1)
  layer_tau = jnp.mean(tau, axis=-1)
  order = jnp.lexsort((jnp.arange(layer_log.shape[0]), -layer_tau, layer_log)).astype(jnp.int32)
  return LayerRanking(order, tau, ess, layer_log, sb.k)
