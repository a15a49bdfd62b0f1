"""Tests of gsparse.bounds: unit properties, an independent reference, and a small Monte Carlo.

Compilation dominates the run time (each bound is one jitted program), so the
tests share a few calls of fixed shapes.
"""

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import gsparse
from gsparse import bounds as B
from gsparse._bounds_mc import matrix_stats


def _iso_norms(c: float, d: int) -> B.InteractionNorms:
  """Norms of M = c I_d (effective rank d, so the tau interval is narrow)."""
  return B.InteractionNorms(c * math.sqrt(d), c, c * c * math.sqrt(d))


# ---------------------------------------------------------------- binomial quantile


def _scipy_upper_quantile(n, p, delta):
  # smallest m with P(X > m) <= delta, from scipy's survival function (independent code).
  m = np.arange(0, n + 1)
  sf = scipy.stats.binom.sf(m, n, p)
  return int(m[np.argmax(sf <= delta)])


def test_binomial_quantile_matches_scipy_float64():
  jax.config.update("jax_enable_x64", True)
  try:
    rng = np.random.default_rng(0)
    n = rng.integers(1, 9000, size=24)
    p = 10.0 ** rng.uniform(-5, -0.05, size=24)
    delta = 10.0 ** rng.uniform(-10, -1, size=24)
    got = np.asarray(B.binomial_upper_quantile(n, p, delta))
    assert got.dtype == np.float64
    want = np.array([_scipy_upper_quantile(*a) for a in zip(n, p, delta, strict=True)])
    np.testing.assert_array_equal(got, want)
  finally:
    jax.config.update("jax_enable_x64", False)


def test_binomial_quantile_float32_is_conservative():
  rng = np.random.default_rng(1)
  n = rng.integers(1, 9000, size=24)
  p = 10.0 ** rng.uniform(-5, -0.05, size=24)
  delta = 10.0 ** rng.uniform(-9, -1, size=24)
  got = np.asarray(B.binomial_upper_quantile(n, p.astype(np.float32), delta))
  lo = np.array([_scipy_upper_quantile(*a) for a in zip(n, p, delta, strict=True)])
  hi = np.array([_scipy_upper_quantile(*a) for a in zip(n, p, delta / 4, strict=True)])
  # float32 compares against delta/2: never below the exact quantile, at most that of delta/4.
  assert np.all(got >= lo) and np.all(got <= hi), (got, lo, hi)


# ---------------------------------------------------------------- Theorem 1 properties

# One batched call of a fixed length (8) serves several tests.
_N8 = np.array([1024.0] * 8)


@pytest.fixture(scope="module")
def eps_sweep():
  norms = _iso_norms(1.0, 128)
  eps = np.geomspace(0.002, 0.3, 8)
  # sigma^2 * ||M||_F = 8 / sqrt(128) * sqrt(128) ... tau ~ 8: a collapsed regime.
  sigma = math.sqrt(8.0 / norms.frobenius)
  return eps, B.sparsity_bound(_N8, sigma, norms, eps=eps)


def test_sparsity_monotone_in_eps(eps_sweep):
  _, sb = eps_sweep
  k = np.asarray(sb.k)
  assert np.all(np.diff(k) <= 0), k
  assert np.all(k >= 1)


def test_sparsity_beats_trivial_when_collapsed(eps_sweep):
  eps, sb = eps_sweep
  # Informative for small eps; for eps >= 0.07 the trivial floor(1/eps) <= 14 is already tight.
  assert np.all(np.asarray(sb.informative)[:5]), (np.asarray(sb.k_gauss), np.asarray(sb.trivial_k))
  assert np.all(np.asarray(sb.k_gauss) <= np.asarray(sb.trivial_k) + 2)
  eps32 = eps.astype(np.float32)  # the bound computes in float32 here
  np.testing.assert_array_equal(np.asarray(sb.trivial_k), _trivial_k_exact(eps32, 1024))
  # At eps = 0.01 and tau ~ 8 (n = 1024) the Gaussian bound beats 1/eps = 100.
  k01 = float(
    B.sparsity_bound(
      1024, float(np.sqrt(8.0 / _iso_norms(1.0, 128).frobenius)), _iso_norms(1.0, 128), eps=0.01
    ).k
  )
  assert k01 < 99, k01  # informative: below the trivial ceil(1/eps) - 1 = 99


