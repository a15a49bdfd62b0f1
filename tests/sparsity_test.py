"""Sparsity measures and the exact error identity, against NumPy float64."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse


def _rows(key, shape, temperature):
  return jax.nn.softmax(temperature * jax.random.normal(key, shape), axis=-1)


def _np_topk_mask(p, k):
  keep = np.zeros(p.shape, bool)
  for idx in np.ndindex(*p.shape[:-1]):
    order = np.argsort(-p[idx], kind="stable")
    keep[idx][order[:k]] = True
  return keep


@pytest.mark.parametrize("temperature", [0.5, 3.0, 10.0])
def test_min_k_is_sparse_and_tail_mass_match_numpy(temperature):
  p = _rows(jax.random.key(0), (5, 3, 64), temperature)
  pn = np.asarray(p, np.float64)
  for eps in (0.001, 0.02, 0.3):
    mk = np.asarray(gsparse.sparsity.min_sparse_k(p, eps=eps))
    np.testing.assert_array_equal(mk, (pn > eps).sum(-1))
    # Trivial baseline (Fact 1): at most ceil(1/eps) - 1 entries can exceed eps.
    assert mk.max() <= math.ceil(1 / eps) - 1
    np.testing.assert_array_equal(
      gsparse.sparsity.is_sparse(p, eps=eps, k=4), (pn > eps).sum(-1) <= 4
    )
  for k in (1, 5, 64, 100):
    want = np.where(_np_topk_mask(pn, k), 0.0, pn).sum(-1)
    np.testing.assert_allclose(gsparse.sparsity.tail_mass(p, k=k), want, atol=1e-6)


def test_tail_mass_keeps_tiny_tails():
  p = jnp.array([1.0 - 3e-30, 1e-30, 2e-30], jnp.float32)
  # 1 - head would round to 0; the direct tail sum keeps 3e-30.
  np.testing.assert_allclose(gsparse.sparsity.tail_mass(p, k=1), 3e-30, rtol=1e-5)


def test_effective_support():
  np.testing.assert_allclose(
    gsparse.sparsity.effective_support(jnp.full((8,), 1 / 8)), 8.0, rtol=1e-6
  )
  np.testing.assert_allclose(gsparse.sparsity.effective_support(jnp.eye(4)[1]), 1.0)
  assert gsparse.sparsity.effective_support(jnp.zeros(4)) == 0.0
  p = _rows(jax.random.key(1), (7, 30), 2.0)
  pn = np.asarray(p, np.float64)
  np.testing.assert_allclose(gsparse.sparsity.effective_support(p), 1 / (pn**2).sum(-1), rtol=1e-5)


@pytest.mark.parametrize("k", [1, 4, 31, 32])
def test_error_identity_holds(k):
  key1, key2 = jax.random.split(jax.random.key(2))
  p = _rows(key1, (6, 32), 2.0)
  v = jax.random.normal(key2, (6, 32, 5))
  dec = gsparse.sparsity.topk_error_decomposition(p, v, k=k)
  pn, vn = np.asarray(p, np.float64), np.asarray(v, np.float64)
  keep = _np_topk_mask(pn, k)
  ph = np.where(keep, pn, 0.0)
  head = np.einsum("bn,bnd->bd", ph / ph.sum(-1, keepdims=True), vn)
  dense = np.einsum("bn,bnd->bd", pn, vn)
  np.testing.assert_allclose(dec.head_mean, head, atol=1e-5)
  np.testing.assert_allclose(dec.output, dense, atol=1e-5)
  np.testing.assert_allclose(dec.error, np.linalg.norm(dense - head, axis=-1), atol=1e-5)
  np.testing.assert_allclose(dec.identity_error, dec.error, atol=1e-5)
  np.testing.assert_allclose(dec.tail_mass, np.where(keep, 0.0, pn).sum(-1), atol=1e-6)
  if k == 32:
    np.testing.assert_array_equal(dec.tail_mass, 0.0)
    np.testing.assert_array_equal(dec.tail_mean, 0.0)


def test_error_identity_float64(x64):
  p = jax.nn.softmax(jax.random.normal(jax.random.key(3), (4, 50), jnp.float64) * 4, -1)
  v = jax.random.normal(jax.random.key(4), (4, 50, 3), jnp.float64)
  dec = gsparse.sparsity.topk_error_decomposition(p, v, k=5)
  assert dec.error.dtype == jnp.float64
  np.testing.assert_allclose(dec.identity_error, dec.error, rtol=1e-12, atol=1e-14)


def test_matches_top_k_attention_output():
  q, k, v = jax.random.normal(jax.random.key(5), (3, 10, 1, 4)) * 1.5
  p = gsparse.attention_weights(q, k)[0]
  dec = gsparse.sparsity.topk_error_decomposition(p, v[:, 0], k=3)
  np.testing.assert_allclose(dec.head_mean, gsparse.topk_attention(q, k, v, k=3)[:, 0], atol=1e-5)


def test_jit_vmap_grad():
  p = _rows(jax.random.key(6), (4, 16), 2.0)
  v = jax.random.normal(jax.random.key(7), (4, 16, 3))
  f = lambda p: gsparse.sparsity.topk_error_decomposition(p, v, k=4).error
  np.testing.assert_allclose(jax.jit(f)(p), f(p), atol=1e-6)
  np.testing.assert_allclose(
    jax.vmap(lambda p, v: gsparse.sparsity.topk_error_decomposition(p, v, k=4).error)(p, v),
    f(p),
    atol=1e-6,
  )
  eps_sweep = jax.vmap(lambda e: gsparse.sparsity.min_sparse_k(p, eps=e))(jnp.array([0.01, 0.1]))
  assert eps_sweep.shape == (2, 4)
  g = jax.grad(lambda p: f(p).sum())(p)
  assert np.all(np.isfinite(g))
