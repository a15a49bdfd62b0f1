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

from gsparse.bounds import _xp

_NUM_QUAD = 64  # Riemann cells per truncated transform
_FLOOR = -9.0  # the rest's nodes reach below min(c - 1, _FLOOR); below, the integrand is <= 1
_SPAN = 14.0  # nodes resolve g - c on the scale 1/t: span _SPAN / t (at most 10 above c)
_BAND = 8  # tau cells per band of shared offsets (where the number of cells divides)


def _band_scales(t):
  """`[B]` reference scale of each band of consecutive (increasing) tau cells: `sqrt(first last)`.

  A cell with scale `t` then reads its band's nodes at `e^{t d_q}`, `t / t_ref`
  within the band's ratio either way; any offsets give a valid sum.
  """
  xp = _xp.of(t)
  size = _BAND if t.shape[0] % _BAND == 0 else 1
  bands = t.reshape(-1, size)
  return xp.sqrt(bands[:, 0] * bands[:, -1])


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


def _top_weights(t, c):
  """`(x, p, floor)` of the top transforms for tau cells `t [C]` at levels `c [L]`.

  `x [C, Q + 1]` are the node exponents `t d_q`, `p [B, L, Q + 1]` the masses of
  `g | g > c` on the cells `[c + d_q, c + d_{q+1}]` and above the last node
  (read at the left end: the integrand decreases in `g`).
  """
  xp = _xp.of(t, c)
  d = _top_offsets(_band_scales(t))  # [B, Q + 1]
  g = c[None, :, None] + d[:, None, :]  # [B, L, Q + 1]
  norm = _tail_mass(c, True)  # [L]
  mass = xp.concatenate([_masses(g), _tail_mass(g[..., -1:], True)], axis=-1)
  x = t[:, None] * xp.repeat(d, t.shape[0] // d.shape[0], axis=0)
  return x, mass / norm[:, None], _floor(norm, d.shape[-1])


def _rest_weights(t, c, *, mgf=False):
  """`(x, p, floor)` of the rest transforms (`g | g < c`) for tau cells `t [C]`, levels `c [L]`.

  Laplace transform (`mgf=False`, integrand decreasing): the left end of each
  cell, and the mass below the first node at value 1 (`x = -inf`). Moment
  generating function (`mgf=True`, increasing): the right end, and the mass
  below the first node at its value there.
  """
  xp = _xp.of(t, c)
  depth = xp.maximum(xp.max(c) - _FLOOR, 1.0)  # the first node c - depth <= min(c - 1, _FLOOR)
  d = _rest_offsets(_band_scales(t), depth)  # [B, Q + 1]
  g = c[None, :, None] + d[:, None, :]
  norm = _tail_mass(c, False)
  mass = xp.concatenate([_tail_mass(g[..., :1], False), _masses(g)], axis=-1)
  dd = xp.repeat(d, t.shape[0] // d.shape[0], axis=0)
  if mgf:  # columns: below the first node (value at it), then each cell's right end
    x = t[:, None] * dd
  else:
    x = xp.concatenate([xp.full_like(dd[:, :1], -xp.inf), t[:, None] * dd[:, :-1]], axis=-1)
  return x, mass / norm[:, None], _floor(norm, d.shape[-1])


def _floor(norm, count):
  """`[L]` bound on the `count` terms of a sum that underflow: each is below `tiny / norm`."""
  xp = _xp.of(norm)
  return count * xp.finfo(norm.dtype).tiny / norm


def _log_transform(weights, log_lam, sign, ex=None):
  """`[C, L, K]` upper bounds on `log E[exp(sign lam e^{t (g - c)}) | g in the side]`.

  `weights = (x, p, floor)` from `_top_weights` / `_rest_weights`, `log_lam [K]`
  (or `[C, 1, K]`, one row per cell); `ex`: `e^x`, when the caller evaluates the
  same nodes at many `log_lam` (Theorem 2R's bisection) and keeps it.
  Per `(cell, lam)` the largest node value `exp(sign lam e^{x_ref})` is factored
  out; the rest is `p @ exp(sign lam (e^x - e^{x_ref}))`, one batched matrix
  product per band, plus the underflow floor.
  """
  x, p, floor = weights
  xp = _xp.of(x, p, log_lam)
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
  bands, num_l, num_n = p.shape
  v = v.reshape(bands, -1, num_n, v.shape[-1])
  s = xp.matmul(p[:, None], v).reshape(-1, num_l, v.shape[-1])  # [C, L, K]
  into = {"out": s} if numpy else {}
  s = xp.log(xp.add(s, floor[None, :, None], **into), **into)
  return xp.add(s, (sign * ref)[:, None, :], **into)
