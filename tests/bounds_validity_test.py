"""Validity of Theorems 1 and 2 and of both certificates at a high failure probability.

At delta = 1e-4 a wrong constant in a bound shows up as a violation only after
>> 10^4 matrices; at delta in {0.1, 0.3} it shows up within a few hundred
(docs/theory.md, section 8). Each setting draws R = 256 independent matrices
(one trial = one whole matrix: the theorems are about every row) and counts
the matrices that break a bound; the count of a valid bound is stochastically
below Binomial(R, delta). The test fails when a count exceeds the (1 - 1e-4)
quantile of Binomial(R, delta), so a correct bound fails one given
(setting, statistic) with probability <= 1e-4 and the whole test (16 settings
x 3 statistics) with probability <= 4.8e-3 (a union bound; the PRNG seed is
fixed, so the outcome is reproducible). The interaction matrices cover the
cases of the stress test of issue 19: positive-definite (large positive
diagonal scores), rank-1, negative-definite and generic M.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gsparse import bounds as B
from gsparse._bounds_mc import matrix_stats
from tests import mc_settings

_R = 256  # matrices per setting
_ALPHA = 1e-4  # false-failure probability per (setting, statistic)
_D = 4
_EPS = 0.05
_K = 4


def _interaction(kind: str, key: jax.Array) -> jax.Array:
  return mc_settings.interaction(kind, key, _D)


def _allowed(delta: float) -> int:
  return mc_settings.allowed_violations(delta, _R, _ALPHA)


def test_theorems_and_certificates_hold_at_high_delta():
  key = jax.random.key(19)
  settings, stats = [], []
  for ki, kind in enumerate(("pd", "rank1", "nd", "generic")):
    m = _interaction(kind, jax.random.fold_in(key, ki))
    w_v = jax.random.normal(jax.random.fold_in(key, 10 + ki), (_D, 3)) / math.sqrt(_D)
    fro = float(B.interaction_norms(m).frobenius)
    for n in (32, 128):
      for tau, delta in ((0.5, 0.3), (3.0, 0.1)):
        sigma = math.sqrt(tau / fro)
        st = matrix_stats(
          jax.random.fold_in(key, len(settings) + 100),
          m,
          w_v,
          jnp.float32(sigma),
          jnp.float32(_EPS),
          n=n,
          num_matrices=_R,
          ks=(_K,),
          batch_size=_R,
        )
        settings.append((kind, n, tau, delta, sigma, m, w_v))
        stats.append(jax.tree.map(np.asarray, st))
  n = np.array([s[1] for s in settings], np.float32)
  delta = np.array([s[3] for s in settings], np.float32)
  sigma = np.array([s[4] for s in settings], np.float32)
  norms = jax.vmap(B.interaction_norms)(jnp.stack([s[5] for s in settings]))
  vnorms = jax.vmap(B.interaction_norms)(jnp.stack([s[6] for s in settings]))
  sb = B.sparsity_bound(n, sigma, norms, eps=_EPS, delta=delta)
  eb = B.topk_error_bound(n, sigma, norms, k=_K, value_norms=vnorms, delta=delta)
  report = []
  for i, (s, st) in enumerate(zip(settings, stats, strict=True)):
    allowed = _allowed(float(s[3]))
    viol_k = int(np.sum(st.max_count > np.asarray(sb.k)[i]))
    viol_err = int(np.sum(st.max_error[:, 0] > np.asarray(eb.error)[i]))
    viol_tail = int(np.sum(st.max_tail[:, 0] > np.asarray(eb.tail_mass)[i]))
    report.append((s[:4], viol_k, viol_err, viol_tail, allowed))
    assert max(viol_k, viol_err, viol_tail) <= allowed, report[-1]
    # The certificates are deterministic: violated by float32 rounding only.
    assert np.max(st.cert_tail_excess) <= 1e-4, (s[:4], np.max(st.cert_tail_excess))
    assert np.max(st.multi_tail_excess) <= 1e-4, (s[:4], np.max(st.multi_tail_excess))
    assert np.max(st.band_tail_excess) <= 1e-4, (s[:4], np.max(st.band_tail_excess))
  # The bounds are not vacuous here (else the counts above could not fail): Theorem 1 is
  # informative in some settings and Theorem 2's tail bound is below 1 in some.
  assert np.any(np.asarray(sb.informative)), np.asarray(sb.k)
  assert np.any(np.asarray(eb.tail_mass) < 1.0), np.asarray(eb.tail_mass)
