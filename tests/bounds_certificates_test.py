"""The multi-gap certificate (docs/theory.md, Proposition C2 and Corollary C3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsparse import bounds as B


def _rows(key, num, m, scales):
  """`[num, m]` sorted-descending logits with per-row scales (diffuse to collapsed)."""
  s = jax.random.normal(key, (num, m), jnp.float64) * scales[:, None]
  return -jnp.sort(-s, axis=-1)


def test_valid_and_within_two_with_full_dyadic_ranks():
  with jax.enable_x64(True):
    num, m, k = 64, 300, 7
    scales = jnp.geomspace(0.1, 30.0, num)
    s = _rows(jax.random.key(0), num, m, scales)
    head = jax.nn.logsumexp(s[:, :k], axis=-1)
    t = jnp.exp(jax.nn.logsumexp(s[:, k:], axis=-1) - jax.nn.logsumexp(s, axis=-1))
    full = B.dyadic_band_ranks(k, max_rank=m)
    assert full[0] == k + 1 and full[-1] <= m < k + 2 * (full[-1] - k)
    bound = B.multi_gap_tail_bound(head, s[:, full - 1], m, k=k, band_ranks=full)
    # Proposition C2 (validity) and Corollary C3 (t <= bound <= 2 t), up to float64 rounding.
    assert np.all(np.asarray(bound) >= np.asarray(t) * (1 - 1e-12))
    assert np.all(np.asarray(bound) <= 2 * np.asarray(t) * (1 + 1e-12))
    # Truncated ranks (top-4k only): still valid, and never looser than the single gap.
    part = B.dyadic_band_ranks(k, max_rank=4 * k)
    pb = B.multi_gap_tail_bound(head, s[:, part - 1], m, k=k, band_ranks=part)
    single = B.tail_mass_certificate(head, s[:, k], m, k)
    assert np.all(np.asarray(pb) >= np.asarray(t) * (1 - 1e-12))
    assert np.all(np.asarray(pb) <= np.asarray(single) * (1 + 1e-12))
    # In collapsed rows the single gap is loose by orders of magnitude; the multi gap is not.
    collapsed = np.asarray(scales) > 10
    assert np.max(np.asarray(single / t)[collapsed]) > 100
    assert np.max(np.asarray(bound / t)[collapsed]) <= 2


def test_edge_cases_and_transforms():
  ranks = np.array([3, 4, 6])
  lse = jnp.float32(1.0)
  logits = jnp.array([0.0, -1.0, -2.0], jnp.float32)
  # Bands: {3}, {4, 5}, {6..m}. m = 2: nothing dropped; m = 4: bands {3}, {4}.
  assert float(B.multi_gap_tail_bound(lse, logits, 2, k=2, band_ranks=ranks)) == 0.0
  want = (np.exp(0.0) + np.exp(-1.0)) / (np.e + np.exp(0.0) + np.exp(-1.0))
  got = float(B.multi_gap_tail_bound(lse, logits, 4, k=2, band_ranks=ranks))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert float(B.multi_gap_tail_bound(-jnp.inf, logits, 4, k=2, band_ranks=ranks)) == 1.0
  assert np.isnan(float(B.multi_gap_tail_bound(jnp.nan, logits, 4, k=2, band_ranks=ranks)))
  neg = jnp.full((3,), -jnp.inf, jnp.float32)
  assert float(B.multi_gap_tail_bound(lse, neg, 9, k=2, band_ranks=ranks)) == 0.0
  # jit, vmap (over rows and num_keys) and grad.
  f = jax.jit(lambda h, a, m: B.multi_gap_tail_bound(h, a, m, k=2, band_ranks=ranks))
  batch = f(jnp.full((5,), 1.0), jnp.tile(logits, (5, 1)), jnp.arange(2, 7))
  np.testing.assert_allclose(np.asarray(batch)[2], want, rtol=1e-6)
  vm = jax.vmap(lambda h: B.multi_gap_tail_bound(h, logits, 4, k=2, band_ranks=ranks))
  np.testing.assert_allclose(np.asarray(vm(jnp.array([1.0, 1.0])))[0], want, rtol=1e-6)
  g = jax.grad(lambda h: B.multi_gap_tail_bound(h, logits, 4, k=2, band_ranks=ranks))(1.0)
  np.testing.assert_allclose(float(g), -want * (1 - want), rtol=1e-5)


def test_bad_arguments_raise():
  logits = jnp.zeros((3,))
  with pytest.raises(ValueError, match="band_ranks"):
    B.multi_gap_tail_bound(0.0, logits, 9, k=2, band_ranks=np.array([3, 3, 6]))
  with pytest.raises(ValueError, match="band_ranks"):
    B.multi_gap_tail_bound(0.0, logits, 9, k=2, band_ranks=np.array([3, 6]))
  with pytest.raises(ValueError, match="k \\+ 1"):
    B.multi_gap_tail_bound(0.0, logits, 9, k=1, band_ranks=np.array([3, 4, 6]))
  with pytest.raises(TypeError, match="band_logits"):
    B.multi_gap_tail_bound(0.0, jnp.zeros((3,), jnp.int32), 9, k=2, band_ranks=np.array([3, 4, 6]))
  with pytest.raises(ValueError, match="max_rank"):
    B.dyadic_band_ranks(4, max_rank=4)
  np.testing.assert_array_equal(B.dyadic_band_ranks(4, max_rank=12), [5, 6, 8, 12])