def _trivial_k_exact(eps, n):
  """min(max{K : K eps < 1}, n) in exact rational arithmetic on the float values of eps."""
  out = []
  for e in np.ravel(eps):
    f = fractions.Fraction(float(e))
    k = int(1 / f)  # floor(1/eps)
    out.append(k - 1 if k * f >= 1 else k)
  return np.minimum(np.reshape(out, np.shape(eps)), n)


@pytest.mark.parametrize("x64", [False, True])
def test_trivial_k_is_strict_fact_1(x64):
  # Regression: trivial_k was floor(1/eps), one too many when 1/eps is an integer (K eps < 1
  # strictly): eps = 0.25 allows at most 3 entries above it, not 4. The core is checked under
  # jit in both precisions (sparsity_bound's field is checked in the test above).
  from gsparse.bounds.sparsity import _trivial_k

  with jax.enable_x64(x64):
    dt = np.float64 if x64 else np.float32
    eps = np.array([0.25, 0.5, 0.125, 0.01, 0.3, 0.07, 1 / 3, 0.2, 1e-3, 0.999], dt)
    got = np.asarray(jax.jit(_trivial_k)(dt(10**6), jnp.asarray(eps)))
    np.testing.assert_array_equal(got, _trivial_k_exact(eps, 10**6))
    assert got[0] == 3 and got[1] == 1 and got[2] == 7
    # K eps < 1 holds for the reported value and fails for one more (exact arithmetic).
    for e, t in zip(eps, got, strict=True):
      assert fractions.Fraction(int(t)) * fractions.Fraction(float(e)) < 1
      assert fractions.Fraction(int(t) + 1) * fractions.Fraction(float(e)) >= 1


def test_sparsity_diffuse_regime_and_trivial_flag():
  norms = _iso_norms(1.0, 128)
  tau = np.array([0.3, 0.3, 30.0, 30.0, 0.3, 0.3, 0.3, 0.3])
  sigma = np.sqrt(tau / norms.frobenius)
  eps = np.array([0.01, 0.5, 0.01, 0.5, 0.01, 0.01, 0.01, 0.01])
  n = np.array([8192, 8192, 256, 256, 256, 1024, 4096, 1])
  sb = B.sparsity_bound(n, sigma, norms, eps=eps)
  k = np.asarray(sb.k)
  # Diffuse rows (tau = 0.3) with eps >> 1/n: only the diagonal-sized entries, k tiny.
  assert k[0] <= 2 and k[1] <= 1
  assert np.all(k[5:7] <= 3) and k[4] < 100
  # n = 1: one entry, k = 1.
  assert k[7] == 1
  # Never above the trivial value, and `informative` is exactly k_gauss < trivial.
  assert np.all(k <= np.asarray(sb.trivial_k))
  np.testing.assert_array_equal(
    np.asarray(sb.informative), np.asarray(sb.k_gauss) < np.asarray(sb.trivial_k)
  )


def test_sparsity_monotone_in_delta_and_norm_in_collapsed_regime():
  norms = _iso_norms(1.0, 128)
  base_sigma = math.sqrt(8.0 / norms.frobenius)
  delta = np.array([1e-8, 1e-6, 1e-4, 1e-2, 1e-4, 1e-4, 1e-4, 1e-4])
  scale = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.5, 2.0, 3.0])  # M -> scale * M
  sb = B.sparsity_bound(
    _N8,
    base_sigma,
    B.InteractionNorms(
      norms.frobenius * scale, norms.operator * scale, norms.gram_frobenius * scale**2
    ),
    eps=0.01,
    delta=delta,
  )
  k = np.asarray(sb.k)
  assert np.all(np.diff(k[:4]) <= 0), k[:4]  # larger delta, smaller k
  assert np.all(np.diff(k[4:]) <= 0), k[4:]  # larger ||M|| (tau >= 8), sparser (fact 8)
  assert k[7] < k[4]


