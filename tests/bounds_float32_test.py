"""Traced float32 evaluation of the bounds: never below the float64 value (docs/theory.md, section 3).

Each test here fails on the code before its fix (checked with `git stash`).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sps

import gsparse.bounds as B
from gsparse.bounds import _laplace, _memo, _xp, row, row_tail, sparsity


def _record_log_lams(monkeypatch) -> list:
  """Records the `log_lam` of every later `_laplace._log_transform` call (in call order)."""
  seen = []
  real = _laplace._log_transform
  monkeypatch.setattr(
    _laplace,
    "_log_transform",
    lambda w, log_lam, *a, **k: seen.append(log_lam) or real(w, log_lam, *a, **k),
  )
  return seen


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


def _dot_precisions(jaxpr):
  """`precision` of every `dot_general` in a jaxpr and the jaxprs nested in it (loops, conds)."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(eqn.params["precision"])
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          out += _dot_precisions(sub)
  return out


def test_the_traced_transforms_multiply_at_highest_precision():
  # At the default precision a GPU multiplies float32 in TF32 (about 1e-3 relative), far
  # beyond the rounding allowance of Lemma 6's deficit form: every matrix product of the
  # traced bounds must ask for HIGHEST.
  f32 = jnp.float32
  norms = B.InteractionNorms(f32(3.0), f32(1.2), f32(2.0))
  calls = [
    lambda n, s, e: B.sparsity_bound(n, s, norms, eps=e).k,
    lambda n, s, e: B.causal_sparsity_bound(n, s, norms, eps=e).value,
    lambda n, s, e: B.row_sparsity_bound(n, s, eps=e, delta=1e-4),
    lambda n, s, e: B.row_tail_bound(n, s, k=f32(8.0), delta=e),
  ]
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  for call in calls:
    prec = _dot_precisions(jax.make_jaxpr(call)(f32(1e6), f32(1.0), f32(0.01)).jaxpr)
    assert prec, "no matrix product found"
    assert all(p == highest for p in prec), prec


def test_the_transforms_lambda_times_a_is_at_most_the_exponent_term(monkeypatch):
  # Lemma 6 (and Theorem 2R's top) evaluate the transforms at fl(e^{theta - log A}) and add
  # fl(e^theta) for lam A; the bound is a Chernoff bound only if the transforms' lam times A
  # is at most the term (float32 rounding made it exceed it by up to 0.0075 before).
  seen = _record_log_lams(monkeypatch)
  f32 = jnp.float32
  c = row._g_grid(f32(1e4), 8, f32)
  tau = jnp.asarray([1.0, 4.0], f32)
  for eps in np.float32(np.logspace(-5.5, np.log10(0.5), 60)):
    seen.clear()
    lam_a = row._chernoff_parts(f32(eps), tau, tau, c)[0]
    row_tail._tail_cell_bounds(f32(100.0), f32(4.0), tau, jnp.full(2, eps), c)
    term = np.asarray(lam_a, np.float64)  # fl(e^theta), the same in both theorems
    log_a = np.log1p(-np.float64(eps)) - np.log(np.float64(eps))
    for log_lam in seen[:2] + seen[3:4]:  # Lemma 6's top and rest, Theorem 2R's top
      lam = np.asarray(jnp.exp(log_lam), np.float64).reshape(-1, term.size)
      assert (lam * np.exp(log_a) <= term).all(), (eps, (lam * np.exp(log_a) - term).max())


def test_the_transforms_refuse_half_precision():
  # The deficit form's allowance is kappa u: >= 1 in bfloat16 and float16, no bound at all.
  c = jnp.linspace(-1.0, 2.0, 5)
  w = _laplace._top_weights(jnp.asarray([1.0]), c)
  for dtype in (jnp.bfloat16, jnp.float16):
    half = tuple(jnp.asarray(v, dtype) for v in w)
    with pytest.raises(TypeError, match="float32 or float64"):
      _laplace._log_transform(half, jnp.zeros(3, dtype), -1)


# The float32 review's points: n from 1e5 (where jax's float32 betainc starts to drift) to
# 1e8, norms (3, 1.2, 2), sigma 0.5 / 1 / 1.5, eps 0.1 / 0.01 / 0.001.
_POINTS = np.asarray(
  list(itertools.product((1e5, 1e6, 1e7, 1e8), (0.5, 1.0, 1.5), (0.1, 0.01, 0.001))), np.float32
).T


def _float64_numpy(fn):
  """`fn(n, sigma, eps)` at each point, eager on Python numbers with x64: float64 NumPy."""
  with jax.enable_x64(True):
    return np.asarray([float(fn(int(n), float(s), float(e))) for n, s, e in _POINTS.T])


