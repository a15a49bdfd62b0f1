"""Theorem R1 (docs/theory.md, section 6): top-k of n^C keys fails at small tau."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from gsparse import bounds as B


def test_bound_holds_by_monte_carlo():
  # 2048 rows of n = 16384 i.i.d. N(0, tau^2) scores per setting. The count of rows whose
  # top-k head mass exceeds eps is Binomial(rows, p) with p <= the bound; the test fails when
  # it exceeds the (1 - 1e-6) quantile of Binomial(rows, bound): false-failure rate <= 2e-6.
  n, rows = 16384, 2048
  key = jax.random.key(7)
  for i, (tau, k, eps) in enumerate(((0.5, 16, 0.25), (1.0, 4, 0.3))):
    bound = float(B.head_mass_exceeds_prob(n, tau, k=k, eps=eps))
    assert 0 < bound < 0.5, bound  # informative here, so the count below can fail
    s = tau * jax.random.normal(jax.random.fold_in(key, i), (rows, n))
    head = jax.nn.logsumexp(jax.lax.top_k(s, k)[0], axis=-1) - jax.nn.logsumexp(s, axis=-1)
    count = int(jnp.sum(jnp.exp(head) > eps))
    allowed = int(scipy.stats.binom.isf(1e-6, rows, bound))
    assert count <= allowed, (tau, k, eps, count, allowed, bound)


def test_bound_vanishes_in_the_proven_regimes():
  n = 10.0 ** np.arange(4, 37, 4)  # float32-safe
  # Fixed tau, k = n^0.5: the head mass of n^C keys vanishes.
  fixed = np.asarray(B.head_mass_exceeds_prob(n, 1.0, k=np.ceil(n**0.5), eps=0.1))
  assert fixed[-1] < 1e-3 and np.all(np.diff(fixed[fixed < 1]) < 0), fixed
  # tau = beta sqrt(ln n) with beta = 0.5 < min(1, sqrt(2 (1 - C))) = 1 at C = 0.5.
  tau = 0.5 * np.sqrt(np.log(n))
  grow = np.asarray(B.head_mass_exceeds_prob(n, tau, k=np.ceil(n**0.5), eps=0.1))
  assert grow[-1] < 1e-3 and np.all(np.diff(grow[grow < 1]) < 0), grow
  # Outside the condition (collapsed: tau far above q) the theorem says nothing: 1.
  assert float(B.head_mass_exceeds_prob(1e4, 6.0, k=100, eps=0.1)) == 1.0
  assert float(B.head_mass_exceeds_prob(100, 1.0, k=100, eps=0.1)) == 1.0


def test_jit_vmap_and_errors():
  f = jax.jit(jax.vmap(lambda t: B.head_mass_exceeds_prob(1e6, t, k=32, eps=0.2)))
  out = np.asarray(f(jnp.array([0.1, 0.5, 1.0])))
  want = [float(B.head_mass_exceeds_prob(1e6, t, k=32, eps=0.2)) for t in (0.1, 0.5, 1.0)]
  np.testing.assert_allclose(out, want, rtol=1e-4)
  with pytest.raises(ValueError, match="eps"):
    B.head_mass_exceeds_prob(100, 1.0, k=4, eps=1.0)
  with pytest.raises(ValueError, match="tau"):
    B.head_mass_exceeds_prob(100, -1.0, k=4, eps=0.5)
