"""Property-based tests (hypothesis) of the public functions of `gsparse.bounds`.

Every property follows from a theorem of docs/theory.md or a documented
contract, and is checked against an independent NumPy/SciPy reference where
one exists (binomial quantiles, chi-square quantiles, norms, the random-energy
formulas) rather than against the code under test.

Compilation dominates the cost (a bound compiles in 5-25 s on CPU, once per
argument shape), so every call of a compiled bound takes arrays of one fixed
length `B` = 8 and the values vary as traced data: each bound compiles once for
the whole file. Each example therefore holds 8 instances, often arranged in
pairs that differ in one argument (for monotonicity).

Hypothesis is derandomized (fixed examples, no example database), so CI is
deterministic. Examples per property (`@settings(max_examples=...)`):

  * binomial_upper_quantile (8): range, validity and near-minimality against
    `scipy.stats.binom.isf`, the median bound, monotone in p and delta;
  * tau_range / value_norm_bound (20): cover the exact chi-square quantiles of
    an isotropic M (scipy.stats.chi2), monotone in n and delta, homogeneous in
    sigma and in M;
  * sparsity_bound (8): k integer in [1, min(ceil(1/eps) - 1, n)], field
    consistency, k non-decreasing as eps or delta decrease;
  * sparsity_eps_bound (8): range, and its inverse relation with
    sparsity_bound;
  * topk_error_bound (10): tail mass in [0, 1], error = 2 t v (Lemma 1),
    tail mass 0 for k >= n, non-increasing in k; with value_norms the same
    tail mass and value_norm_bound at delta / 4;
  * power_law_error_bound (10): equals topk_error_bound at power_law_k;
  * jit(vmap(topk_error_bound)) equals per-element calls (10);
  * power_law_k (30), predicted_tail_mass (30), rem_boundaries /
    rem_regime / predicted_effective_support (30): against NumPy/SciPy
    formulas, ranges and monotonicity;
  * interaction_norms (30) and interaction_norms_from_weights (30): against
    NumPy, invariance under transpose and orthogonal maps, homogeneity,
    norm inequalities;
  * rank_layers_by_sparsity (5): a permutation sorted by its key, tau
    against NumPy, equivariance under permuting the layers;
  * bad scalar arguments anywhere outside their documented range (60) raise
    ValueError naming the argument (errors_test.py checks one value each).

That is 8 + 20 + 8 + 8 + 10 + 10 + 10 + 30 + 30 + 30 + 30 + 30 + 5 + 60 = 289
examples (each example of a compiled bound holds 8 instances). The file runs in
about 50-55 s on one CPU core, mostly compiling.
"""

from __future__ import annotations

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gsparse import bounds as B

# Products below the smallest normal float32 are flushed to 0 by XLA:CPU.
_TINY = 4 * float(np.finfo(np.float32).tiny)
B_SIZE = 8  # every compiled bound is called with arrays of this length (one compile each)


def _settings(n):
  return settings(
    max_examples=n,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    print_blob=True,
  )


def _f32(x):
  return np.asarray(x, np.float32)


def _np(x):
  return np.asarray(x, np.float64)


def _log_uniform(lo, hi):
  return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: 10.0**e)


def _iso_norms(c, r):
  """Norms of a matrix with r singular values equal to c (elementwise over arrays)."""
  c, r = _np(c), _np(r)
  return B.InteractionNorms(_f32(c * np.sqrt(r)), _f32(c), _f32(c * c * np.sqrt(r)))


def _norms_from_sv(sv):
  """Norms of a matrix with singular values `sv` (`[batch, r]`), float64 reference."""
  sv = _np(sv)
  return B.InteractionNorms(
    _f32(np.sqrt(np.sum(sv**2, -1))), _f32(np.max(sv, -1)), _f32(np.sqrt(np.sum(sv**4, -1)))
  )


# ------------------------------------------------------------------ binomial quantile


@st.composite
def _binom_batch(draw):
  trials = draw(st.lists(st.integers(0, 5000), min_size=4, max_size=4))
  p = draw(
    st.lists(
      st.one_of(_log_uniform(1e-5, 0.999), st.sampled_from([0.0, 1.0])), min_size=4, max_size=4
    )
  )
  delta = draw(st.lists(_log_uniform(1e-9, 0.49), min_size=4, max_size=4))
  grow = draw(st.lists(st.floats(1.0, 50.0), min_size=4, max_size=4))
  # Pairs: (0,1) and (2,3) share trials/delta, p grows; (4,5), (6,7) share trials/p, delta shrinks.
  t = np.array(
    [trials[0], trials[0], trials[1], trials[1], trials[2], trials[2], trials[3], trials[3]]
  )
  pp = np.array(
    [p[0], min(p[0] * grow[0], 1.0), p[1], min(p[1] * grow[1], 1.0), p[2], p[2], p[3], p[3]]
  )
  dd = np.array([delta[0], delta[0], delta[1], delta[1], delta[2], delta[2] / grow[2], delta[3]])
  dd = np.append(dd, delta[3] / grow[3])
  return t.astype(np.float64), _f32(pp), _f32(dd)