def test_eps_bound_is_consistent_with_k_bound():
  norms = _iso_norms(1.0, 128)
  sigma = math.sqrt(8.0 / norms.frobenius)
  ks = np.array([2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 1024.0, 1.0])
  eb = B.sparsity_eps_bound(_N8, sigma, norms, k=ks)
  eps = np.asarray(eb.eps)
  assert np.all(np.diff(eps[:6]) <= 0), eps  # more entries allowed, smaller eps
  assert eps[6] == 0.0  # k >= n: every eps works
  assert np.all(eps[:6] <= (1.0 + 1e-6) / (ks[:6] + 1.0))
  # For k <= 8 the Gaussian bound (which spends one slot on the diagonal) does not
  # beat the trivial 1/(k+1) here; from k = 16 on it does.
  assert np.all(np.asarray(eb.informative)[3:6])
  np.testing.assert_allclose(eps[:3], 1.0 / (ks[:3] + 1.0), rtol=1e-6)
  # Plugging the returned eps back into Theorem 1 gives at most k (eps slightly above).
  sb = B.sparsity_bound(_N8[:6], sigma, norms, eps=eps[:6] * 1.0001)
  assert np.all(np.asarray(sb.k) <= ks[:6]), (np.asarray(sb.k), ks[:6])


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    (dict(n=0), "n"),
    (dict(n=10.5), "n"),
    (dict(eps=0.0), "eps"),
    (dict(eps=1.0), "eps"),
    (dict(delta=0.0), "delta"),
    (dict(delta=1.5), "delta"),
    (dict(sigma=-1.0), "sigma"),
    (dict(norms=B.InteractionNorms(-1.0, 1.0, 1.0)), "norms.frobenius"),
    (dict(norms=B.InteractionNorms(1.0, -1.0, 1.0)), "norms.operator"),
  ],
)
def test_bad_arguments_raise_value_error_eagerly_and_under_jit(kwargs, name):
  args = dict(n=256, sigma=1.0, norms=B.InteractionNorms(1.0, 0.5, 0.5), eps=0.01, delta=1e-4)
  args.update(kwargs)
  call = lambda: B.sparsity_bound(
    args["n"], args["sigma"], args["norms"], eps=args["eps"], delta=args["delta"]
  )
  with pytest.raises(ValueError, match=name):
    call()
  with pytest.raises(ValueError, match=name):
    jax.jit(call)()


def test_other_functions_check_arguments():
  norms = B.InteractionNorms(1.0, 0.5, 0.5)
  with pytest.raises(ValueError, match="k"):
    jax.jit(lambda: B.sparsity_eps_bound(256, 1.0, norms, k=0))()
  with pytest.raises(ValueError, match="k"):
    B.topk_error_bound(256, 1.0, norms, k=0, value_norm=1.0)
  with pytest.raises(ValueError, match="value_norm"):
    B.topk_error_bound(256, 1.0, norms, k=4, value_norm=-1.0)
  with pytest.raises(ValueError, match="exactly one"):
    B.topk_error_bound(256, 1.0, norms, k=4)
  with pytest.raises(ValueError, match="alpha"):
    jax.jit(lambda: B.power_law_k(256, alpha=0.0, C=0.5))()
  with pytest.raises(ValueError, match="C"):
    B.power_law_k(256, alpha=1.0, C=1.5)
  with pytest.raises(ValueError, match="tau"):
    B.predicted_effective_support(256, -1.0)
  with pytest.raises(ValueError, match="delta"):
    B.tau_range(256, 1.0, norms, delta=2.0)


# ---------------------------------------------------------------- jit / vmap


