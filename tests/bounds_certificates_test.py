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


def test_band_count_certificate_valid_and_within_its_factor():
  with jax.enable_x64(True):
    num, m, k, w, nb = 64, 300, 7, 0.25, 64
    scales = jnp.geomspace(0.1, 30.0, num)
    s = _rows(jax.random.key(1), num, m, scales)
    perm = jax.random.permutation(jax.random.key(2), m)  # order must not matter
    s_perm = s[:, perm]
    head = jax.nn.logsumexp(s[:, :k], axis=-1)
    t = jnp.exp(jax.nn.logsumexp(s[:, k:], axis=-1) - jax.nn.logsumexp(s, axis=-1))
    dropped = (perm >= k)[None, :] & jnp.ones((num, 1), bool)
    counts = B.band_counts(s_perm, dropped, s[:, k], width=w, num_bands=nb)
    # Counts computed independently with NumPy: band of each dropped logit below s_{k+1}.
    gap = np.floor((np.asarray(s[:, k : k + 1]) - np.asarray(s[:, k:])) / w).clip(0, nb)
    want = np.stack([(gap == b).sum(-1) for b in range(nb + 1)], -1)
    np.testing.assert_array_equal(np.asarray(counts), want)
    bound = np.asarray(B.band_count_tail_bound(head, s[:, k], counts, width=w))
    t = np.asarray(t)
    assert np.all(bound >= t * (1 - 1e-12))
    # Proposition C4: bound / t <= e^w + (m - k) e^{-B w} (u = s_{k+1} is a dropped logit).
    assert np.all(bound <= t * (np.exp(w) + (m - k) * np.exp(-nb * w)) * (1 + 1e-12))
    # Any kept set: keep a random set of 10 keys, u = the largest dropped logit.
    keep = np.zeros(m, bool)
    keep[np.asarray(jax.random.choice(jax.random.key(3), m, (10,), replace=False))] = True
    sk = np.asarray(s)
    lse_keep = jax.nn.logsumexp(jnp.where(keep, s, -jnp.inf), axis=-1)
    u = jnp.max(jnp.where(keep, -jnp.inf, s), axis=-1)
    c2 = B.band_counts(s, jnp.broadcast_to(~keep, s.shape), u, width=w, num_bands=nb)
    t2 = np.exp(np.log(np.exp(sk)[:, ~keep].sum(-1)) - np.log(np.exp(sk).sum(-1)))
    b2 = np.asarray(B.band_count_tail_bound(lse_keep, u, c2, width=w))
    assert np.all(b2 >= t2 * (1 - 1e-12)) and np.all(b2 <= t2 * 1.3)
  with pytest.raises(ValueError, match="width"):
    B.band_count_tail_bound(0.0, 0.0, jnp.ones((3,)), width=0.0)
  with pytest.raises(ValueError, match="num_bands"):
    B.band_counts(jnp.zeros((4,)), jnp.ones((4,), bool), 0.0, width=1.0, num_bands=0)
