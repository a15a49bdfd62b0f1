"""Dense attention against an independent float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse
from tests import np_reference as ref
from tests.inputs import random_qkv as _qkv

# Per-dtype tolerances (max abs error of outputs with O(1) values).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2, jnp.float16: 5e-3}

# One compiled program per configuration instead of op-by-op dispatch (eager
# calls are compared with jit, vmap and grad in test_jit_vmap_grad).
_dense = jax.jit(gsparse.dot_product_attention, static_argnames=("scale", "is_causal"))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
  "batch,t,s,n,kh,h,hv",
  [
    ((), 7, 7, 1, 1, 4, 4),
    ((2,), 5, 9, 4, 2, 6, 3),
    ((2, 3), 8, 8, 2, 2, 8, 8),
    ((1,), 1, 1, 1, 1, 3, 2),
  ],
)
def test_dense_matches_numpy(dtype, batch, t, s, n, kh, h, hv):
  q, k, v = _qkv(jax.random.key(0), batch, t, s, n, kh, h, hv, dtype)
  out = _dense(q, k, v)
  assert out.dtype == dtype and out.shape == (*batch, t, n, hv)
  want = ref.attention(np.asarray(q, np.float64), np.asarray(k, np.float64), v)
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=TOL[dtype], rtol=0)


def test_mask_bias_causal_match_numpy():
  q, k, v = _qkv(jax.random.key(1), (2,), 6, 6, 4, 2, 8, 5)
  mask = jax.random.bernoulli(jax.random.key(2), 0.7, (2, 1, 6, 6))
  mask = mask.at[..., 0].set(True)  # no fully masked row
  bias = jax.random.normal(jax.random.key(3), (1, 4, 6, 6))
  out = _dense(q, k, v, bias, mask, scale=0.3, is_causal=True)
  want = ref.attention(q, k, v, scale=0.3, bias=bias, mask=mask, is_causal=True)
  np.testing.assert_allclose(out, want, atol=2e-5)


def test_equals_jax_nn_dot_product_attention():
  q, k, v = _qkv(jax.random.key(4), (3,), 16, 16, 4, 4, 8, 8)
  for kwargs in ({}, {"is_causal": True}, {"scale": 0.5}):
    np.testing.assert_allclose(
      _dense(q, k, v, **kwargs),
      jax.jit(jax.nn.dot_product_attention, static_argnames=("scale", "is_causal"))(
        q, k, v, **kwargs
      ),
      atol=1e-5,
    )


def test_weights_are_row_stochastic():
  q, k, _ = _qkv(jax.random.key(5), (), 10, 12, 2, 1, 4, 4)
  p = jax.jit(gsparse.attention_weights)(q, k)
  assert p.shape == (2, 10, 12)
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
  lg, valid = ref.logits(q, k)
  np.testing.assert_allclose(p, ref.softmax_rows(lg, valid), atol=1e-6)


def test_fully_masked_rows_give_zero_output_and_zero_gradient():
  q, k, v = _qkv(jax.random.key(6), (), 4, 5, 1, 1, 3, 3)
  mask = jnp.ones((1, 4, 5), bool).at[:, 2, :].set(False)

  def f(q, k, v):
    return gsparse.dot_product_attention(q, k, v, mask=mask)

  out = jax.jit(f)(q, k, v)
  np.testing.assert_array_equal(out[2], 0.0)
  assert np.all(np.isfinite(out))
  gq, gk, gv = jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(q, k, v)
  for g in (gq, gk, gv):
    assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(gq[2], 0.0)


@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_huge_logits_are_finite(magnitude):
  q, k, v = _qkv(jax.random.key(7), (), 6, 6, 1, 1, 4, 4)
  out = _dense(q * magnitude, k, v, scale=1.0)
  assert np.all(np.isfinite(out))
  lg, valid = ref.logits(q * magnitude, k, scale=1.0)
  np.testing.assert_allclose(out, ref.apply(ref.softmax_rows(lg, valid), v), atol=1e-4)


def test_jit_vmap_grad():
  q, k, v = _qkv(jax.random.key(8), (4,), 6, 6, 2, 2, 4, 4)
  eager = gsparse.dot_product_attention(q, k, v, is_causal=True)
  jitted = jax.jit(lambda *a: gsparse.dot_product_attention(*a, is_causal=True))(q, k, v)
  vmapped = jax.vmap(lambda *a: gsparse.dot_product_attention(*a, is_causal=True))(q, k, v)
  np.testing.assert_allclose(jitted, eager, atol=1e-6)
  np.testing.assert_allclose(vmapped, eager, atol=1e-6)
  g = jax.grad(lambda q: gsparse.dot_product_attention(q, k, v, is_causal=True).sum())(q)
  g_ref = jax.grad(lambda q: jax.nn.dot_product_attention(q, k, v, is_causal=True).sum())(q)
  np.testing.assert_allclose(g, g_ref, atol=1e-5)