def _scipy_upper_quantile(trials, p, delta):
  # Smallest m with P(X > m) <= delta. For a discrete law scipy's isf(q) is the smallest m with
  # sf(m) <= q, i.e. exactly this quantile (binom.ppf(1 - delta) too, up to rounding of 1 - delta).
  return scipy.stats.binom.isf(delta, trials, p)


@_settings(8)
@given(_binom_batch())
def test_binomial_upper_quantile_properties(batch):
  trials, p, delta = batch
  q = _np(B.binomial_upper_quantile(trials, p, delta))
  assert np.all(q == np.round(q)) and np.all((q >= 0) & (q <= trials)), q
  p64, d64 = _np(p), _np(delta)
  # Valid: P(X > q) <= delta (exact, scipy), whatever the float32 arithmetic did.
  sf = scipy.stats.binom.sf(q, trials, p64)
  assert np.all(sf <= d64 * (1 + 1e-9)), (q, sf, d64)
  # Never below the exact quantile; the float32 comparison at delta/2 costs at most delta/4's.
  exact = _scipy_upper_quantile(trials, p64, d64)
  assert np.all(q >= exact), (q, exact)
  assert np.all(q <= _scipy_upper_quantile(trials, p64, d64 / 4)), (q, exact)
  # An upper quantile at delta < 1/2 is at least the median, hence >= floor(trials * p).
  assert np.all(q >= np.floor(trials * p64 * (1 - 1e-6))), (q, trials * p64)
  # Monotone: non-decreasing in p (pairs 0-1, 2-3) and as delta decreases (pairs 4-5, 6-7).
  assert q[1] >= q[0] and q[3] >= q[2] and q[5] >= q[4] and q[7] >= q[6], q


# ------------------------------------------------------------ tau range, value norm


@st.composite
def _iso_batch(draw):
  n = draw(st.lists(st.integers(1, 100_000), min_size=B_SIZE, max_size=B_SIZE))
  sigma = draw(st.lists(_log_uniform(0.05, 20.0), min_size=B_SIZE, max_size=B_SIZE))
  c = draw(st.lists(_log_uniform(1e-3, 100.0), min_size=B_SIZE, max_size=B_SIZE))
  r = draw(st.lists(st.integers(1, 512), min_size=B_SIZE, max_size=B_SIZE))
  delta = draw(st.lists(_log_uniform(1e-9, 0.5), min_size=B_SIZE, max_size=B_SIZE))
  return (_np(n), _f32(sigma), _np(c), _np(r), _f32(delta))


@_settings(20)
@given(_iso_batch(), st.floats(1.5, 10.0))
def test_tau_range_and_value_norm_cover_chi_square_quantiles(batch, f):
  n, sigma, c, r, delta = batch
  norms = _iso_norms(c, r)
  s64, d64 = _np(sigma), _np(delta)
  # M (or W_V) with r singular values c: ||M^T g||^2 = c^2 chi2_r exactly.
  tr = B.tau_range(n, sigma, norms, delta=delta)
  lo, hi = _np(tr.lo), _np(tr.hi)
  assert np.all(np.isfinite(lo) & np.isfinite(hi)) and np.all((lo >= 0) & (lo <= hi))
  # Lemma 2: each side fails w.p. <= delta / (2n) per row, so the interval must contain the
  # exact chi-square quantiles at that level (a union bound cannot beat the per-row quantile).
  q = d64 / (2 * n)
  scale2 = s64**4 * c**2
  hi_ref = np.sqrt(scale2 * scipy.stats.chi2.isf(q, r))
  lo_ref = np.sqrt(scale2 * scipy.stats.chi2.ppf(q, r))
  assert np.all(hi >= hi_ref * (1 - 1e-4)), (hi, hi_ref)
  assert np.all(lo <= lo_ref * (1 + 1e-4)), (lo, lo_ref)
  # value_norm_bound: ||v_j||^2 = sigma^2 c^2 chi2_r, level delta / n per row.
  vn = _np(B.value_norm_bound(n, sigma, norms, delta=delta))
  vn_ref = np.sqrt(s64**2 * c**2 * scipy.stats.chi2.isf(d64 / n, r))
  assert np.all(vn >= vn_ref * (1 - 1e-4)), (vn, vn_ref)
  # Wider for more rows and for smaller delta.
  tr_n = B.tau_range(n * 4, sigma, norms, delta=delta)
  tr_d = B.tau_range(n, sigma, norms, delta=_f32(delta / f))
  for other in (tr_n, tr_d):
    assert np.all(_np(other.hi) >= hi * (1 - 1e-6)) and np.all(_np(other.lo) <= lo * (1 + 1e-6))
  assert np.all(_np(B.value_norm_bound(n * 4, sigma, norms, delta=delta)) >= vn * (1 - 1e-6))
  # Homogeneity: tau scales as sigma^2 ||M|| and v as sigma ||W_V||.
  scaled = B.tau_range(n, _f32(sigma * f), _iso_norms(c / f**2, r), delta=delta)
  np.testing.assert_allclose(_np(scaled.hi), hi, rtol=2e-4)
  np.testing.assert_allclose(_np(scaled.lo), lo, rtol=2e-4, atol=1e-6 * hi.max())
  vs = _np(B.value_norm_bound(n, sigma, _iso_norms(c * f, r), delta=delta))
  np.testing.assert_allclose(vs, vn * f, rtol=2e-4)


