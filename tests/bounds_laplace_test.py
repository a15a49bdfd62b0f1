"""Lemma 6's transforms as matrix products (`gsparse/bounds/_laplace.py`): valid and as tight.

Validity: at random `(t, c, lam)` each fast transform is at least a rigorous
*lower* Riemann sum of the exact one (right ends of a decreasing integrand on
20001 nodes, mass beyond the nodes dropped), computed here in float64 with
SciPy. Tightness: the certified k of Theorems 1 and 1R with the fast
transforms against the direct evaluation they replaced (the `[C, L, K, Q]`
log-space Riemann sums with per-cell, per-level nodes, kept below as the
reference), on a grid of settings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sps

import gsparse.bounds as B
from gsparse.bounds import _laplace, row, sparsity
from gsparse.bounds._common import _log_phi_diff
from gsparse.bounds._gcells import _first_admissible_m

# ------------------------------------------------ the direct evaluation (reference)


def _old_transform(log_lam, tau, g, shift, *, tail_hi):
  """The former `[..., K]` log upper Riemann sum of `E[exp(-lam e^{tau (g - shift)}) 1{...}]`."""
  x = tau[..., None] * (g - shift[..., None])
  lw = _log_phi_diff(g[..., 1:], g[..., :-1])
  parts = [-np.exp(log_lam[..., :, None] + x[..., None, :-1]) + lw[..., None, :]]
  if tail_hi:
    parts.append((-np.exp(log_lam + x[..., -1:]) + sps.log_ndtr(-g[..., -1:]))[..., None])
  return sps.logsumexp(np.concatenate(parts, axis=-1), axis=-1)


def _old_parts(eps, ta, tb, c, **_):
  """The former `_chernoff_parts`: nodes per (cell, level), `[C, L, K, Q]` exponentials."""
  cc = np.broadcast_to(c[1:], (ta.shape[0], c.shape[0] - 1))
  a, b = np.broadcast_to(ta[:, None], cc.shape), np.broadcast_to(tb[:, None], cc.shape)
  theta = np.linspace(-3.0, 9.0, 24)
  log_lam = np.broadcast_to(theta - (np.log1p(-eps) - np.log(eps)), cc.shape + theta.shape)
  u = np.linspace(0.0, 1.0, 65)
  top_g = cc[..., None] + np.minimum(10.0, 14.0 / np.maximum(a, 1e-6))[..., None] * u * u
  top = _old_transform(log_lam, a, top_g, cc, tail_hi=True) - sps.log_ndtr(-cc)[..., None]
  lo = np.minimum(cc - 1.0, -9.0)
  mid = np.clip(cc - 14.0 / np.maximum(b, 1e-6), lo, cc)
  h = np.linspace(0.0, 1.0, 33)
  g = np.concatenate(
    [lo[..., None] + (mid - lo)[..., None] * h[:-1], mid[..., None] + (cc - mid)[..., None] * h],
    axis=-1,
  )
  rest = _old_transform(log_lam, b, g, cc, tail_hi=False)
  rest = np.logaddexp(rest, sps.log_ndtr(g[..., 0])[..., None]) - sps.log_ndtr(cc)[..., None]
  return np.exp(theta), np.minimum(top, 0.0), np.minimum(rest, 0.0)


# ------------------------------------------------------------------------ validity


def _lower_sum(t, c, log_lam, kind, num=20000):
  """A lower bound on the exact log transform: a lower Riemann sum, mass outside dropped."""
  u = np.linspace(0.0, 1.0, num + 1)
  if kind == "top":
    g = c + min(12.0, 40.0 / max(t, 1e-6)) * u * u
    val = -np.exp(log_lam + t * (g[1:] - c))  # right ends: the integrand decreases
    return sps.logsumexp(_log_phi_diff(g[1:], g[:-1]) + val) - sps.log_ndtr(-c)
  g = c - 30.0 * (1.0 - u)
  if kind == "rest":
    val = -np.exp(log_lam + t * (g[1:] - c))
  else:  # the moment generating function: increasing, left ends
    val = np.exp(log_lam + t * (g[:-1] - c))
  return sps.logsumexp(_log_phi_diff(g[1:], g[:-1]) + val) - sps.log_ndtr(c)


def _fast(t, c, log_lam, kind, dtype):
  t, c, log_lam = (np.asarray([v], dtype) for v in (t, c, log_lam))
  with np.errstate(all="ignore"):
    if kind == "top":
      return _laplace._log_transform(_laplace._top_weights(t, c), log_lam, -1)[0, 0, 0]
    w = _laplace._rest_weights(t, c, mgf=kind == "mgf")
    return _laplace._log_transform(w, log_lam, 1 if kind == "mgf" else -1)[0, 0, 0]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fast_transforms_bound_the_exact_ones_from_above(dtype):
  # 150 random points per kind: t = 0, t in (0, 1) and t in (0, 30); c in the G range.
  u = np.asarray(jax.random.uniform(jax.random.key(6), (150, 5)), np.float64)
  t = np.where(u[:, 0] < 0.2, 0.0, np.where(u[:, 0] < 0.5, u[:, 1], 30.0 * u[:, 1]))
  c = -3.0 + 10.5 * u[:, 2]
  tol = 1e-9 if dtype == np.float64 else 1e-5  # rounding (measured: 1.2e-15 and 4.9e-7)
  for i in range(t.shape[0]):
    for kind, log_lam in (("top", -15 + 27 * u[i, 3]), ("rest", -15 + 27 * u[i, 3])) + (
      ("mgf", -15 + 18 * u[i, 4]),
    ):
      with np.errstate(all="ignore"):
        exact_lo = _lower_sum(t[i], c[i], log_lam, kind)
      fast = float(_fast(t[i], c[i], log_lam, kind, dtype))
      assert fast >= exact_lo - tol * max(1.0, abs(exact_lo)), (kind, t[i], c[i], log_lam)


# ------------------------------------------------------------------------ tightness


def test_row_k_within_two_of_the_direct_evaluation():
  # Theorem 1R (one tau cell, 256 G cells) on 36 settings; measured: 35 equal, one -1.
  diffs = []
  for n in (64, 1024, 8192):
    nm1 = np.float64(n - 1)
    c = row._g_grid(nm1, row._NUM_G_CELLS, np.float64)
    for tau in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0):
      for eps in (0.01, 0.1):
        ks = []
        for parts_fn in (_old_parts, row._chernoff_parts):
          e, t = np.float64(eps), np.array([tau])
          with np.errstate(all="ignore"):
            parts = parts_fn(e, t, t, c)

            def fail(m, cells=None, parts=parts, e=e, nm1=nm1, c=c):
              return row._chernoff_fail(nm1, m, e, c, parts)

            ks.append(float(_first_admissible_m(np.float64(n), fail, np.float64(1e-4), 0)))
        diffs.append(ks[1] - ks[0])
  assert min(diffs) >= -2 and max(diffs) <= 1, sorted(diffs)


def test_apriori_k_within_two_of_the_direct_evaluation(monkeypatch):
  # Theorem 1 (64 tau cells in 8 bands) on 6 settings; measured: five equal, one +1 (n = 4096, sigma = 0.5: 36 -> 37).
  norms = B.InteractionNorms(3.0, 1.2, 2.0)
  settings = [(n, s, 0.01) for n in (256, 4096) for s in (0.5, 1.0, 2.0)]
  fast = [float(B.sparsity_bound(n, s, norms, eps=e).k) for n, s, e in settings]
  monkeypatch.setattr(sparsity, "_chernoff_parts", _old_parts)
  direct = [float(B.sparsity_bound(n, s, norms, eps=e).k) for n, s, e in settings]
  diffs = np.asarray(fast) - np.asarray(direct)
  assert diffs.min() >= -2 and diffs.max() <= 1, list(zip(settings, direct, fast, strict=True))


# ------------------------------------------------------------- float32 rounding


def _cell_log_bounds(nm1, m, eps, tau, c):
  """`[C, L]` log of Lemma 6's cell bounds before the clip at 0: `min_lam log B_l(lam)`."""
  xp = jnp if isinstance(c, jax.Array) else np
  lam_a, top, rest = row._chernoff_parts(eps, tau, tau, c)
  return xp.min(lam_a + (m - 1.0) * top + (nm1 - m) * rest, axis=-1)


