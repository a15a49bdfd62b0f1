"""Theorem R3 (sufficiency of n^C keys), Lemma Z and the collapsed-phase law (docs/theory.md, §6).

Monte Carlo checks of validity state their sample size and false-failure
rate; the limit checks evaluate the bounds far out in `n` (float64) and
compare against closed forms computed here, not by the code under test.
`python tests/bounds_asymptotics_test.py` prints the two finite-n tables
of docs/results/2026-11-30-collapsed-tail-cpu.md (threshold, collapsed phase).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sps
import scipy.stats

from gsparse import bounds as B
from gsparse.bounds import _xp
from gsparse.bounds.asymptotics import _below_exceeds, _log_z_order
from gsparse.bounds.converse import _log_z_lower


def _tails(key, n, rows, tau, k):
  """Top-k tail masses of `rows` rows of `n` i.i.d. `N(0, tau^2)` scores."""
  s = tau * jax.random.normal(key, (rows, n))
  head = jax.nn.logsumexp(jax.lax.top_k(s, k)[0], axis=-1) - jax.nn.logsumexp(s, axis=-1)
  return -jnp.expm1(head)


def test_r3_holds_by_monte_carlo():
  # End to end. The bound is loose by construction (first and second moments), so at these
  # informative settings the true rate is far below it and this guards against gross errors
  # only; the component tests below (Lemma Z, the order statistics, Markov/Cantelli for B_q)
  # are the sensitive ones. 1024 rows of n = 4096 per setting. The count of rows with tail > eps is Binomial(rows, p)
  # with p <= the bound; the test fails when it exceeds the (1 - 1e-6) quantile of
  # Binomial(rows, bound): false-failure rate <= 3e-6 over the three settings.
  n, rows = 4096, 1024
  key = jax.random.key(11)
  for i, (tau, k, eps) in enumerate(((3.0, 512, 0.3), (4.0, 128, 0.3), (5.0, 128, 0.2))):
    bound = float(B.tail_mass_exceeds_prob(n, tau, k=k, eps=eps))
    assert 0 < bound < 0.5, bound  # informative, so the count below can fail
    count = int(jnp.sum(_tails(jax.random.fold_in(key, i), n, rows, tau, k) > eps))
    allowed = int(scipy.stats.binom.isf(1e-6, rows, bound))
    assert count <= allowed, (tau, k, eps, count, allowed, bound)


def test_lower_bounds_on_z_by_monte_carlo():
  # Lemma Z (truncated second moment) and the order-statistic bound, entry by entry: every grid
  # entry with a failure probability f in [0.02, 0.6] claims P(Z < L) <= f. 4096 rows of
  # n = 1024 per tau; an entry fails when its count exceeds the (1 - 1e-7) quantile of
  # Binomial(4096, f). At most ~300 entries are checked: false-failure rate <= 3e-5.
  n, rows = 1024, 4096
  key = jax.random.key(12)
  checked = 0
  for i, tau in enumerate((0.5, 1.5, 3.0, 5.0)):
    s = tau * jax.random.normal(jax.random.fold_in(key, i), (rows, n), dtype=jnp.float32)
    log_z = np.asarray(jax.nn.logsumexp(s, axis=-1), np.float64)
    t, nn = np.float64(tau), np.float64(n)
    la, fa = _log_z_lower(_xp.NP, np.log(nn), t)
    lb, fb = _log_z_order(_xp.NP, nn, t, np.float64)
    for log_l, log_f in zip(np.concatenate([la, lb]), np.concatenate([fa, fb]), strict=True):
      f = float(np.exp(log_f))
      if not 0.02 <= f <= 0.6:
        continue
      checked += 1
      count = int(np.sum(log_z < log_l - 1e-4))  # float32 logsumexp: a 1e-4 allowance
      assert count <= scipy.stats.binom.isf(1e-7, rows, f), (tau, log_l, f, count)
  assert checked >= 20, checked  # the check is not vacuous


def test_mass_below_a_level_by_monte_carlo():
  # P(B_q > x) <= min(Markov, Cantelli) for B_q = sum_j e^{tau g_j} 1{g_j <= q}, at every
  # (tau, q, x) of a grid where the bound lies in [0.02, 0.6]. 2048 rows of n = 1024 per tau;
  # an entry fails when its count exceeds the (1 - 1e-7) quantile of Binomial(2048, bound);
  # at most 4 x 5 x 40 entries: false-failure rate <= 8e-5.
  n, rows = 1024, 2048
  key = jax.random.key(14)
  checked = 0
  for i, tau in enumerate((0.5, 1.5, 3.0, 5.0)):
    g = np.asarray(jax.random.normal(jax.random.fold_in(key, i), (rows, n)), np.float64)
    for q in (0.0, 1.0, 2.0, 2.5, 3.0):
      log_b = sps.logsumexp(np.where(g <= q, tau * g, -np.inf), axis=1)
      log_x = np.log(n) + 0.5 * tau * tau + np.linspace(-3.0, 1.0, 40)
      bound = _below_exceeds(_xp.NP, np.log(n), np.float64(tau), np.float64(q), log_x)
      for lx, b in zip(log_x, bound, strict=True):
        if 0.02 <= b <= 0.6:
          checked += 1
          count = int(np.sum(log_b > lx))
          assert count <= scipy.stats.binom.isf(1e-7, rows, b), (tau, q, lx, b, count)
  assert checked >= 20, checked


def test_sharp_threshold_in_the_limit(x64):
  # k = n^C, tau = beta sqrt(ln n): the tail vanishes above beta^2 = 2 (1 - C) (Theorem R3) and
  # the head vanishes below it (Theorem R1'); Corollary R4. C = 0.5: threshold beta = 1.
  n = 10.0 ** np.arange(8, 301, 12)
  k = np.ceil(n**0.5)
  tail = np.asarray(B.tail_mass_exceeds_prob(n, 1.2 * np.sqrt(np.log(n)), k=k, eps=0.05))
  head = np.asarray(B.head_mass_exceeds_prob(n, 0.8 * np.sqrt(np.log(n)), k=k, eps=0.05))
  # Both decay like exp(-const * ln n): slowly, so the far end is n = 1e296.
  for b in (tail, head):
    assert b[-1] < 1e-4 and np.all(np.diff(b) <= 1e-12), b
  # Collapsed phase with n^C keys (beta = 2 > sqrt 2, C = 0.25): still sufficient.
  tail = np.asarray(
    B.tail_mass_exceeds_prob(n, 2.0 * np.sqrt(np.log(n)), k=np.ceil(n**0.25), eps=0.05)
  )
  assert tail[-1] < 1e-6, tail


def test_r1_prime_closes_the_band(x64):
  # C = 0.25, beta = 1: inside the band ln n <= tau^2 < 2 (1 - C) ln n that Theorem R1 (the
  # closed form below, a = inf and lam = 1/2) cannot reach. R1' is never above R1 and tends to 0.
  n = 10.0 ** np.arange(8, 301, 12)
  k, tau, eps = np.ceil(n**0.25), np.sqrt(np.log(n)), 0.1
  q = -sps.ndtri(k / n)
  c = 2 * (k / n) * np.exp(tau * q - tau**2 / 2)
  r1 = np.where(
    c < eps, np.minimum(4 * np.exp(tau**2) / n + 2 * sps.ndtr(tau - q) / (eps - c), 1), 1
  )
  r1p = np.asarray(B.head_mass_exceeds_prob(n, tau, k=k, eps=eps))
  assert np.all(r1 == 1.0) and np.all(r1p <= r1 + 1e-12)
  assert r1p[-1] < 1e-3 and np.all(np.diff(r1p) <= 1e-12), r1p


def _pd_tail_means(m, ks, samples, key):
  """Monte Carlo `E sum_{i > k} V_i` for `PD(m, 0)`: `V_i` proportional to `Gamma_i^{-1/m}`."""
  j = 4000
  gam = np.cumsum(np.asarray(jax.random.exponential(key, (samples, j), jnp.float64)), axis=1)
  y = gam ** (-1.0 / m)
  # Points beyond j: their sum is sum_{i > j} Gamma_i^{-1/m}, about its mean given Gamma_j.
  rest = gam[:, -1] ** (1.0 - 1.0 / m) / (1.0 / m - 1.0)
  z = y.sum(axis=1) + rest
  out = [(y[:, k:].sum(axis=1) + rest) / z for k in ks]
  return np.array([o.mean() for o in out]), np.array([o.std() / np.sqrt(samples) for o in out])


def test_collapsed_tail_mean_matches_poisson_dirichlet(x64):
  # 3000 PD(m, 0) samples per beta (4000 points each, the rest by its conditional mean, whose
  # error is far below the tolerance); |MC - formula| <= 5 standard errors + 0.004: a
  # false-failure rate below 1e-5 per entry (6 entries).
  key = jax.random.key(13)
  ks = np.array([1, 2, 8])
  for i, beta in enumerate((1.6, 3.0)):
    mc, se = _pd_tail_means(np.sqrt(2.0) / beta, ks, 3000, jax.random.fold_in(key, i))
    got = np.asarray(B.collapsed_tail_mean(ks, beta))
    np.testing.assert_array_less(np.abs(got - mc), 5 * se + 0.004)
  # Limits in m: PD(0+) puts all mass on one atom, PD(1-) spreads it; decreasing in k.
  got = np.asarray(B.collapsed_tail_mean(np.arange(1, 9), 2.0))
  assert np.all(np.diff(got) < 0) and 0 < got[-1] < got[0] < 1
  assert float(B.collapsed_tail_mean(1, 200.0)) < 0.01
  assert float(B.collapsed_tail_mean(1, 1.415)) > 0.95


def test_jit_vmap_grad_and_errors():
  taus = jnp.array([3.0, 4.0, 5.0])
  f = jax.jit(jax.vmap(lambda t: B.tail_mass_exceeds_prob(4096, t, k=128, eps=0.3)))
  want = [float(B.tail_mass_exceeds_prob(4096, float(t), k=128, eps=0.3)) for t in taus]
  np.testing.assert_allclose(np.asarray(f(taus)), want, rtol=1e-4, atol=1e-6)
  # Values and gradients of the collapsed-phase mean in one compiled call (compiles are slow).
  val, grad = jax.jit(jax.vmap(jax.value_and_grad(lambda b: B.collapsed_tail_mean(2, b))))(taus)
  want = [float(B.collapsed_tail_mean(2, float(b))) for b in taus]
  np.testing.assert_allclose(np.asarray(val), want, rtol=1e-4)
  h = 0.01  # grad against a central difference of the eager values
  diff = [
    (float(B.collapsed_tail_mean(2, b + h)) - float(B.collapsed_tail_mean(2, b - h))) / (2 * h)
    for b in (3.0, 4.0, 5.0)
  ]
  np.testing.assert_allclose(np.asarray(grad), diff, rtol=1e-2)
  assert np.all(np.asarray(grad) < 0)
  assert float(B.tail_mass_exceeds_prob(100, 1.0, k=100, eps=0.1)) == 0.0
  with pytest.raises(ValueError, match="eps"):
    B.tail_mass_exceeds_prob(100, 1.0, k=4, eps=0.0)
  with pytest.raises(ValueError, match="k"):
    jax.jit(lambda t: B.tail_mass_exceeds_prob(100, t, k=0, eps=0.5))(1.0)
  with pytest.raises(ValueError, match="beta"):
    B.collapsed_tail_mean(1, 1.0)
  with pytest.raises(ValueError, match="k"):
    B.collapsed_tail_mean(1.5, 2.0)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _top_tails(key, tau, n, rows):
  s = tau * jax.random.normal(key, (rows, n))
  top = jax.lax.top_k(s, 8)[0]
  return -jnp.expm1(jax.lax.cumlogsumexp(top, axis=1) - jax.nn.logsumexp(s, axis=-1)[:, None])


def _convergence_table(rows=1024):
  """Finite-n Monte Carlo mean of the top-k tail at tau = beta sqrt(ln n) against the limit."""
  print("| n | beta | k | Monte Carlo mean (+- s.e.) | limit PD(sqrt2/beta) | m_n | PD(m_n) |")
  print("|---|---|---|---|---|---|---|")
  for n in (2**8, 2**12, 2**16, 2**20):
    chunk = 64 if n >= 2**16 else 1024
    for beta in (2.0, 3.0):
      tau = beta * np.sqrt(np.log(n))
      keys = [jax.random.key(i) for i in range(rows // chunk)]
      out = np.concatenate([np.asarray(_top_tails(kk, tau, n, chunk)) for kk in keys])
      m_n = -sps.ndtri(1.0 / n) / tau
      for k in (1, 4):
        t = out[:, k - 1]
        lim = float(B.collapsed_tail_mean(k, beta))
        fin = float(B.collapsed_tail_mean(k, np.sqrt(2.0) / m_n))
        se = t.std() / np.sqrt(rows)
        print(
          f"| 2^{int(np.log2(n))} | {beta} | {k} | {t.mean():.4f} +- {se:.4f} | {lim:.4f} | {m_n:.3f} | {fin:.4f} |"
        )


def _threshold_table(rows=256):
  """Monte Carlo top-k tail at k = ceil(n^C), tau = beta sqrt(ln n), on both sides of beta_c."""
  c = 0.5  # threshold beta_c = sqrt(2 (1 - C)) = 1
  print(
    "| n | beta | k | median tail | 90% quantile | R3 bound P(t > 0.5) | R1' bound P(1 - t > 0.5) |"
  )
  print("|---|---|---|---|---|---|---|")
  for n in (2**10, 2**14, 2**18):
    k = int(np.ceil(n**c))
    chunk = 64 if n >= 2**16 else 256
    for beta in (0.7, 1.3):
      tau = beta * np.sqrt(np.log(n))
      t = np.concatenate(
        [np.asarray(_tails(jax.random.key(i), n, chunk, tau, k)) for i in range(rows // chunk)]
      )
      r3 = float(B.tail_mass_exceeds_prob(n, tau, k=k, eps=0.5))
      r1 = float(B.head_mass_exceeds_prob(n, tau, k=k, eps=0.5))
      med, q90 = np.quantile(t, [0.5, 0.9])
      print(f"| 2^{int(np.log2(n))} | {beta} | {k} | {med:.4f} | {q90:.4f} | {r3:.3g} | {r1:.3g} |")


if __name__ == "__main__":
  _convergence_table()
  print()
  _threshold_table()