def _float32_traced(fn):
  return np.asarray(jax.jit(jax.vmap(fn))(*(jnp.asarray(v) for v in _POINTS)))


def test_traced_float32_theorem_1_k_is_at_least_the_float64_k():
  # jax's float32 betainc at n >= 1e7 made k 2 against 19 (n = 1e8, sigma 0.5, eps 1e-3).
  norms32 = B.InteractionNorms(*(jnp.float32(v) for v in (3.0, 1.2, 2.0)))
  got = _float32_traced(lambda n, s, e: B.sparsity_bound(n, s, norms32, eps=e).k)
  want = _float64_numpy(
    lambda n, s, e: B.sparsity_bound(n, s, B.InteractionNorms(3.0, 1.2, 2.0), eps=e).k
  )
  assert (got >= want).all(), np.stack([*_POINTS, got, want])[:, got < want]


@pytest.mark.slow
def test_traced_float32_theorems_1c_and_1r_are_at_least_the_float64_values():
  norms32 = B.InteractionNorms(*(jnp.float32(v) for v in (3.0, 1.2, 2.0)))
  norms = B.InteractionNorms(3.0, 1.2, 2.0)
  causal = lambda nm: lambda n, s, e: B.causal_sparsity_bound(n, s, nm, eps=e).value
  got, want = _float32_traced(causal(norms32)), _float64_numpy(causal(norms))
  assert (got >= want).all(), np.stack([*_POINTS, got, want])[:, got < want]
  # Theorem 1R with tau = 2 sigma (sigma's role: the row's score scale).
  rowk = lambda n, s, e: B.row_sparsity_bound(n, 2.0 * s, eps=e, delta=1e-4)
  got, want = _float32_traced(rowk), _float64_numpy(rowk)
  assert (got >= want).all(), np.stack([*_POINTS, got, want])[:, got < want]


def test_float32_betainc_above_1e5_trials_is_at_least_the_float64_value():
  # Above 1e5 trials the float32 namespace's betainc is a Chernoff bound; against SciPy's
  # float64 value at the same float32 arguments, 3 x 3000 random points (log-uniform a,
  # x within 8 standard deviations below the mean a / N, or log-uniform).
  rng = np.random.default_rng(3)
  for n in (2e5, 1e7, 1e8):
    a = np.clip(np.floor(np.exp(rng.uniform(0.0, np.log(n), 3000))), 1, n)
    a = np.where(rng.random(3000) < 0.3, n + 1.0 - a, a).astype(np.float32)  # some lower tails
    b = (np.float32(n) - a + 1.0).astype(np.float32)
    q = a / (a + b.astype(np.float64) - 1.0)
    near = q - np.sqrt(q * (1.0 - q) / n) * rng.uniform(0.0, 8.0, 3000)
    x = np.where(rng.random(3000) < 0.5, near, np.exp(rng.uniform(np.log(1e-9), 0.0, 3000)))
    x = np.clip(x, 1e-12, 1.0).astype(np.float32)
    got = np.asarray(jax.jit(_xp.JNP.betainc)(a, b, x), np.float64)
    want = sps.betainc(a.astype(np.float64), b.astype(np.float64), x.astype(np.float64))
    # Below float32's smallest normal number the value underflows (to 0 or a subnormal).
    tiny = np.finfo(np.float32).tiny
    bad = got < np.where(want > tiny, want, 0.0)
    assert not bad.any(), (n, a[bad], b[bad], x[bad], got[bad], want[bad])


def test_float32_ndtr_accuracy_that_the_deficit_allowance_assumes():
  # docs/theory.md section 3 "Float32" states these accuracies of jax's float32 ndtr (in units
  # of u = 2^-24, relative to SciPy's float64 value at the same float32 argument) as an
  # assumption of Lemma 6's allowance; a jax whose ndtr is worse must fail here. Dense sweep:
  # 1.3e6 points on [-13, 0] (step 1e-5), where the value is a normal float32.
  g = np.linspace(-13.0, 0.0, 1_300_001).astype(np.float32)
  got = np.asarray(jax.jit(jax.scipy.special.ndtr)(g), np.float64)
  want = sps.ndtr(g.astype(np.float64))
  normal = want > np.finfo(np.float32).tiny
  err = np.abs(got / want - 1.0) * 2.0**24
  for lo, hi, bound in ((-1, 0, 8), (-3, -1, 17), (-6, -3, 61), (-9, -6, 109), (-13, -9, 256)):
    sel = (g >= lo) & (g <= hi) & normal
    assert err[sel].max() <= bound, (lo, hi, err[sel].max())