# ------------------------------------------------------------------------ Theorem 1


@st.composite
def _sparsity_setting(draw, size):
  """n, sigma, norms (random singular values), eps, delta: arrays of length `size`."""
  n = draw(
    st.lists(st.one_of(st.integers(1, 8), st.integers(9, 4096)), min_size=size, max_size=size)
  )
  tau = draw(st.lists(_log_uniform(0.05, 12.0), min_size=size, max_size=size))
  bulk = draw(st.lists(st.integers(1, 128), min_size=size, max_size=size))
  extra = draw(
    hnp.arrays(np.float64, (size, 3), elements=st.floats(0.0, 3.0, allow_subnormal=False))
  )
  sv = np.concatenate([np.ones((size, 1)), extra], axis=1)
  frob_bulk = np.sqrt(np.array(bulk) - 1.0)  # bulk - 1 more singular values equal to 1
  norms64 = (
    np.sqrt(np.sum(sv**2, 1) + frob_bulk**2),
    np.max(sv, 1),
    np.sqrt(np.sum(sv**4, 1) + frob_bulk**2),
  )
  sigma = np.sqrt(np.array(tau) / norms64[0])  # sqrt(E tau^2) = sigma^2 ||M||_F = tau
  norms = B.InteractionNorms(*(_f32(x) for x in norms64))
  eps = draw(st.lists(st.floats(0.02, 0.6), min_size=size, max_size=size))
  delta = draw(st.lists(_log_uniform(1e-8, 0.5), min_size=size, max_size=size))
  return _np(n), _f32(sigma), norms, _f32(eps), _f32(delta)


def _pair_up(arrays, idx):
  """Repeats element idx[j] of every array (to make pairs that differ in one argument)."""
  return [type(a)(*(_pair_up(list(a), idx))) if isinstance(a, tuple) else a[idx] for a in arrays]


@_settings(8)
@given(_sparsity_setting(4), st.lists(st.floats(0.25, 0.95), min_size=2, max_size=2), st.data())
def test_sparsity_bound_range_consistency_and_monotonicity(setting, shrink, data):
  idx = np.repeat(np.arange(4), 2)
  n, sigma, norms, eps, delta = _pair_up(list(setting), idx)
  # Pairs (0,1), (2,3): eps shrinks; (4,5), (6,7): delta shrinks.
  eps = eps.copy()
  delta = delta.copy()
  eps[1] *= shrink[0]
  eps[3] *= shrink[1]
  delta[5] *= data.draw(_log_uniform(1e-4, 0.9))
  delta[7] *= data.draw(_log_uniform(1e-4, 0.9))
  eps, delta = _f32(eps), _f32(delta)
  sb = B.sparsity_bound(n, sigma, norms, eps=eps, delta=delta)
  k, triv, kg = _np(sb.k), _np(sb.trivial_k), _np(sb.k_gauss)
  # Range: integer in [1, min(ceil(1/eps) - 1, n)]; trivial_k is that minimum, the largest K
  # with K eps < 1 (computed here in exact rational arithmetic on the float32 eps).
  frac = [fractions.Fraction(float(e)) for e in eps]
  triv_ref = [int(1 / f) - 1 if int(1 / f) * f >= 1 else int(1 / f) for f in frac]
  np.testing.assert_array_equal(triv, np.minimum(triv_ref, n))
  assert np.all(k == np.round(k)) and np.all((k >= 1) & (k <= triv)), (k, triv)
  np.testing.assert_array_equal(k, np.minimum(kg, triv))
  np.testing.assert_array_equal(np.asarray(sb.informative), kg < triv)
  assert np.all(kg >= 1) and np.all(kg <= n)
  pstar = _np(sb.exceed_prob)
  assert np.all((pstar >= 0) & (pstar <= 1)), pstar
  lo, hi = _np(sb.tau_lo), _np(sb.tau_hi)
  assert np.all(np.isfinite(hi)) and np.all((lo >= 0) & (lo <= hi))
  # Monotone: a smaller eps or a smaller delta can only need a larger k.
  assert kg[1] >= kg[0] and kg[3] >= kg[2], (eps[:4], kg[:4])
  assert kg[5] >= kg[4] and kg[7] >= kg[6], (delta[4:], kg[4:])


