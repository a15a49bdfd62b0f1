"""Top-k attention against an independent float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse
from tests import np_reference as ref
from tests.inputs import random_qkv as _qkv

TOL = {jnp.float32: 3e-5, jnp.bfloat16: 3e-2}

# One compiled program per configuration: much cheaper than op-by-op dispatch
# of the whole selection (eager calls are compared with jit and vmap in
# test_jit_and_vmap_agree).
_topk = jax.jit(gsparse.topk_attention, static_argnames=("k", "scale", "is_causal", "return_stats"))
_dense = jax.jit(gsparse.dot_product_attention, static_argnames=("is_causal",))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("topk", [1, 3, 8])
def test_topk_matches_numpy(dtype, topk):
  q, k, v = _qkv(jax.random.key(0), (2,), 8, 11, 4, 2, 6, 5, dtype, scale=1.5)
  out = _topk(q, k, v, k=topk)
  assert out.dtype == dtype and out.shape == (2, 8, 4, 5)
  # The reference selects on float64 logits of the same (rounded) inputs.
  q64, k64 = np.asarray(q, np.float64), np.asarray(k, np.float64)
  want = ref.topk_attention(q64, k64, np.asarray(v, np.float64), topk=topk)
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=TOL[dtype])


def test_topk_with_mask_bias_causal_matches_numpy():
  q, k, v = _qkv(jax.random.key(1), (), 9, 9, 2, 1, 4, 3, scale=1.3)
  mask = jax.random.bernoulli(jax.random.key(2), 0.6, (2, 9, 9))
  bias = jax.random.normal(jax.random.key(3), (2, 9, 9))
  out = _topk(q, k, v, bias, mask, k=3, is_causal=True, scale=0.7)
  want = ref.topk_attention(q, k, v, topk=3, bias=bias, mask=mask, is_causal=True, scale=0.7)
  np.testing.assert_allclose(out, want, atol=3e-5)


@pytest.mark.parametrize("topk", [9, 10, 1000])
def test_k_at_least_n_equals_dense(topk):
  q, k, v = _qkv(jax.random.key(4), (2,), 9, 9, 2, 2, 4, 4)
  for causal in (False, True):
    np.testing.assert_allclose(
      _topk(q, k, v, k=topk, is_causal=causal),
      _dense(q, k, v, is_causal=causal),
      atol=2e-6,
    )


def test_k1_returns_value_of_argmax_key():
  q, k, v = _qkv(jax.random.key(5), (), 6, 10, 1, 1, 4, 4, scale=2.0)
  out = _topk(q, k, v, k=1)
  lg, _ = ref.logits(q, k)
  best = lg[0].argmax(-1)
  np.testing.assert_allclose(out[:, 0], np.asarray(v)[best, 0], atol=1e-6)


def test_ties_keep_lower_index_and_are_finite():
  # All logits equal: the top-k set is the first k keys, weights uniform over them.
  q = jnp.zeros((4, 1, 3))
  k = jnp.zeros((7, 1, 3))
  v = jnp.arange(7.0)[:, None, None] * jnp.ones((7, 1, 2))
  out, stats = _topk(q, k, v, k=3, return_stats=True)
  np.testing.assert_array_equal(
    np.sort(np.asarray(stats.indices), -1), np.broadcast_to([0, 1, 2], (4, 1, 3))
  )
  np.testing.assert_allclose(out, 1.0)  # mean of values 0, 1, 2
  # Certificate: 4 dropped keys of equal logit -> t <= 4/7, exactly the true tail.
  np.testing.assert_allclose(stats.tail_mass_bound, 4 / 7, rtol=1e-6)


def test_rows_with_fewer_admissible_keys_than_k():
  q, k, v = _qkv(jax.random.key(6), (), 6, 6, 1, 1, 4, 4)
  out, stats = _topk(q, k, v, k=4, is_causal=True, return_stats=True)
  want = ref.topk_attention(q, k, v, topk=4, is_causal=True)
  np.testing.assert_allclose(out, want, atol=2e-6)
  # Query 0 sees one key: one index, three "no key" slots, nothing dropped.
  idx = np.asarray(stats.indices)[0, 0]
  assert idx[0] == 0 and np.all(idx[1:] == -1)
  np.testing.assert_array_equal(stats.tail_mass_bound[:4], 0.0)


def test_fully_masked_rows_are_zero_not_nan():
  q, k, v = _qkv(jax.random.key(7), (), 3, 5, 1, 1, 4, 4)
  mask = jnp.ones((1, 3, 5), bool).at[:, 1].set(False)
  out, stats = _topk(q, k, v, mask=mask, k=2, return_stats=True)
  np.testing.assert_array_equal(out[1], 0.0)
  assert np.isneginf(stats.logsumexp[1, 0])
  np.testing.assert_array_equal(stats.tail_mass_bound[1], 0.0)
  g = jax.jit(jax.grad(lambda q: gsparse.topk_attention(q, k, v, mask=mask, k=2).sum()))(q)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g[1]) == 0)


def test_single_key():
  q, k, v = _qkv(jax.random.key(8), (), 1, 1, 1, 1, 2, 2)
  np.testing.assert_allclose(_topk(q, k, v, k=1), v, atol=1e-7)


def test_certificate_bounds_true_tail_mass_and_error():
  q, k, v = _qkv(jax.random.key(9), (3,), 32, 48, 2, 2, 8, 8, scale=1.5)
  for topk in (1, 4, 16):
    out, stats = _topk(q, k, v, k=topk, return_stats=True)
    lg, valid = ref.logits(q, k)
    p = ref.softmax_rows(lg, valid)
    _, keep = ref.topk_weights(lg, valid, topk)
    tail = np.swapaxes(np.where(keep, 0.0, p).sum(-1), -1, -2)  # [b, T, N]
    assert np.all(np.asarray(stats.tail_mass_bound, np.float64) >= tail * (1 - 1e-5) - 1e-7)
    err = np.linalg.norm(ref.apply(p, v) - np.asarray(out, np.float64), axis=-1)
    assert np.all(np.asarray(stats.error_bound, np.float64) >= err * (1 - 1e-5) - 1e-6)


def test_gradient_matches_dense_on_kept_keys():
  # Gradient of top-k attention = gradient of dense attention masked to the kept set.
  q, k, v = _qkv(jax.random.key(10), (), 7, 7, 1, 1, 4, 4, scale=1.2)
  _, stats = _topk(q, k, v, k=3, return_stats=True)
  keep = np.zeros((1, 7, 7), bool)
  idx = np.asarray(stats.indices)[:, 0]
  for t in range(7):
    keep[0, t, idx[t]] = True
  f_top = lambda q, k, v: (gsparse.topk_attention(q, k, v, k=3) ** 2).sum()
  f_den = lambda q, k, v: (
    gsparse.dot_product_attention(q, k, v, mask=jnp.asarray(keep)) ** 2
  ).sum()
  grads = jax.jit(lambda *a: (jax.grad(f_top, (0, 1, 2))(*a), jax.grad(f_den, (0, 1, 2))(*a)))
  for a, b in zip(*grads(q, k, v), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_jit_and_vmap_agree():
  q, k, v = _qkv(jax.random.key(11), (3,), 8, 8, 2, 1, 4, 4)
  f = lambda q, k, v: gsparse.topk_attention(q, k, v, k=3, is_causal=True)
  eager = f(q, k, v)
  np.testing.assert_allclose(jax.jit(f)(q, k, v), eager, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(f)(q, k, v), eager, atol=1e-6)


def test_sparse_gather_duplicates_and_out_of_range_indices():
  q, k, v = _qkv(jax.random.key(12), (), 2, 6, 1, 1, 4, 3)
  idx = jnp.array([[[1, 1, 4, -1]], [[7, 2, 2, 2]]])  # [T, N, k]
  out = jax.jit(gsparse.sparse_gather_attention)(q, k, v, idx)
  lg, _ = ref.logits(q, k)
  keep = np.zeros((1, 2, 6), bool)
  keep[0, 0, [1, 4]] = True
  keep[0, 1, [2]] = True
  want = ref.apply(ref.softmax_rows(lg, keep), v)
  np.testing.assert_allclose(out, want, atol=1e-6)