def test_vmap_and_jit_over_every_argument():
  norms = _iso_norms(1.0, 64)
  n = jnp.array([256.0, 512.0, 1024.0, 2048.0])
  sigma = jnp.sqrt(jnp.array([0.5, 2.0, 4.0, 8.0]) / norms.frobenius)
  eps = jnp.array([0.01, 0.02, 0.05, 0.1])
  delta = jnp.array([1e-4, 1e-3, 1e-4, 1e-2])
  fro = jnp.full(4, norms.frobenius)
  op = jnp.full(4, norms.operator)
  gram = jnp.full(4, norms.gram_frobenius)

  def k_of(n, s, e, d, f, o, g):
    return B.sparsity_bound(n, s, B.InteractionNorms(f, o, g), eps=e, delta=d).k

  f = jax.jit(jax.vmap(k_of))
  vm = f(n, sigma, eps, delta, fro, op, gram)
  direct = B.sparsity_bound(n, sigma, B.InteractionNorms(fro, op, gram), eps=eps, delta=delta).k
  np.testing.assert_array_equal(np.asarray(vm), np.asarray(direct))
  # A traced out-of-range value cannot raise; it gives NaN in its own entry only.
  bad = f(n, sigma, eps.at[3].set(1.5), delta, fro, op, gram)
  assert np.isnan(np.asarray(bad)[3]) and np.all(np.isfinite(np.asarray(bad)[:3]))
  # Broadcasting: a [2, 4] grid from a [2, 1] and a [4] argument.
  grid = B.sparsity_bound(n[None, :], sigma[:2, None], norms, eps=0.05)
  assert grid.k.shape == (2, 4)


def test_error_bound_vmaps_and_is_monotone_in_k():
  norms = _iso_norms(1.0, 128)
  vnorms = B.interaction_norms(jnp.eye(128)[:, :64] / math.sqrt(128))
  sigma = math.sqrt(16.0 / norms.frobenius)
  ks = jnp.array([2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 1024.0])
  eb = B.topk_error_bound(1024, sigma, norms, k=ks, value_norms=vnorms)
  err = np.asarray(eb.error)
  assert np.all(np.diff(err) <= 1e-6), err
  assert err[-1] == 0.0  # k = n: top-k is exact
  assert np.all(err[:-1] < 2.0 * np.asarray(eb.value_norm)[:-1])  # better than t <= 1
  np.testing.assert_allclose(
    np.asarray(eb.value_norm), float(B.value_norm_bound(1024, sigma, vnorms, delta=1e-4 / 4))
  )
  vm = jax.vmap(lambda k: B.topk_error_bound(1024, sigma, norms, k=k, value_norm=1.0).tail_mass)(ks)
  # The eager call on concrete values runs in float64 NumPy, the vmapped one in float32
  # XLA, whose Riemann sums round upward by a relative 2.4e-4 (docs/theory.md, section 3,
  # "Float32"): float32 is never lower (up to its own rounding, 2e-5) and at most 3e-3
  # higher (measured: 1.2e-3).
  got, want = np.asarray(vm, np.float64), np.asarray(eb.tail_mass, np.float64)
  assert np.all(got >= want * (1.0 - 2e-5)) and np.all(got <= want * (1.0 + 3e-3)), (got, want)


# ---------------------------------------------------------------- n^C view, REM, ranking


def test_power_law_k_rounding_and_clipping():
  k = B.power_law_k(
    jnp.array([1024, 1024, 4, 1, 100]), alpha=jnp.array([1.0, 0.5, 10.0, 1.0, 0.01]), C=0.5
  )
  np.testing.assert_array_equal(np.asarray(k), [32, 16, 4, 1, 1])
  assert k.dtype == jnp.int32
  assert int(B.power_law_k(1000, alpha=1.0, C=0.5)) == 32  # ceil(31.62)
  assert int(B.power_law_k(7, alpha=1.0, C=0.0)) == 1


def test_rem_predictions():
  n = 4096.0
  b = B.rem_boundaries(n)
  np.testing.assert_allclose(float(b.diffuse), math.sqrt(math.log(n) / 2), rtol=1e-6)
  np.testing.assert_allclose(float(b.collapse), math.sqrt(2 * math.log(n)), rtol=1e-6)
  taus = jnp.linspace(0.0, 6.0, 61)
  ess = np.asarray(B.predicted_effective_support(n, taus))
  assert np.all(np.diff(ess) <= 1e-3) and ess[0] == pytest.approx(n, rel=1e-5)
  assert ess[-1] == pytest.approx(1.0)
  # Continuous at the diffuse boundary.
  lo = float(B.predicted_effective_support(n, b.diffuse * (1 - 1e-6)))
  hi = float(B.predicted_effective_support(n, b.diffuse * (1 + 1e-6)))
  assert lo == pytest.approx(hi, rel=1e-3)
  np.testing.assert_array_equal(np.asarray(B.rem_regime(n, jnp.array([0.5, 3.0, 5.0]))), [0, 1, 2])
  # Predicted tail mass of top-k: decreasing in k and in tau.
  t = np.asarray(B.predicted_tail_mass(n, jnp.array([1.0, 2.0, 3.0]), k=64))
  assert np.all(np.diff(t) < 0)
  assert float(B.predicted_tail_mass(n, 2.0, k=n)) == 0.0