@_settings(8)
@given(_sparsity_setting(B_SIZE), st.data())
def test_sparsity_eps_bound_range_and_inverse(setting, data):
  n, sigma, norms, _, delta = setting
  n = np.minimum(n, 512.0)  # keeps Theorem 1's linear scan at the returned eps short
  k = _np([data.draw(st.integers(1, int(min(m, 40)) + 1)) for m in n])
  eb = B.sparsity_eps_bound(n, sigma, norms, k=k, delta=delta)
  e, triv, eg = _np(eb.eps), _np(eb.trivial_eps), _np(eb.eps_gauss)
  triv_ref = np.where(k >= n, 0.0, 1.0 / (k + 1.0))
  np.testing.assert_allclose(triv, triv_ref, rtol=1e-6)
  assert np.all((e >= 0) & (e <= triv * (1 + 1e-6))), (e, triv)
  assert np.all((e == 0) == (k >= n)), (e, k, n)
  np.testing.assert_array_equal(np.asarray(eb.informative), eg < triv)
  # Inverse (the docstring's promise): at any eps slightly above eps_gauss, Theorem 1 gives k'
  # <= k. Checked where eps_gauss is a finite number in (0, 1); elsewhere a dummy eps = 0.5.
  use = np.isfinite(eg) & (eg > 0) & (eg * 1.001 < 1)
  assume(np.any(use))
  probe = _f32(np.where(use, eg * 1.001, 0.5))
  sb = B.sparsity_bound(n, sigma, norms, eps=probe, delta=delta)
  kb = _np(sb.k_gauss)
  assert np.all(kb[use] <= k[use]), (kb[use], k[use], probe[use])


# ------------------------------------------------------------------------ Theorem 2


@_settings(10)
@given(_sparsity_setting(4), st.data())
def test_topk_error_bound_ranges_identity_and_monotone_in_k(setting, data):
  idx = np.repeat(np.arange(4), 2)
  n, sigma, norms, _, delta = _pair_up(list(setting), idx)
  n = np.maximum(n, 2.0)
  k_lo = _np([data.draw(st.integers(1, int(m))) for m in n[::2]])
  k_hi = _np(
    [data.draw(st.integers(int(a), int(m) + 2)) for a, m in zip(k_lo, n[::2], strict=True)]
  )
  k = np.stack([k_lo, k_hi], 1).reshape(-1)  # pairs (2j, 2j+1): k grows
  vnorm = _f32(
    data.draw(
      st.lists(st.floats(0.0, 50.0, allow_subnormal=False), min_size=B_SIZE, max_size=B_SIZE)
    )
  )
  eb = B.topk_error_bound(n, sigma, norms, k=k, value_norm=vnorm, delta=delta)
  t, err, vn = _np(eb.tail_mass), _np(eb.error), _np(eb.value_norm)
  assert np.all((t >= 0) & (t <= 1)), t
  np.testing.assert_array_equal(vn, _np(vnorm))
  # Lemma 1: error = 2 * tail mass * max ||v_j||.
  np.testing.assert_allclose(err, 2.0 * t * vn, rtol=1e-6, atol=_TINY)
  assert np.all(t[k >= n] == 0), (t, k, n)
  # Keeping more entries never raises the certified tail mass.
  assert np.all(t[1::2] <= t[0::2] * (1 + 1e-5)), (k, t)
  # With value_norms instead: the same tail mass, and max ||v_j|| from value_norm_bound at
  # delta / 4 (the documented split).
  c = _np(data.draw(st.lists(_log_uniform(1e-2, 10.0), min_size=B_SIZE, max_size=B_SIZE)))
  vnorms = _iso_norms(c, data.draw(st.integers(1, 64)))
  ev = B.topk_error_bound(n, sigma, norms, k=k, value_norms=vnorms, delta=delta)
  np.testing.assert_array_equal(_np(ev.tail_mass), t)
  vref = _np(B.value_norm_bound(n, sigma, vnorms, delta=_f32(_np(delta) / 4)))
  np.testing.assert_allclose(_np(ev.value_norm), vref, rtol=1e-5)
  np.testing.assert_allclose(_np(ev.error), 2.0 * t * _np(ev.value_norm), rtol=1e-6, atol=_TINY)


