"""Validity and tightness of Lemma V (gsparse.bounds.row_value_error_bound), by Monte Carlo.

Lemma V (docs/theory.md, section 4.1) holds for one row with conditional
probability `>= 1 - delta` given the row's scores. Each setting draws R = 256
independent matrices `X` `[n, d]` in float64 and checks two statistics:

* row 0 of each matrix at `delta` (R independent trials);
* every row of each matrix at `delta / n` (union bound; one trial = a matrix).

A valid bound's violation count is stochastically below Binomial(R, delta);
the test fails when a count exceeds the (1 - 1e-4) quantile of that binomial
(scipy), so a correct bound fails a given (setting, statistic) with
probability <= 1e-4 and the whole test (8 settings x 2 statistics) with
probability <= 1.6e-3 (union bound; the seed is fixed, so the outcome is
reproducible). delta in {0.1, 0.3}: a wrong constant shows up as violations.
`python tests/bounds_value_test.py` prints the tightness table of
docs/results/2026-11-30-value-factor-cpu.md.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsparse import bounds as B
from tests import mc_settings

_R = 256  # matrices per setting
_ALPHA = 1e-4  # false-failure probability per (setting, statistic)
_D = 16
_HV = 16
_N = 64


def _interaction(kind: str, key: jax.Array) -> jax.Array:
  return mc_settings.interaction(kind, key, _D, jnp.float64)


def _allowed(delta: float) -> int:
  return mc_settings.allowed_violations(delta, _R, _ALPHA)


@functools.partial(jax.jit, static_argnames=("k",))
def _setting(key, m, w_v, sigma, delta, *, k):
  """Observed `||mu_tail - mu_head||`, Lemma V's factor (row-0 and all-rows levels), max ||v_j||."""
  x = sigma * jax.random.normal(key, (_R, _N, _D), jnp.float64)
  vnorms = B.interaction_norms(w_v)

  def one(xm):
    s = xm @ m @ xm.T
    v = xm @ w_v
    p = jax.nn.softmax(s, axis=-1)
    _, top = jax.lax.top_k(s, k)
    head = jnp.zeros_like(s, bool).at[jnp.arange(_N)[:, None], top].set(True)
    t = jnp.sum(jnp.where(head, 0.0, p), axis=-1)
    o = p @ v
    ok = (jnp.where(head, p, 0.0) / (1.0 - t)[:, None]) @ v
    gap = jnp.linalg.norm(o - ok, axis=-1) / t  # ||mu_tail - mu_head||, Lemma 1 (2)
    tau = sigma * jnp.linalg.norm(xm @ m, axis=-1)
    vi = jnp.linalg.norm(v, axis=-1)

    def bound(level):
      f = lambda r, ta, vn, i: (
        B.row_value_error_bound(
          r, ta, vn, sigma, vnorms, k=k, diag_index=i, delta=level
        ).value_factor
      )
      return jax.vmap(f)(s, tau, vi, jnp.arange(_N))

    return gap, bound(delta), bound(delta / _N), jnp.max(vi)

  return jax.lax.map(one, x)


def _run(settings, key):
  out = []
  for si, (kind, tau, k, delta) in enumerate(settings):
    kk = jax.random.fold_in(key, si)
    m = _interaction(kind, jax.random.fold_in(kk, 0))
    w_v = jax.random.normal(jax.random.fold_in(kk, 1), (_D, _HV), jnp.float64) / math.sqrt(_D)
    sigma = math.sqrt(tau / float(B.interaction_norms(m).frobenius))
    res = _setting(jax.random.fold_in(kk, 2), m, w_v, sigma, delta, k=k)
    out.append(((kind, tau, k, delta), *(np.asarray(r) for r in res)))
  return out


_SETTINGS = [
  (kind, tau, k, delta)
  for kind in ("generic", "pd", "rank1", "nd")
  for tau, delta, k in ((0.5, 0.3, 16), (3.0, 0.1, 4))
]


@pytest.fixture(scope="module")
def results():
  with jax.enable_x64(True):
    return _run(_SETTINGS, jax.random.key(1919))


def test_value_factor_holds_at_high_delta(results):
  for setting, gap, vf_row, vf_all, _ in results:
    delta = setting[3]
    allowed = _allowed(delta)
    viol_row0 = int(np.sum(gap[:, 0] > vf_row[:, 0]))
    viol_all = int(np.sum(np.any(gap > vf_all, axis=-1)))
    assert max(viol_row0, viol_all) <= allowed, (setting, viol_row0, viol_all, allowed)
  # Power: the bound is within 2x of the observed value in some rows of every setting, so a
  # factor-2 error in the Gaussian part or the constants would show up as violations.
  for setting, gap, vf_row, _, _ in results:
    assert np.min(vf_row / gap) < 2.0, (setting, np.min(vf_row / gap))


