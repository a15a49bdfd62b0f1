"""The Gaussian-input setting."""

import jax
import jax.numpy as jnp
import numpy as np

import gsparse


def test_input_moments():
  # 200,000 entries; the sample variance's standard error is sqrt(2/N) * sigma^2 ~ 0.0032 * 4,
  # so a 6-sigma tolerance has a false-failure rate < 1e-8.
  x = gsparse.gaussian.sample_inputs(jax.random.key(0), n=2000, d=100, sigma=2.0)
  assert x.shape == (2000, 100) and x.dtype == jnp.float32
  n = x.size
  assert abs(float(x.mean())) < 6 * 2.0 / np.sqrt(n)
  assert abs(float(x.var()) - 4.0) < 6 * 4.0 * np.sqrt(2 / n)


def test_weights_shapes_and_scale():
  w = gsparse.gaussian.sample_weights(jax.random.key(1), d=64, head_dim=16, heads=3, value_dim=8)
  assert w.w_q.shape == (64, 3, 16) and w.w_v.shape == (64, 3, 8)
  # 3072 entries with std 1/8: standard error of the variance ~ sqrt(2/3072)/64.
  assert abs(float(w.w_q.var()) - 1 / 64) < 6 * np.sqrt(2 / w.w_q.size) / 64


def test_scores_equal_quadratic_form_in_m():
  kx, kw = jax.random.split(jax.random.key(2))
  x = gsparse.gaussian.sample_inputs(kx, n=12, d=6, sigma=1.5, batch_shape=(2,))
  w = gsparse.gaussian.sample_weights(kw, d=6, head_dim=4, heads=2)
  q, k, _ = gsparse.gaussian.project(x, w)
  logits = gsparse.compute_logits(q, k).logits  # [2, heads, n, n]
  m = gsparse.gaussian.interaction_matrix(w.w_q, w.w_k)  # [heads, d, d]
  xn, mn = np.asarray(x, np.float64), np.asarray(m, np.float64)
  want = np.einsum("bid,hde,bje->bhij", xn, mn, xn)
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


def test_gaussian_attention_is_dense_attention_of_projections():
  kx, kw = jax.random.split(jax.random.key(3))
  x = gsparse.gaussian.sample_inputs(kx, n=10, d=8)
  w = gsparse.gaussian.sample_weights(kw, d=8, head_dim=4, heads=2)
  q, k, v = gsparse.gaussian.project(x, w)
  np.testing.assert_allclose(
    gsparse.gaussian.gaussian_attention(x, w), jax.nn.dot_product_attention(q, k, v), atol=1e-6
  )
  p = gsparse.gaussian.gaussian_attention_weights(x, w, is_causal=True)
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)


def test_vmap_over_sigma_and_keys():
  keys = jax.random.split(jax.random.key(4), 3)
  sigmas = jnp.array([0.5, 1.0, 2.0])
  xs = jax.vmap(lambda k, s: gsparse.gaussian.sample_inputs(k, n=4, d=3, sigma=s))(keys, sigmas)
  assert xs.shape == (3, 4, 3)
  np.testing.assert_allclose(
    xs[1] * 2.0, gsparse.gaussian.sample_inputs(keys[1], n=4, d=3, sigma=2.0), rtol=1e-6
  )