def _error_of(n, s, f, o, g, k, v, d):
  eb = B.topk_error_bound(n, s, B.InteractionNorms(f, o, g), k=k, value_norm=v, delta=d)
  return eb.error, eb.tail_mass


# Module level, so that they compile once for all examples (a new jit(vmap) per example would not).
_error_vmapped = jax.jit(jax.vmap(_error_of))
# Jitted, so that both sides take the traced (float32 XLA) path; an eager call on concrete values
# would run the float64 NumPy evaluator (tests/bounds_eager_test.py compares the two).
_error_batch = jax.jit(_error_of)


# Slow since the Chernoff core (a minute of jitted grids); the default step keeps
# vmap of topk_error_bound in bounds_test.py::test_error_bound_vmaps_and_is_monotone_in_k.
@pytest.mark.slow
@_settings(10)
@given(_sparsity_setting(B_SIZE), st.data())
def test_topk_error_bound_vmap_equals_per_element(setting, data):
  n, sigma, norms, _, delta = setting
  k = _np([data.draw(st.integers(1, int(m) + 1)) for m in n])
  vnorm = _f32(
    data.draw(
      st.lists(st.floats(0.0, 10.0, allow_subnormal=False), min_size=B_SIZE, max_size=B_SIZE)
    )
  )
  args = (n, sigma, *norms, k, vnorm, delta)
  err_v, t_v = _error_vmapped(*(jnp.asarray(a, jnp.float32) for a in args))
  for i in range(B_SIZE):
    # Element i on its own: a batch holding only copies of it (the compiled batch of 8 is reused).
    e_i, t_i = _error_batch(*(np.full(B_SIZE, a[i], a.dtype) for a in args))
    np.testing.assert_allclose(_np(e_i), float(err_v[i]), rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(_np(t_i), float(t_v[i]), rtol=1e-5, atol=1e-30)


# ---------------------------------------------------------------------- the n^C view


@_settings(30)
@given(
  st.lists(st.integers(1, 1_000_000), min_size=4, max_size=4),
  _log_uniform(1e-3, 100.0),
  st.floats(0.0, 1.0, allow_subnormal=False),
  st.floats(0.0, 1.0, allow_subnormal=False),
)
def test_power_law_k_against_numpy_and_monotone(ns, alpha, c1, c2):
  n = np.sort(_np(ns))
  k = np.asarray(B.power_law_k(n, alpha=alpha, C=c1))
  assert k.dtype == np.int32 and np.all((k >= 1) & (k <= n)), (k, n)
  raw = _np(np.float32(alpha)) * n ** _np(np.float32(c1))
  ref = np.clip(np.ceil(raw), 1, n)
  # Where raw is within float32 rounding of an integer either rounding is right.
  near = np.abs(raw - np.round(raw)) <= 1e-5 * np.maximum(raw, 1.0)
  ok = (k == ref) | (near & (np.abs(k - ref) <= 1))
  assert np.all(ok), (k, ref, raw)
  # Non-decreasing in n, in alpha and in C (n^C with n >= 1).
  assert np.all(np.diff(k) >= 0), (n, k)
  assert np.all(np.asarray(B.power_law_k(n, alpha=alpha * 2.0, C=c1)) >= k)
  lo, hi = sorted((c1, c2))
  assert np.all(
    np.asarray(B.power_law_k(n, alpha=alpha, C=hi))
    >= np.asarray(B.power_law_k(n, alpha=alpha, C=lo))
  )


@_settings(10)
@given(
  _sparsity_setting(B_SIZE), _log_uniform(0.01, 4.0), st.floats(0.0, 1.0, allow_subnormal=False)
)
def test_power_law_error_bound_is_theorem_2_at_power_law_k(setting, alpha, c):
  n, sigma, norms, _, delta = setting
  pe = B.power_law_error_bound(n, sigma, norms, alpha=alpha, C=c, value_norm=1.0, delta=delta)
  k = np.asarray(B.power_law_k(n, alpha=alpha, C=c)).astype(np.float64)
  te = B.topk_error_bound(n, sigma, norms, k=k, value_norm=np.ones(B_SIZE), delta=delta)
  np.testing.assert_array_equal(_np(pe.error), _np(te.error))
  np.testing.assert_array_equal(_np(pe.tail_mass), _np(te.tail_mass))


@_settings(30)
@given(
  st.lists(st.integers(2, 1_000_000), min_size=4, max_size=4),
  st.lists(st.floats(0.0, 8.0, allow_subnormal=False), min_size=4, max_size=4),
  st.lists(st.floats(0.0, 1.0, allow_subnormal=False), min_size=4, max_size=4),
  st.floats(0.0, 3.0, allow_subnormal=False),
)
def test_predicted_tail_mass_against_scipy_and_monotone(ns, taus, fracs, dtau):
  n = _np(ns)
  tau = _f32(taus)
  k = np.maximum(np.floor(_np(fracs) * n), 1.0)
  t = _np(B.predicted_tail_mass(n, tau, k=k))
  assert np.all((t >= 0) & (t <= 1)), t
  q = scipy.stats.norm.isf(k / n)
  ref = np.where(k >= n, 0.0, scipy.stats.norm.cdf(q - _np(tau)))
  np.testing.assert_allclose(t, ref, rtol=2e-3, atol=2e-5)
  # Keeping more entries, or a larger tau (more peaked row), never raises the prediction.
  assert np.all(_np(B.predicted_tail_mass(n, tau, k=np.minimum(k * 2, n))) <= t + 1e-6)
  assert np.all(_np(B.predicted_tail_mass(n, _f32(tau + dtau), k=k)) <= t + 1e-6)


@_settings(30)
@given(
  st.lists(st.integers(1, 10_000_000), min_size=4, max_size=4),
  st.lists(st.floats(0.0, 10.0, allow_subnormal=False), min_size=4, max_size=4),
  st.floats(0.0, 2.0, allow_subnormal=False),
)
def test_rem_regimes_and_effective_support_against_numpy(ns, taus, dtau):
  n = _np(ns)
  tau = _f32(taus)
  b = B.rem_boundaries(n)
  ln = np.log(n)
  np.testing.assert_allclose(_np(b.diffuse), np.sqrt(ln / 2), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_np(b.collapse), np.sqrt(2 * ln), rtol=1e-6, atol=1e-7)
  regime = np.asarray(B.rem_regime(n, tau))
  t64 = _np(tau)
  ref = (t64 >= np.sqrt(ln / 2)).astype(int) + (t64 >= np.sqrt(2 * ln)).astype(int)
  near = np.minimum(np.abs(t64 - np.sqrt(ln / 2)), np.abs(t64 - np.sqrt(2 * ln))) < 1e-5
  assert np.all((regime == ref) | near), (regime, ref)
  assert np.all(np.asarray(B.rem_regime(n, _f32(tau + dtau))) >= regime)
  ess = _np(B.predicted_effective_support(n, tau))
  a = np.sqrt(2 * ln)
  log_ref = np.where(t64 <= a / 2, ln - t64**2, np.where(t64 <= a, (a - t64) ** 2, 0.0))
  np.testing.assert_allclose(np.log(ess), log_ref, rtol=1e-4, atol=1e-4)
  # Documented range [1, n] (up to float32 rounding of exp(log n)) and non-increasing in tau.
  assert np.all((ess >= 1 - 1e-6) & (ess <= n * (1 + 1e-5))), (ess, n)
  ess2 = _np(B.predicted_effective_support(n, _f32(tau + dtau)))
  assert np.all(ess2 <= ess * (1 + 1e-5)), (ess, ess2)


# ---------------------------------------------------------------------------- norms


def _matrices(shape):
  return hnp.arrays(
    np.float32, shape, elements=st.floats(-4.0, 4.0, width=32, allow_subnormal=False)
  )


def _orthogonal(rng, d):
  q, r = np.linalg.qr(rng.standard_normal((d, d)))
  return q * np.sign(np.diag(r))


@_settings(30)
@given(
  _matrices((3, 6, 6)),
  _matrices((2, 6, 4)),
  st.integers(0, 2**32 - 1),
  st.floats(-3, 3, allow_subnormal=False),
)
def test_interaction_norms_against_numpy_and_invariances(m, w, seed, c):
  scale = max(float(np.abs(m).max()), 1e-3)
  for x in (m, w):
    got = B.interaction_norms(x)
    x64 = _np(x)
    sv = np.linalg.svd(x64, compute_uv=False)
    tol = dict(rtol=1e-4, atol=1e-5 * max(float(np.abs(x64).max()), 1e-3) * 6)
    np.testing.assert_allclose(_np(got.frobenius), np.linalg.norm(x64, axis=(-2, -1)), **tol)
    np.testing.assert_allclose(_np(got.operator), sv[..., 0], **tol)
    gram_ref = np.linalg.norm(x64 @ np.swapaxes(x64, -1, -2), axis=(-2, -1))
    np.testing.assert_allclose(
      _np(got.gram_frobenius), gram_ref, rtol=1e-4, atol=tol["atol"] * sv[..., 0].max() * 6 + 1e-9
    )
    f, o, g = _np(got.frobenius), _np(got.operator), _np(got.gram_frobenius)
    r = min(x.shape[-2:])
    slack = 1 + 1e-4
    # ||M||_op <= ||M||_F <= sqrt(rank) ||M||_op and ||M||_op^2 <= ||M M^T||_F <= ||M||_F^2.
    assert np.all(o <= f * slack) and np.all(f <= math.sqrt(r) * o * slack + 1e-6)
    assert np.all(o * o <= g * slack + 1e-6) and np.all(g <= f * f * slack + 1e-6)
  # Invariant under transpose and under U M V^T with U, V orthogonal; homogeneous in c.
  rng = np.random.default_rng(seed)
  u, v = _orthogonal(rng, 6), _orthogonal(rng, 6)
  base = B.interaction_norms(m)
  for other in (np.swapaxes(m, -1, -2), _f32(u @ _np(m) @ v.T)):
    got = B.interaction_norms(other)
    for a, b in zip(got, base, strict=True):
      np.testing.assert_allclose(_np(a), _np(b), rtol=1e-4, atol=1e-4 * scale**2 * 36)
  got = B.interaction_norms(_f32(c * _np(m)))
  np.testing.assert_allclose(
    _np(got.frobenius), abs(c) * _np(base.frobenius), rtol=1e-4, atol=1e-4 * scale
  )
  np.testing.assert_allclose(
    _np(got.operator), abs(c) * _np(base.operator), rtol=1e-4, atol=1e-4 * scale
  )
  np.testing.assert_allclose(
    _np(got.gram_frobenius), c * c * _np(base.gram_frobenius), rtol=1e-4, atol=1e-4 * scale**2 * 36
  )


@_settings(30)
@given(_matrices((5, 2, 3)), _matrices((5, 2, 3)))
def test_interaction_norms_from_weights_against_numpy_and_swap(w_q, w_k):
  got = B.interaction_norms_from_weights(w_q, w_k)
  m = np.einsum("dhe,fhe->hdf", _np(w_q), _np(w_k)) / math.sqrt(3)
  sv = np.linalg.svd(m, compute_uv=False)
  atol = 1e-4 * max(float(sv.max()), 1e-3)
  np.testing.assert_allclose(_np(got.frobenius), np.sqrt(np.sum(sv**2, -1)), rtol=1e-4, atol=atol)
  np.testing.assert_allclose(_np(got.operator), sv[:, 0], rtol=1e-4, atol=atol)
  np.testing.assert_allclose(
    _np(got.gram_frobenius), np.sqrt(np.sum(sv**4, -1)), rtol=1e-4, atol=atol * max(sv.max(), 1)
  )
  # Swapping W_Q and W_K transposes M: same norms.
  sw = B.interaction_norms_from_weights(w_k, w_q)
  for a, b in zip(sw, got, strict=True):
    np.testing.assert_allclose(_np(a), _np(b), rtol=1e-4, atol=atol * max(sv.max(), 1))


# --------------------------------------------------------------------- layer ranking

_L, _D, _H, _HD = 4, 8, 2, 4  # L * H = 8 = B_SIZE: reuses sparsity_bound's compile


@_settings(5)
@given(
  st.integers(0, 2**32 - 1),
  st.lists(_log_uniform(0.05, 3.0), min_size=_L, max_size=_L),
  st.permutations(range(_L)),
  st.sampled_from([64, 1024, 16384]),
  _log_uniform(0.3, 2.0),
)
def test_rank_layers_is_sorted_and_equivariant_under_layer_permutation(
  seed, scales, perm, n, sigma
):
  rng = np.random.default_rng(seed)
  s = np.asarray(scales)[:, None, None, None]
  w_q = _f32(s * rng.standard_normal((_L, _D, _H, _HD)))
  w_k = _f32(s * rng.standard_normal((_L, _D, _H, _HD)))
  r = B.rank_layers_by_sparsity(w_q, w_k, n=n, eps=0.2, sigma=sigma)
  order = np.asarray(r.order)
  assert sorted(order.tolist()) == list(range(_L))
  # expected_tau = sigma^2 ||scale W_Q W_K^T||_F per head (NumPy reference).
  m = np.einsum("ldhe,lfhe->lhdf", _np(w_q), _np(w_k)) / math.sqrt(_HD)
  tau_ref = np.float32(sigma) ** 2 * np.linalg.norm(m, axis=(-2, -1))
  np.testing.assert_allclose(_np(r.expected_tau), tau_ref, rtol=1e-4)
  key = _np(r.layer_log_support)
  np.testing.assert_allclose(
    key, np.mean(np.log(_np(r.effective_support)), -1), rtol=1e-5, atol=1e-5
  )
  assert np.all(np.diff(key[order]) >= 0), (key, order)
  assert np.asarray(r.k).shape == (_L, _H)
  # Equivariance: ranking the permuted layers ranks the same layers (distinct keys only).
  mean_tau = _np(r.expected_tau).mean(-1)
  pairs = sorted(zip(key, -mean_tau, strict=True))
  assume(
    all(
      abs(a[0] - b[0]) > 1e-4 or abs(a[1] - b[1]) > 1e-4
      for a, b in zip(pairs, pairs[1:], strict=False)
    )
  )
  perm = np.asarray(perm)
  rp = B.rank_layers_by_sparsity(w_q[perm], w_k[perm], n=n, eps=0.2, sigma=sigma)
  np.testing.assert_array_equal(perm[np.asarray(rp.order)], order)


# ----------------------------------------------------------------------- bad input

_NORMS = B.InteractionNorms(1.0, 0.5, 0.5)

# (function, argument, documented range as (lo, hi, lo_open, hi_open, integer)).
_CHECKED = [
  (lambda v: B.sparsity_bound(v, 1.0, _NORMS, eps=0.1), "n", (1, None, False, False, True)),
  (lambda v: B.sparsity_bound(64, v, _NORMS, eps=0.1), "sigma", (0, None, True, False, False)),
  (lambda v: B.sparsity_bound(64, 1.0, _NORMS, eps=v), "eps", (0, 1, True, True, False)),
  (
    lambda v: B.sparsity_bound(64, 1.0, _NORMS, eps=0.1, delta=v),
    "delta",
    (0, 1, True, True, False),
  ),
  (lambda v: B.sparsity_eps_bound(64, 1.0, _NORMS, k=v), "k", (1, None, False, False, True)),
  (
    lambda v: B.topk_error_bound(64, 1.0, _NORMS, k=v, value_norm=1.0),
    "k",
    (1, None, False, False, True),
  ),
  (
    lambda v: B.topk_error_bound(64, 1.0, _NORMS, k=2, value_norm=v),
    "value_norm",
    (0, None, False, False, False),
  ),
  (lambda v: B.value_norm_bound(v, 1.0, _NORMS, delta=0.1), "n", (1, None, False, False, True)),
  (lambda v: B.tau_range(64, 1.0, _NORMS, delta=v), "delta", (0, 1, True, True, False)),
  (lambda v: B.binomial_upper_quantile(10, v, 0.1), "p", (0, 1, False, False, False)),
  (lambda v: B.binomial_upper_quantile(v, 0.5, 0.1), "trials", (0, None, False, False, True)),
  (lambda v: B.power_law_k(v, alpha=1.0, C=0.5), "n", (1, None, False, False, True)),
  (lambda v: B.power_law_k(64, alpha=1.0, C=v), "C", (0, 1, False, False, False)),
  (lambda v: B.predicted_tail_mass(64, v, k=4), "tau", (0, None, False, False, False)),
  (lambda v: B.predicted_effective_support(64, v), "tau", (0, None, False, False, False)),
  (lambda v: B.rem_regime(v, 1.0), "n", (1, None, False, False, True)),
]


@st.composite
def _bad_value(draw, spec):
  lo, hi, lo_open, hi_open, integer = spec
  options = [st.sampled_from([math.nan, math.inf, -math.inf])]
  if lo is not None:
    options.append(st.floats(-1e6, lo, exclude_max=not lo_open))
  if hi is not None:
    options.append(st.floats(hi, 1e6, exclude_min=not hi_open))
  if integer:
    options.append(st.floats(max(lo, 0) + 0.01, 1e4).filter(lambda x: x != round(x)))
  return draw(st.one_of(options))


@_settings(60)
@given(st.data())
def test_values_outside_the_documented_range_raise_value_error_naming_the_argument(data):
  fn, name, spec = data.draw(st.sampled_from(_CHECKED))
  value = data.draw(_bad_value(spec))
  with pytest.raises(ValueError, match=rf"^{name}="):
    fn(value)
