"""Theorems 1C and 2C (docs/theory.md, section 3.2): causal masks, validity at high delta.

Each setting draws R = 256 independent causal attention matrices (row i sees keys
1..i) and counts the matrices in which some row breaks the bound; for a valid
bound the count is stochastically below Binomial(R, delta). A count above the
(1 - 1e-4) quantile fails the test, so a correct bound fails one (setting,
statistic) with probability <= 1e-4 and the whole test (4 settings x 2
statistics) with probability <= 8e-4 (union bound; the seed is fixed). d = 32:
with fewer dimensions the lower tail of tau_i is so heavy at the per-row levels
6 delta / (pi^2 i^2) that both bounds are trivial.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsparse import bounds as B
from gsparse.bounds.causal import causal_sparsity_bound, causal_tail_bound
from tests import mc_settings

_R, _ALPHA, _D, _N, _EPS, _K = 256, 1e-4, 32, 64, 0.05, 4


def _causal_stats(key, m, sigma):
  """Per matrix: the largest count of entries > eps and the largest top-k tail over the rows."""
  x = sigma * jax.random.normal(key, (_R, _N, _D))
  s = jnp.einsum("rid,de,rje->rij", x, m, x)
  mask = jnp.tril(jnp.ones((_N, _N), bool))
  s = jnp.where(mask, s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  count = jnp.max(jnp.sum(p > _EPS, axis=-1), axis=-1)
  head = jnp.sum(jax.lax.top_k(p, _K)[0], axis=-1)  # rows with <= k keys keep everything
  return np.asarray(count), np.asarray(jnp.max(1.0 - head, axis=-1))


@pytest.mark.slow  # eight bound evaluations over six row groups, ~15-40 s on 2 shared cores
def test_causal_bounds_hold_at_high_delta():
  key = jax.random.key(23)
  report = []
  for ki, kind in enumerate(("pd", "rank1", "nd", "generic")):
    m = mc_settings.interaction(kind, jax.random.fold_in(key, ki), _D)
    norms = B.interaction_norms(m)
    for tau, delta in ((8.0, 0.3),):  # the causal bounds are trivial at smaller tau here
      sigma = math.sqrt(tau / float(norms.frobenius))
      k = float(causal_sparsity_bound(_N, sigma, norms, eps=_EPS, delta=delta).value)
      t = float(causal_tail_bound(_N, sigma, norms, k=_K, delta=delta).value)
      count, tail = _causal_stats(jax.random.fold_in(key, 10 + ki), m, sigma)
      allowed = mc_settings.allowed_violations(delta, _R, _ALPHA)
      viol = (int(np.sum(count > k)), int(np.sum(tail > t * (1 + 1e-5))))
      report.append((kind, tau, delta, k, t, viol, allowed))
      assert max(viol) <= allowed, report[-1]
  # Not vacuous: the k bound is below the trivial min(ceil(1/eps) - 1, n) = 19 somewhere, and
  # the tail bound below 1 - k/n somewhere (else the counts above could not fail).
  assert any(r[3] < 19 for r in report), report
  assert any(r[4] < 1 - _K / _N for r in report), report


def test_causal_bounds_trivial_cases_and_errors():
  norms = B.interaction_norms(jnp.eye(3))
  # One row of one key: k = 1; k >= n keeps every key: tail 0.
  assert float(causal_sparsity_bound(1, 1.0, norms, eps=0.1, delta=0.1).value) == 1.0
  assert float(causal_tail_bound(4, 1.0, norms, k=4, delta=0.1).value) == 0.0
  with pytest.raises(ValueError, match="eps"):
    causal_sparsity_bound(8, 1.0, norms, eps=1.0, delta=0.1)
  with pytest.raises(ValueError, match="k"):
    causal_tail_bound(8, 1.0, norms, k=0, delta=0.1)