def test_float32_lemma_6_transforms_are_at_least_float64_up_to_tau_512(monkeypatch):
  # Theorem 1's setup (16 lambda, ladder band scales) with tau cells up to 512: each float32
  # transform must be at least the float64 deficit form on the same float32 inputs (cells,
  # levels, and the lambda the float32 call used). The constant allowance kappa u fell
  # 16 u short at tau = 512 (review of the float32 path).
  seen = _record_log_lams(monkeypatch)
  # 12 cells (not a multiple of 8: each cell is its own band, nodes at its own scale).
  taus = jnp.asarray([0.05, 0.3, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512], jnp.float32)
  for nm1 in (1e3, 1e5, 1e8):
    c = row._g_grid(jnp.float32(nm1), row._NUM_G_CELLS, jnp.float32)
    for eps in (0.3, 1e-2, 1e-3, 1e-5):
      seen.clear()
      _, top, rest = row._chernoff_parts(
        jnp.float32(eps), taus, taus, c, ladder=True, num_lambda=16
      )
      log_lam = np.asarray(seen[0], np.float64)
      t64, c64 = np.asarray(taus, np.float64), np.asarray(c[1:], np.float64)
      for got, weights in (
        (top, _laplace._top_weights(t64, c64, ladder=True)),
        (rest, _laplace._rest_weights(t64, c64, ladder=True)),
      ):
        got = np.asarray(got, np.float64)
        want = np.minimum(_laplace._log_transform_deficit(weights, log_lam, -1), 0.0)
        short = (want - got) / np.maximum(-want, 1e-300) * 2.0**24  # in u of the deficit
        assert (got >= want).all(), (nm1, eps, short.max())


def test_kept_band_masses_follow_the_offsets_and_survive_a_concurrent_clear(monkeypatch):
  # The NumPy store of ladder band masses (`_laplace._band_masses`) is keyed on the band's
  # offsets: a changed node layout (here `_SPAN`) at the same scale is not read back stale.
  t = np.geomspace(0.5, 8.0, 8)
  c = row._g_grid(np.float64(1023.0), 16, np.float64)[1:]
  _laplace._KEPT.clear()
  _laplace._top_weights(t, c, ladder=True)
  monkeypatch.setattr(_laplace, "_SPAN", 12.0)
  kept = _laplace._top_weights(t, c, ladder=True)[1]
  _laplace._KEPT.clear()
  np.testing.assert_array_equal(kept, _laplace._top_weights(t, c, ladder=True)[1])

  # A clear() by another thread between the read of a key and its use must not raise.
  class ClearedAfterEachRead(_memo.Memo):
    def get_many(self, keys):
      out = super().get_many(keys)
      self.clear()
      return out

  monkeypatch.setattr(_laplace, "_KEPT", ClearedAfterEachRead(8 << 20))
  _laplace._top_weights(t, c, ladder=True)
  np.testing.assert_array_equal(kept, _laplace._top_weights(t, c, ladder=True)[1])


def test_betainc_rows_store_overflow_keeps_the_rows_it_reads_back(monkeypatch):
  # A call with some rows kept and enough new ones to empty the store read the kept ones
  # back after the store was emptied (KeyError; seen at n = 1e8 after a long session).
  x = np.linspace(0.1, 0.9, 5)
  monkeypatch.setattr(_xp._ROWS, "max_bytes", 6 * 2 * x.nbytes)  # 6 rows and their grid keys
  _xp._ROWS.clear()
  _xp.NP.betainc_rows(np.arange(5.0) + 1.0, 1.0, x)
  a = np.arange(4.0) + 4.0  # 4 and 5 kept, 6 and 7 new: 5 + 2 > 6 evicts the oldest rows
  np.testing.assert_array_equal(_xp.NP.betainc_rows(a, 1.0, x), sps.betainc(a[:, None], 1.0, x))


def test_betainc_rows_store_never_holds_more_than_its_limit(monkeypatch):
  # A single call with more new rows than the store holds emptied it and then kept all of
  # them (review of the NumPy caches): the limit bounds the store's memory only if such a
  # call computes its rows without keeping them.
  x = np.linspace(0.1, 0.9, 5)
  monkeypatch.setattr(_xp._ROWS, "max_bytes", 6 * 2 * x.nbytes)  # 6 rows and their grid keys
  _xp._ROWS.clear()
  a = np.arange(9.0) + 1.0
  np.testing.assert_array_equal(_xp.NP.betainc_rows(a, 2.0, x), sps.betainc(a[:, None], 2.0, x))
  assert len(_xp._ROWS) <= 6 and _xp._ROWS.nbytes <= _xp._ROWS.max_bytes