def test_value_factor_beats_twice_the_max_value_norm(results):
  # The gain over Lemma 1 (4) with the *observed* max_j ||v_j|| (the best case of the old factor).
  gains = []
  for setting, _, _, vf_all, vmax in results:
    gains.append(np.median(2.0 * vmax[:, None] / vf_all))
    assert np.all(np.isfinite(vf_all)), setting
  assert min(gains) > 1.0, gains


def _table():
  rows = _run(_SETTINGS, jax.random.key(1919))
  print(
    "| M | tau | k | delta | violations row 0 / all rows (allowed) | V(delta/n) / obs."
    " median (min, max) | 2 max_j norm(v_j) / obs. median | gain median |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for (kind, tau, k, delta), gap, vf_row, vf_all, vmax in rows:
    v0 = int(np.sum(gap[:, 0] > vf_row[:, 0]))
    va = int(np.sum(np.any(gap > vf_all, axis=-1)))
    ratio = vf_all / gap
    old = 2.0 * vmax[:, None] / gap
    print(
      f"| {kind} | {tau} | {k} | {delta} | {v0} / {va} ({_allowed(delta)}) "
      f"| {np.median(ratio):.2f} ({np.min(ratio):.2f}, {np.max(ratio):.3g}) | {np.median(old):.2f} "
      f"| {np.median(old / ratio):.2f} |"
    )


if __name__ == "__main__":
  with jax.enable_x64(True):
    _table()


def test_row_statistics_match_a_direct_computation():
  # q, |m|, t and V recomputed here in NumPy from the definitions of docs/theory.md 4.1.
  s = np.array([3.0, 1.0, 0.5, -1.0, 2.0, 0.0])
  tau, vi, sigma, i, k, delta = 1.5, 2.0, 0.7, 1, 2, 0.1
  w_v = np.diag([1.0, 0.5, 0.25])
  p = np.exp(s - s.max())
  p /= p.sum()
  head = np.zeros(6, bool)
  head[np.argsort(-s)[:k]] = True
  t = p[~head].sum()
  w = np.where(head, -p / (1 - t), p / t)
  off = np.arange(6) != i
  q = np.sum(w[off] ** 2)
  gap = abs(np.sum(w[off] * s[off])) / tau
  # Laurent-Massart with x = log(1/delta) for A = W_V W_V^T = diag(1, 1/4, 1/16).
  a = np.diag(w_v @ w_v.T)
  x = math.log(1 / delta)
  lm = a.sum() + 2 * np.sqrt(np.sum(a * a)) * math.sqrt(x) + 2 * a.max() * x
  v_lm = abs(w[i]) * vi + sigma * gap * 1.0 + math.sqrt(q * sigma**2 * lm)
  with jax.enable_x64(True):
    res = B.row_value_error_bound(
      s, tau, vi, sigma, B.interaction_norms(w_v), k=k, diag_index=i, delta=delta
    )
  np.testing.assert_allclose(float(res.tail_mass), t, rtol=1e-12)
  np.testing.assert_allclose(float(res.inv_ess), q, rtol=1e-12)
  np.testing.assert_allclose(float(res.mean_gap), gap, rtol=1e-12)
  # gsparse takes the smaller of Laurent-Massart and the effective-rank Chernoff bound.
  assert float(res.value_factor) <= v_lm * (1 + 1e-12)
  assert float(res.value_factor) >= abs(w[i]) * vi + sigma * gap + math.sqrt(q * sigma**2 * a.sum())
  np.testing.assert_allclose(float(res.error), t * float(res.value_factor), rtol=1e-12)


def test_bad_arguments_name_the_argument():
  vn = B.interaction_norms(jnp.eye(3))
  s = jnp.zeros(5)
  call = lambda **kw: B.row_value_error_bound(
    **{"scores": s, "tau": 1.0, "diag_value_norm": 1.0, "sigma": 1.0, "value_norms": vn}
    | {"k": 2, "diag_index": 0, "delta": 0.1}
    | kw
  )
  for name, bad in (("k", 6), ("k", 0), ("diag_index", 5), ("delta", 1.0), ("tau", -1.0)):
    with pytest.raises(ValueError, match=name):
      call(**{name: bad})
  with pytest.raises(ValueError, match="scores"):
    call(scores=jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match="inv_ess"):
    jax.jit(lambda q: B.value_factor_bound(1.0, vn, inv_ess=-1.0, mean_gap=q, delta=0.1))(0.0)
  with pytest.raises(ValueError, match="sigma"):
    B.value_factor_bound(0.0, vn, inv_ess=1.0, mean_gap=0.0, delta=0.1)
