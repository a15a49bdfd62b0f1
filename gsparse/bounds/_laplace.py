"""Upper Riemann sums of Lemma 6's truncated-lognormal transforms, as matrix products.

Lemma 6 (docs/theory.md, section 3) needs, for tau cells `t [C]`, G levels
`c [L]` and Chernoff parameters `lam [K]`, upper bounds on

    E[exp(sign lam e^{t (g - c)}) | g > c]  (top)   or   | g < c]  (rest),

`g ~ N(0, 1)`. Every Riemann node sits at `c + d_q`, with offsets `d_q` that
depend on the tau band (a few consecutive cells) but not on `c`. So the node
values `exp(sign lam e^{t d_q})` form a `[N, K]` matrix per tau cell, the
truncated-normal masses of the Riemann cells a `[L, N]` matrix per band, and
every `(t, c, lam)` is one entry of their product: `B L N` normal
probabilities, `C N K` exponentials and a matrix product, instead of
`C L N K` exponentials. The largest node value per `(t, lam)` is factored out
(its logarithm is added back), so the products are at most the masses, and
every term that underflows (or is flushed to zero) is below `tiny / mass(c)`;
`N` of those are added back, so the sum stays an upper bound.
"""

from __future__ import annotations

import jax

from gsparse.bounds import _memo, _xp

_NUM_QUAD = 64  # Riemann cells per truncated transform
_FLOOR = -9.0  # the rest's nodes reach below min(c - 1, _FLOOR); below, the integrand is <= 1
_SPAN = 14.0  # nodes resolve g - c on the scale 1/t: span _SPAN / t (at most 10 above c)
_BAND = 8  # tau cells per band of shared offsets (where the number of cells divides)
_LADDER = 8  # steps per octave of the band scales' ladder (`_band_scales(ladder=True)`)


def _band_scales(t, ladder=False):
  """`[B]` reference scale of each band of consecutive (increasing) tau cells: `sqrt(first last)`.

  A cell with scale `t` then reads its band's nodes at `e^{t d_q}`, `t / t_ref`
  within the band's ratio either way; any offsets give a valid sum. With
  `ladder`, the scale is rounded to the nearest `2^{j / _LADDER}` (a factor
  within `2^{1 / (2 _LADDER)}`), so that the bands of nearby calls share their
  nodes and masses (`_band_masses` keeps them on the NumPy path).
  """
  xp = _xp.of(t)
  size = _BAND if t.shape[0] % _BAND == 0 else 1
  bands = t.reshape(-1, size)
  ref = xp.sqrt(bands[:, 0] * bands[:, -1])
  if not ladder:
    return ref
  return xp.exp2(xp.round(_LADDER * xp.log2(xp.maximum(ref, 1e-30))) / _LADDER)


def _top_offsets(t_ref):
  """`[B, Q + 1]` offsets above `c`: `u^2`-spaced on `[0, min(10, _SPAN / t_ref)]`."""
  xp = _xp.of(t_ref)
  u = xp.linspace(0.0, 1.0, _NUM_QUAD + 1, dtype=t_ref.dtype)
  span = xp.minimum(10.0, _SPAN / xp.maximum(t_ref, 1e-6))
  return span[:, None] * (u * u)