def test_float32_cell_bounds_are_at_least_the_float64_ones_up_to_n_1e8():
  # Lemma 6's rest transform is a log of a sum near 1 that the bound multiplies by n - m:
  # float32 rounding there lowered a cell bound by up to e^-660 at n = 1e8 (now the deficit
  # form with an upward allowance, `_laplace._log_transform_deficit`). Every input is a
  # float32 number, so both evaluations see the same cells; float32 may only be higher, up
  # to the relative rounding of the final sum of three terms (1e-5 of its size).
  f32 = jax.jit(_cell_log_bounds)
  taus = np.float32([0.5, 2.0, 4.0, 8.0])
  for nm1 in (1e3, 1e5, 1e6, 1e8):
    c = np.asarray(row._g_grid(np.float32(nm1), row._NUM_G_CELLS, np.float32))
    for m, eps in ((2.0, 0.3), (20.0, 0.01), (200.0, 0.001)):
      args32 = (np.float32(nm1), np.float32(m), np.float32(eps), taus, c)
      got = np.asarray(f32(*(jnp.asarray(a) for a in args32)), np.float64)
      with np.errstate(all="ignore"):
        want = _cell_log_bounds(*(np.asarray(a, np.float64) for a in args32))
      slack = got - want + 1e-5 * (1.0 + np.abs(want))
      assert slack.min() >= 0.0, (nm1, m, eps, (got - want).min())