def test_rem_effective_support_against_simulation():
  # Diffuse regime, where the prediction is n e^{-tau^2} to leading order.
  # 64 rows of n = 4096; median log ESS within 0.3 of the prediction.
  n, tau = 4096, 1.0
  s = tau * jax.random.normal(jax.random.key(3), (64, n))
  p = jax.nn.softmax(s, axis=-1)
  log_ess = np.median(np.asarray(jnp.log(gsparse.sparsity.effective_support(p))))
  assert abs(log_ess - math.log(float(B.predicted_effective_support(n, tau)))) < 0.3


def test_rank_layers_by_sparsity():
  key = jax.random.key(4)
  d, h = 32, 16
  layers = []
  for i, ws in enumerate([0.5, 2.0, 1.0]):
    w = gsparse.gaussian.sample_weights(
      jax.random.fold_in(key, i), d=d, head_dim=h, heads=2, weight_scale=ws / math.sqrt(d)
    )
    layers.append(w)
  r = B.rank_layers_by_sparsity(
    [w.w_q for w in layers], [w.w_k for w in layers], n=1024, eps=0.05, sigma=1.0
  )
  # Larger weights = larger tau = sparser (fact 8): order 1 (2.0), 2 (1.0), 0 (0.5).
  np.testing.assert_array_equal(np.asarray(r.order), [1, 2, 0])
  assert r.k.shape == (3, 2) and r.expected_tau.shape == (3, 2)
  stacked = B.rank_layers_by_sparsity(
    jnp.stack([w.w_q for w in layers]), jnp.stack([w.w_k for w in layers]), n=1024, eps=0.05
  )
  np.testing.assert_array_equal(np.asarray(stacked.order), np.asarray(r.order))
  with pytest.raises(ValueError, match="w_q"):
    B.rank_layers_by_sparsity(layers[0].w_q, layers[0].w_k, n=1024)


def test_interaction_norms_match_numpy():
  m = np.asarray(jax.random.normal(jax.random.key(5), (3, 6, 6)))
  got = B.interaction_norms(m)
  np.testing.assert_allclose(got.frobenius, np.linalg.norm(m, axis=(-2, -1)), rtol=1e-5)
  np.testing.assert_allclose(got.operator, np.linalg.norm(m, ord=2, axis=(-2, -1)), rtol=1e-5)
  np.testing.assert_allclose(
    got.gram_frobenius, np.linalg.norm(m @ np.swapaxes(m, -1, -2), axis=(-2, -1)), rtol=1e-4
  )


def test_interaction_norms_of_tiny_and_huge_matrices_in_float32():
  # Regression: sv^4 underflowed (||M|| < ~1e-10: gram_frobenius = 0, tau_range's lower end
  # then became sqrt(E tau^2), an invalid interval) and overflowed (||M|| > ~1e9: inf).
  for c in (1e-15, 1e-12, 1.0, 1e12, 1e18):  # c^2 representable in float32
    got = B.interaction_norms(np.float32(c) * np.eye(4, dtype=np.float32))
    np.testing.assert_allclose(got.frobenius, 2 * c, rtol=1e-5)
    np.testing.assert_allclose(got.operator, c, rtol=1e-5)
    np.testing.assert_allclose(got.gram_frobenius, 2 * c * c, rtol=1e-5)
  # tau scales as ||M||: the tau interval of c * I is c times that of I.
  base = B.tau_range(64, 1.0, B.interaction_norms(np.eye(4, dtype=np.float32)), delta=0.1)
  for c in (1e-12, 1e9):
    tr = B.tau_range(
      64, 1.0, B.interaction_norms(np.float32(c) * np.eye(4, dtype=np.float32)), delta=0.1
    )
    np.testing.assert_allclose(np.asarray(tr) / c, np.asarray(base), rtol=1e-5)