def _rest_offsets(t_ref, depth):
  """`[B, Q + 1]` offsets below `c`: half on `[-w, 0]`, half down to `-depth`.

  `w = min(_SPAN / t_ref, depth / 2)`: the fine half resolves `g - c` on the
  scale `1/t`, and at small `t` the two halves split the range evenly.
  """
  xp = _xp.of(t_ref, depth)
  fine = xp.minimum(_SPAN / xp.maximum(t_ref, 1e-6), 0.5 * depth)[:, None]
  u = xp.linspace(0.0, 1.0, _NUM_QUAD // 2 + 1, dtype=t_ref.dtype)
  coarse = -depth + (depth - fine) * u[:-1]
  return xp.concatenate([coarse, -fine * (1.0 - u)], axis=-1)


def _lower_tails(g):
  """`(min(Phi(g), Phi_bar(g)), g >= 0)`: one `ndtr` per node, accurate in both tails."""
  xp = _xp.of(g)
  up = g >= 0
  if xp is _xp.NP:  # the same values with one pass fewer (jax keeps `where`'s gradient at 0)
    return xp.ndtr(-xp.abs(g)), up
  return xp.ndtr(xp.where(up, -g, g)), up


def _masses(g):
  """`[..., N]` masses `Phi(g_{q+1}) - Phi(g_q)` between increasing nodes `g [..., N + 1]`."""
  xp = _xp.of(g)
  low, up = _lower_tails(g)
  lo, hi, ulo, uhi = low[..., :-1], low[..., 1:], up[..., :-1], up[..., 1:]
  both_up = lo - hi  # Phi_bar(g_q) - Phi_bar(g_{q+1})
  both_low = hi - lo
  straddle = 1.0 - lo - hi  # g_q < 0 <= g_{q+1}
  out = xp.where(ulo, both_up, xp.where(uhi, straddle, both_low))
  return xp.maximum(out, 0.0)


def _tail_mass(g, upper):
  """`Phi_bar(g)` (`upper`) or `Phi(g)`, accurate in both tails."""
  xp = _xp.of(g)
  low, up = _lower_tails(g)
  return xp.where(up == upper, low, 1.0 - low)


def _top_mass(d, c):
  """`[B, L, Q + 1]` masses of `g | g > c` on `[c + d_q, c + d_{q+1}]` and above the last node."""
  xp = _xp.of(d, c)
  g = c[None, :, None] + d[:, None, :]  # [B, L, Q + 1]
  mass = xp.concatenate([_masses(g), _tail_mass(g[..., -1:], True)], axis=-1)
  return mass / _tail_mass(c, True)[:, None]


def _rest_mass(d, c):
  """`[B, L, Q + 1]` masses of `g | g < c` below the first node and on `[c + d_q, c + d_{q+1}]`."""
  xp = _xp.of(d, c)
  g = c[None, :, None] + d[:, None, :]
  mass = xp.concatenate([_tail_mass(g[..., :1], False), _masses(g)], axis=-1)
  return mass / _tail_mass(c, False)[:, None]


# Band masses kept on the NumPy path (ladder scales only), per (kind, scale, levels): about
# 250 bands of 33 KB at 64 levels.
_KEPT = _memo.Memo(8 << 20)


def _band_masses(mass_fn, t_ref, d, c, ladder):
  """`mass_fn(d, c)`, band by band: on the NumPy path with ladder scales, each band computed once.

  Each band's rows are the same elementwise computation whether computed alone
  or with others, so a kept band is the one a full evaluation would give.
  """
  xp = _xp.of(t_ref, d, c)
  if xp is not _xp.NP or not ladder:
    return mass_fn(d, c)
  # Keyed on the band's offsets themselves (they fix its nodes, whatever t_ref's dtype or
  # the module constants), each read once into `rows` (another thread may clear the store).
  levels = (mass_fn.__name__, *_memo.key(c), d.dtype.str)
  keys = [(levels, band.tobytes()) for band in d]
  rows = _KEPT.get_many(keys)
  missing = [i for i, row in enumerate(rows) if row is None]
  if missing:
    for i, row in zip(missing, mass_fn(d[missing], c), strict=True):
      rows[i] = _KEPT.put(keys[i], row.copy())  # a copy: a view would keep the whole block alive
  return xp.stack(rows)


def _top_weights(t, c, *, ladder=False):
  """`(x, p, floor)` of the top transforms for tau cells `t [C]` at levels `c [L]`.

  `x [C, Q + 1]` are the node exponents `t d_q`, `p [B, L, Q + 1]` the masses of
  `g | g > c` on the cells `[c + d_q, c + d_{q+1}]` and above the last node
  (read at the left end: the integrand decreases in `g`). `ladder`: band
  scales on a fixed ladder (`_band_scales`), masses kept between calls.
  """
  xp = _xp.of(t, c)
  t_ref = _band_scales(t, ladder)
  d = _top_offsets(t_ref)  # [B, Q + 1]
  norm = _tail_mass(c, True)  # [L]
  mass = _band_masses(_top_mass, t_ref, d, c, ladder)
  x = t[:, None] * xp.repeat(d, t.shape[0] // d.shape[0], axis=0)
  return x, mass, _floor(norm, d.shape[-1])


def _rest_weights(t, c, *, mgf=False, ladder=False):
  """`(x, p, floor)` of the rest transforms (`g | g < c`) for tau cells `t [C]`, levels `c [L]`.

  Laplace transform (`mgf=False`, integrand decreasing): the left end of each
  cell, and the mass below the first node at value 1 (`x = -inf`). Moment
  generating function (`mgf=True`, increasing): the right end, and the mass
  below the first node at its value there. `ladder` as in `_top_weights`.
  """
  xp = _xp.of(t, c)
  depth = xp.maximum(xp.max(c) - _FLOOR, 1.0)  # the first node c - depth <= min(c - 1, _FLOOR)
  t_ref = _band_scales(t, ladder)
  d = _rest_offsets(t_ref, depth)  # [B, Q + 1]
  norm = _tail_mass(c, False)
  mass = _band_masses(_rest_mass, t_ref, d, c, ladder)
  dd = xp.repeat(d, t.shape[0] // d.shape[0], axis=0)
  if mgf:  # columns: below the first node (value at it), then each cell's right end
    x = t[:, None] * dd
  else:
    x = xp.concatenate([xp.full_like(dd[:, :1], -xp.inf), t[:, None] * dd[:, :-1]], axis=-1)
  return x, mass, _floor(norm, d.shape[-1])


def _floor(norm, count):
  """`[L]` bound on the `count` terms of a sum that underflow: each is below `tiny / norm`."""
  xp = _xp.of(norm)
  return count * xp.finfo(norm.dtype).tiny / norm


def _lam_down(log_lam, theta, log_a):
  """`log_lam = theta - log A`, lowered in float32 so that `fl(e^log_lam) A <= fl(e^theta)`.

  A Chernoff bound holds at every `lam >= 0`, but its transforms and its `e^{lam A}`
  term must use the same `lam` (or the term a larger one: it only raises the bound).
  The transforms use `fl(e^log_lam)`; the term uses `fl(e^theta)`. In float32 the two
  logarithms, the subtractions and the exponentials err by a few `u` of their own
  magnitude each (XLA's `log`, `log1p`, `exp` to within 2 ulp, assumed), so `log_lam`
  is lowered by `2 (|theta| + 4 |log A| + 8) u`, more than the sum of those errors.
  In float64 the same errors (1e-14 relative at most) are inside the `1 - 1e-6` margin
  on delta (`_common._safety`), and the value is kept as computed.
  """
  xp = _xp.of(log_lam, theta, log_a)
  dtype = xp.result_type(log_lam)
  if xp.finfo(dtype).eps <= _DEFICIT_EPS:
    return log_lam
  u = 0.5 * xp.finfo(dtype).eps
  return log_lam - 2.0 * (xp.abs(theta) + 4.0 * xp.abs(log_a) + 8.0) * u


def _check_dtype(dtype):
  """Lemma 6's transforms are rounded for float32 and float64 only (bfloat16, float16: tol >= 1)."""
  if dtype not in (_xp.NP.float32, _xp.NP.float64):
    raise TypeError(f"Lemma 6's transforms need float32 or float64 weights, got {dtype}")


def _log_transform(weights, log_lam, sign, ex=None, tc=None):
  """`[C, L, K]` upper bounds on `log E[exp(sign lam e^{t (g - c)}) | g in the side]`.

  `weights = (x, p, floor)` from `_top_weights` / `_rest_weights`, `log_lam [K]`
  (or `[C, 1, K]`, one row per cell); `ex`: `e^x`, when the caller evaluates the
  same nodes at many `log_lam` (Theorem 2R's bisection) and keeps it; `tc = (t [C],
  c [L])`, the weights' tau cells and levels, sizes the float32 allowance (`_allowance`).
  Per `(cell, lam)` the largest node value `exp(sign lam e^{x_ref})` is factored
  out; the rest is `p @ exp(sign lam (e^x - e^{x_ref}))`, one batched matrix
  product per band, plus the underflow floor.
  """
  x, p, floor = weights
  xp = _xp.of(x, p, log_lam)
  _check_dtype(p.dtype)
  if xp.finfo(p.dtype).eps > _DEFICIT_EPS:
    return _log_transform_deficit(weights, log_lam, sign, ex, tc)
  # NumPy writes each step into the array it came from: the same values, without
  # allocating (and faulting in) a fresh [C, N, K] array per step.
  numpy = xp is _xp.NP
  ex, lam = (xp.exp(x) if ex is None else ex), xp.exp(log_lam)
  e = ex[..., None] * lam  # [C, N, K]: lam e^x
  into = {"out": e} if numpy else {}
  if sign < 0:  # a smaller lam e^x only raises the value: still an upper bound
    e = xp.minimum(e, 1e30, **into)
  if numpy:  # rounding is monotone: the extreme of lam e^x is lam times the extreme e^x
    ext = xp.max(ex, axis=1, keepdims=True) if sign > 0 else xp.min(ex, axis=1, keepdims=True)
    ref = (ext[..., None] * lam)[:, 0]  # [C, K] (`lam` may be `[K]` or `[C, 1, K]`)
    ref = xp.minimum(ref, 1e30) if sign < 0 else ref
  else:
    ref = xp.max(e, axis=1) if sign > 0 else xp.min(e, axis=1)  # [C, K]: the largest value's
  # sign (e - ref), as `ref - e` when sign < 0 (the same value: rounding is symmetric)
  v = xp.subtract(*((e, ref[:, None, :]) if sign > 0 else (ref[:, None, :], e)), **into)
  v = xp.exp(v, **into)  # [C, N, K], each <= 1
  s = _band_matmul(xp, p, v)  # [C, L, K]
  into = {"out": s} if numpy else {}
  s = xp.log(xp.add(s, floor[None, :, None], **into), **into)
  return xp.add(s, (sign * ref)[:, None, :], **into)


def _band_matmul(xp, p, v):
  """`[C, L, K]`: node values `v [C, N, K]` times their band's masses `p [B, L, N]`.

  In jax at `Precision.HIGHEST`, since the default on GPU (TF32) and TPU (bfloat16 passes)
  rounds to about 1e-3 relative, far beyond the allowance of `_log_transform_deficit`.
  """
  bands, num_l, num_n = p.shape
  v = v.reshape(bands, -1, num_n, v.shape[-1])
  if xp is _xp.NP:
    s = xp.matmul(p[:, None], v)
  else:
    s = xp.matmul(p[:, None], v, precision=jax.lax.Precision.HIGHEST)
  return s.reshape(-1, num_l, v.shape[-1])


# Machine epsilons above this (float32, bfloat16) take the deficit form below; float64 keeps
# the log of the sum, whose absolute rounding (a few 1e-16, times n - m) is relative rounding.
_DEFICIT_EPS = 1e-10
# Relative rounding allowance, in units of the dtype's unit roundoff u (float32: 2.4e-4), for
# calls without `tc` and the least of `_allowance`. Meant to cover the relative error of the
# sums below: the N + 1 products and their summation (about 2 (N + 1) u), the node values'
# arguments (`t (c + d) - t c`, up to about t (|c| + span) u <= 600 u for t <= 30, |c| <= 9),
# and the cell masses (`ndtr` differences whose cancellation costs at most the Mills ratio
# over the cell width, about 100 u at the finest cells of the rest; the top's first cells are
# finer, but there the node values are all within a few u of the reference value, so their
# errors move the deficit by as little).
_KAPPA = 4096.0
# Relative error of jax's float32 `ndtr` where its value is a normal number, in units of u
# (measured on a dense sweep of [-13, 0]: at most 256 u, pinned by tests/bounds_float32_test.py).
_NDTR_ULPS = 256.0


def _allowance(t, c, x):
  """`[C, L, 1]` relative allowance `tol(t, c)` of the deficit form (float32), at least `kappa u`.

  `u (2 (N + 1) + e (1 + 2 t / max(c, 1)) + 2 (t |c| + t span) + 8)`, `N + 1` nodes, `e =
  _NDTR_ULPS`: the products and their summation; the `ndtr` errors of the cell masses,
  which Abel summation weights by the increments of `1 - v_q` (amplified at most `1 + 2 t
  / c`); the node arguments, `fl(t d_q)` against the cell edge `fl(c + d_q)` (`t span` is
  the largest `|x_q|`); and the rest. It assumes the stated `ndtr` accuracy and XLA's
  `exp`, `expm1`, `log1p` within a few ulp (docs/theory.md, section 3, "Float32").
  """
  xp = _xp.of(t, c, x)
  u = 0.5 * xp.finfo(x.dtype).eps
  t_span = xp.max(xp.where(xp.isfinite(x), xp.abs(x), 0.0), axis=-1)[:, None]  # [C, 1]
  t, c = t[:, None], c[None, :]
  ulps = 2.0 * (x.shape[-1] + 1) + _NDTR_ULPS * (1.0 + 2.0 * t / xp.maximum(c, 1.0)) + 8.0
  ulps = ulps + 2.0 * (t * xp.abs(c) + t_span)
  return (xp.maximum(ulps, _KAPPA) * u)[..., None]


def _log_transform_deficit(weights, log_lam, sign, ex=None, tc=None):
  """`_log_transform` for low-precision dtypes: rounding can only raise the result.

  With the reference value `ref` factored out, each node value is `v_q = exp(-|e_q -
  ref|) <= 1` and the masses sum to exactly 1, so the transform is `sign ref + log(1 -
  D)`, `D = sum_q p_q (1 - v_q)`. Its logarithm near 0 is where `log(sum_q p_q v_q)` loses
  everything: a sum within a few ulp of 1 whose rounding (about `u`, absolute) Lemma 6
  multiplies by `n - m`. So: where `D <= 1/2`, `log1p(-D (1 - kappa u))`, with `1 - v_q =
  -expm1(.)` summed directly (terms that underflow only lower `D`); where `D > 1/2`, the
  log of the sum `log(S (1 + kappa u) + floor)`, whose relative rounding is now relative
  to a result below `log 2`. The moment generating function (`sign > 0`, results `>= 0`)
  uses `log1p(E (1 + kappa u) + floor)`, `E = sum_q p_q expm1(e_q)` unfactored, wherever
  no `e_q` can overflow; above that the factored form plus `kappa u |ref|` (there the
  result is at least `ref + log(mass of the last cell)`, far from 0). Every branch adds a
  relative `kappa u` of the result (`_allowance(t, c)` when `tc = (t, c)` is given),
  meant to cover its rounding: validated against float64 (tests/bounds_float32_test.py,
  tau up to 512), not proven (docs/theory.md, section 3, "Float32", lists the assumptions).
  """
  x, p, floor = weights
  xp = _xp.of(x, p, log_lam)
  tol = _KAPPA * 0.5 * xp.finfo(p.dtype).eps if tc is None else _allowance(*tc, x)  # [C, L, 1]
  ex, lam = (xp.exp(x) if ex is None else ex), xp.exp(log_lam)
  e = ex[..., None] * lam  # [C, N, K]
  if sign < 0:
    e = xp.minimum(e, 1e30)
  ref = xp.max(e, axis=1) if sign > 0 else xp.min(e, axis=1)  # [C, K]
  arg = -xp.abs(e - ref[:, None, :])  # <= 0

  def matmul(v):  # [C, N, K] node values times the band's [B, L, N] masses: [C, L, K]
    return _band_matmul(xp, p, v)

  fl = floor[None, :, None]
  big = xp.log(xp.finfo(p.dtype).max) - 8.0  # e_q below this: expm1 and the sum stay finite
  log_sum = xp.log(matmul(xp.exp(arg)) * (1.0 + tol) + fl)  # <= 0
  if sign > 0:
    small = ref <= big
    total = matmul(xp.expm1(xp.where(small[:, None, :], e, 0.0)))
    out = xp.log1p(total * (1.0 + tol) + fl)
    ref3 = ref[:, None, :]
    return xp.where(small[:, None, :], out, (ref3 + tol * xp.abs(ref3)) + log_sum)
  deficit = matmul(-xp.expm1(arg)) * (1.0 - tol)
  out = xp.where(deficit <= 0.5, xp.log1p(-xp.minimum(deficit, 0.5)), log_sum)
  return out - (ref[:, None, :] - tol * ref[:, None, :])