def test_tau_range_covers_sampled_taus():
  # 20000 rows: every tau_i must fall in the range built for delta = 1e-3 (false-failure <= 1e-3).
  d = 16
  m = np.asarray(jax.random.normal(jax.random.key(6), (d, d))) / d
  norms = B.interaction_norms(m)
  x = np.asarray(jax.random.normal(jax.random.key(7), (20000, d))) * 2.0
  tau = 2.0 * np.linalg.norm(x @ m, axis=-1)
  tr = B.tau_range(20000, 2.0, norms, delta=1e-3)
  assert float(tr.lo) <= tau.min() and tau.max() <= float(tr.hi)


# ---------------------------------------------------------------- small Monte Carlo


def test_monte_carlo_no_violations():
  """Theorems 1, 2 and the certificate on 2 x 32 matrices of n = 256 (16384 rows).

  The bounds are evaluated at delta = 1e-6, so if the theorems hold the
  probability that this test fails is at most 64 * 1e-6 = 6.4e-5 (one seed, so
  the outcome is deterministic). The certificate must hold on every row up to
  float32 rounding.
  """
  n, d, eps, delta = 256, 16, 0.01, 1e-6
  w = gsparse.gaussian.sample_weights(jax.random.key(8), d=d, head_dim=16)
  m = gsparse.gaussian.interaction_matrix(w.w_q, w.w_k)[0]
  w_v = w.w_v[:, 0, :]
  norms = B.interaction_norms(m)
  vnorms = B.interaction_norms(w_v)
  for i, tau in enumerate([1.0, 8.0]):
    sigma = math.sqrt(tau / float(norms.frobenius))
    st = matrix_stats(
      jax.random.key(9 + i),
      m,
      w_v,
      jnp.float32(sigma),
      jnp.float32(eps),
      n=n,
      num_matrices=64,
      ks=(8,),
      batch_size=16,
    )
    sb = B.sparsity_bound(n, sigma, norms, eps=eps, delta=delta)
    # k = 8 at index 2 of the same 8-vector as above (one compiled program).
    ks = jnp.array([2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 1024.0])
    eb = jax.tree.map(
      lambda a: a[2], B.topk_error_bound(n, sigma, norms, k=ks, value_norms=vnorms, delta=delta)
    )
    assert int(st.max_count.max()) <= float(sb.k)
    assert float(st.max_error.max()) <= float(eb.error)
    assert float(st.max_tail.max()) <= float(eb.tail_mass)
    assert float(st.max_value_norm.max()) <= float(eb.value_norm)
    assert float(st.cert_tail_excess.max()) <= 1e-4  # relative, float32 rounding
    tol = 4 * math.sqrt(n) * np.finfo(np.float32).eps * float(st.max_value_norm.max())
    assert float(st.cert_error_excess.max()) <= tol


def test_sparsity_bound_float64_agrees_with_float32():
  # The float32 path compares the binomial tail against delta/2 (float32 betainc is
  # ~1% off in the far tail), so it may only be more conservative than float64.
  w = gsparse.gaussian.sample_weights(jax.random.key(0), d=64, head_dim=64)
  norms32 = gsparse.bounds.interaction_norms_from_weights(w.w_q, w.w_k)
  k32 = gsparse.bounds.sparsity_bound(4096, 1.5, norms32, eps=0.01, delta=1e-4).k
  prev = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    w64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), w)
    norms64 = gsparse.bounds.interaction_norms_from_weights(w64.w_q, w64.w_k)
    sb64 = gsparse.bounds.sparsity_bound(4096, 1.5, norms64, eps=0.01, delta=1e-4)
    assert sb64.k.dtype == jnp.float64
    k64 = np.asarray(sb64.k)
  finally:
    jax.config.update("jax_enable_x64", prev)
  assert np.all(k64 <= np.asarray(k32)) and np.all(np.asarray(k32) - k64 <= 2)
