"""Tests of gsparse.flax: top-k attention_fn in linen and nnx, policies, decode."""

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

import gsparse
import gsparse.flax as gf
from gsparse.flax import attention as gf_attention
from gsparse.flax import policies as gf_policies

ATOL = 2e-5
B, T, D, HEADS = 2, 7, 16, 2


def _inputs(seed, *, t=T):
  return jax.random.normal(jax.random.key(seed), (B, t, D))


def _random_mask(key, shape):
  """Boolean mask with at least one admissible key per row (flax averages empty rows)."""
  m = jax.random.bernoulli(key, 0.6, shape)
  return m.at[..., 0].set(True)


class AttentionFnTest(parameterized.TestCase):
  @parameterized.product(masked=[False, True], causal=[False, True])
  def test_linen_matches_flax_dense_when_k_covers_sequence(self, masked, causal):
    x = _inputs(0)
    mask = _random_mask(jax.random.key(1), (B, 1, T, T)) if masked else None
    if causal:
      cm = nn.make_causal_mask(x[..., 0])
      mask = cm if mask is None else nn.combine_masks(mask, cm)
    dense = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D)
    sparse = nn.MultiHeadDotProductAttention(
      num_heads=HEADS, qkv_features=D, attention_fn=gf.topk_attention_fn(k=T)
    )
    params = dense.init(jax.random.key(2), x)
    want = dense.apply(params, x, mask=mask)
    got = sparse.apply(params, x, mask=mask)
    np.testing.assert_allclose(got, want, atol=ATOL)

    cot = jax.random.normal(jax.random.key(3), want.shape)
    g_want = jax.grad(lambda p: jnp.sum(dense.apply(p, x, mask=mask) * cot))(params)
    g_got = jax.grad(lambda p: jnp.sum(sparse.apply(p, x, mask=mask) * cot))(params)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
      assert np.all(np.isfinite(a))
      np.testing.assert_allclose(a, b, atol=1e-4)

  @parameterized.product(masked=[False, True], causal=[False, True])
  def test_nnx_matches_flax_dense_when_k_covers_sequence(self, masked, causal):
    x = _inputs(4)
    mask = _random_mask(jax.random.key(5), (B, HEADS, T, T)) if masked else None

    def make(fn):
      kw = {} if fn is None else {"attention_fn": fn}
      return nnx.MultiHeadAttention(
        num_heads=HEADS, in_features=D, qkv_features=D, decode=False, rngs=nnx.Rngs(6), **kw
      )

    dense, sparse = make(None), make(gf.topk_attention_fn(k=T + 3))
    want = dense(x, mask=mask, is_causal=causal)
    got = sparse(x, mask=mask, is_causal=causal)
    np.testing.assert_allclose(got, want, atol=ATOL)

    cot = jax.random.normal(jax.random.key(7), want.shape)

    def loss(m):
      return jnp.sum(m(x, mask=mask, is_causal=causal) * cot)

    g_want = nnx.grad(loss)(dense)
    g_got = nnx.grad(loss)(sparse)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
      assert np.all(np.isfinite(a))
      np.testing.assert_allclose(a, b, atol=1e-4)

  def test_direct_call_with_bias_and_broadcast_dropout_equals_flax(self):
    kq, kk, kv, kb, kd = jax.random.split(jax.random.key(8), 5)
    q = jax.random.normal(kq, (B, T, HEADS, 4))
    k = jax.random.normal(kk, (B, T + 2, HEADS, 4))
    v = jax.random.normal(kv, (B, T + 2, HEADS, 4))
    bias = jax.random.normal(kb, (B, HEADS, T, T + 2))
    kw = dict(dropout_rng=kd, dropout_rate=0.3, deterministic=False, broadcast_dropout=True)
    want = nn.dot_product_attention(q, k, v, bias=bias, **kw)
    got = gf.topk_attention_fn(k=T + 2)(q, k, v, bias=bias, **kw)
    np.testing.assert_allclose(got, want, atol=ATOL)
    # Dropout is really on: a different key gives a different result.
    other = gf.topk_attention_fn(k=T + 2)(q, k, v, bias=bias, **{**kw, "dropout_rng": kb})
    assert not np.allclose(other, got)

  def test_independent_dropout_keeps_weights_with_keep_prob(self):
    q, k, v = jax.random.normal(jax.random.key(9), (3, 4, 32, 2, 8))
    res = gf.sparse_attention(
      q,
      k,
      v,
      policy=8,
      dropout_rng=jax.random.key(10),
      dropout_rate=0.25,
      broadcast_dropout=False,
      deterministic=False,
      return_residuals=True,
    )
    plain = gf.sparse_attention(q, k, v, policy=8, return_residuals=True)
    np.testing.assert_array_equal(res.indices, plain.indices)
    kept = np.asarray(res.weights) > 0
    # Kept slots carry weight / 0.75, dropped ones 0.
    np.testing.assert_allclose(
      np.asarray(res.weights)[kept], np.asarray(plain.weights)[kept] / 0.75, rtol=1e-5
    )
    # 4*32*2*8 = 2048 Bernoulli(0.75) draws: sd of the mean is 0.0096, so 0.05 is > 5 sd
    # (false-failure rate < 1e-6).
    assert abs(kept.mean() - 0.75) < 0.05

  def test_topk_fn_is_topk_attention_for_small_k(self):
    q, k, v = jax.random.normal(jax.random.key(11), (3, 2, 20, 2, 8))
    mask = _random_mask(jax.random.key(12), (2, 2, 20, 20))
    got = gf.topk_attention_fn(k=5)(q, k, v, mask=mask, is_causal=True)
    want = gsparse.topk_attention(q, k, v, mask=mask, k=5, is_causal=True)
    np.testing.assert_allclose(got, want, atol=1e-6)
    dense = gsparse.dot_product_attention(q, k, v, mask=mask, is_causal=True)
    assert not np.allclose(got, dense, atol=1e-3)

  def test_sow_weights_linen_and_nnx(self):
    x = _inputs(13)
    layer = nn.MultiHeadDotProductAttention(
      num_heads=HEADS, qkv_features=D, attention_fn=gf.topk_attention_fn(k=3)
    )
    params = layer.init(jax.random.key(14), x)
    _, inter = layer.apply(params, x, sow_weights=True, mutable=["intermediates"])
    (w,) = inter["intermediates"]["attention_weights"]
    assert w.shape == (B, HEADS, T, T)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal((w > 0).sum(-1), 3)
    m = nnx.MultiHeadAttention(
      num_heads=HEADS,
      in_features=D,
      decode=False,
      attention_fn=gf.topk_attention_fn(k=3),
      rngs=nnx.Rngs(0),
    )
    m(x, sow_weights=True)
    w = m.attention_weights.value[0]
    np.testing.assert_array_equal((w > 0).sum(-1), 3)

  def test_bad_arguments_raise_clear_errors(self):
    with pytest.raises(ValueError, match="k=0"):
      gf.topk_attention_fn(k=0)
    with pytest.raises(TypeError, match="k must be an int"):
      gf.topk_attention_fn(k=2.5)
    with pytest.raises(TypeError, match="no_such_option"):
      gf.topk_attention_fn(k=2, no_such_option=1)
    with pytest.raises(ValueError, match="selection='nope'"):
      gf.topk_attention_fn(k=2, selection="nope")
    with pytest.raises(ValueError, match="tol"):
      gf.CertifiedK(ks=(1, 2), tol=1.5)
    with pytest.raises(ValueError, match="c=2"):
      gf.PowerLawK(alpha=1.0, c=2)
    q = jnp.ones((1, 4, 2, 8))
    fn = gf.topk_attention_fn(k=2)
    with pytest.raises(ValueError, match="dropout_rng"):
      jax.jit(lambda q: fn(q, q, q, dropout_rate=0.1, deterministic=False))(q)
    with pytest.raises(ValueError, match="dropout_rate"):
      jax.jit(lambda q: fn(q, q, q, dropout_rate=1.0))(q)


class DecodeTest(parameterized.TestCase):
  @parameterized.parameters(3, 9)
  def test_linen_decode_matches_full_causal_forward(self, k):
    x = _inputs(20, t=9)
    fn = gf.topk_attention_fn(k=k)
    full = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D, attention_fn=fn)
    dec = nn.MultiHeadDotProductAttention(
      num_heads=HEADS, qkv_features=D, attention_fn=fn, decode=True
    )
    params = full.init(jax.random.key(21), x)["params"]
    want = full.apply({"params": params}, x, mask=nn.make_causal_mask(x[..., 0]))
    cache = dec.init(jax.random.key(0), x)["cache"]
    step = jax.jit(lambda c, xt: dec.apply({"params": params, "cache": c}, xt, mutable=["cache"]))
    outs = []
    for t in range(x.shape[1]):
      o, mut = step(cache, x[:, t : t + 1])
      cache = mut["cache"]
      outs.append(o)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, atol=ATOL)
    if k < x.shape[1]:  # Sparse on: differs from dense causal attention.
      dense = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D)
      ref = dense.apply({"params": params}, x, mask=nn.make_causal_mask(x[..., 0]))
      assert not np.allclose(ref, want, atol=1e-3)

  @parameterized.parameters(3, 9)
  def test_nnx_decode_matches_full_causal_forward(self, k):
    x = _inputs(22, t=9)
    m = nnx.MultiHeadAttention(
      num_heads=HEADS,
      in_features=D,
      qkv_features=D,
      decode=False,
      attention_fn=gf.topk_attention_fn(k=k),
      rngs=nnx.Rngs(23),
    )
    want = m(x, is_causal=True)
    m.init_cache(x.shape)

    @nnx.jit
    def step(m, xt):
      return m(xt, decode=True)

    outs = [step(m, x[:, t : t + 1]) for t in range(x.shape[1])]
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, atol=ATOL)


class PolicyTest(parameterized.TestCase):
  def test_power_law_k(self):
    p = gf.PowerLawK(alpha=0.5, c=0.5)
    assert [p.num_keys(n) for n in (1, 4, 100, 10_000)] == [1, 1, 5, 50]
    assert gf.PowerLawK(alpha=10.0, c=1.0).num_keys(7) == 7

  def test_power_law_policy_keeps_that_many_keys(self):
    q, k, v = jax.random.normal(jax.random.key(30), (3, 1, 64, 2, 8))
    res = gf.sparse_attention(q, k, v, policy=gf.PowerLawK(alpha=1.0, c=0.5), return_residuals=True)
    assert res.indices.shape[-1] == 8
    np.testing.assert_array_equal((res.weights > 0).sum(-1), 8)

  @parameterized.parameters("query", "call")
  def test_certified_policy_meets_tolerance_and_is_minimal(self, granularity):
    key = jax.random.key(31)
    kq, kk, kv = jax.random.split(key, 3)
    n = 64
    # Logit scale varies per query, so queries need different k.
    q = jax.random.normal(kq, (1, n, 2, 8)) * jnp.linspace(0.2, 4.0, n)[None, :, None, None]
    k = jax.random.normal(kk, (1, n, 2, 8))
    v = jax.random.normal(kv, (1, n, 2, 8))
    ks, tol = (2, 4, 8, 16, 32, n), 0.05
    policy = gf.CertifiedK(ks=ks, tol=tol, granularity=granularity)
    res = jax.jit(
      lambda q, k, v: gf.sparse_attention(q, k, v, policy=policy, return_residuals=True)
    )(q, k, v)
    kept = np.asarray(res.num_kept)
    np.testing.assert_array_equal((np.asarray(res.weights) > 0).sum(-1), kept)
    assert np.all(np.asarray(res.tail_mass_bound) <= tol)
    # The certificate holds against the true dropped mass of the dense softmax.
    p = gsparse.attention_weights(q, k)  # [1, N, T, S]
    kept_mask = np.zeros(p.shape, bool)
    idx = np.moveaxis(np.asarray(res.indices), -3, -2)  # [1, N, T, k]
    for pos in np.ndindex(idx.shape[:-1]):
      sel = idx[pos][idx[pos] >= 0]
      kept_mask[pos + (sel,)] = True
    true_tail = np.where(kept_mask, 0.0, np.asarray(p)).sum(-1)
    assert np.all(true_tail <= np.moveaxis(np.asarray(res.tail_mass_bound), -2, -1) + 1e-6)
    if granularity == "query":
      assert len(np.unique(kept)) > 1  # really adaptive on this input
      # Minimality: the next smaller candidate fails its certificate.
      full = gf.sparse_attention(q, k, v, policy=n, return_residuals=True)
      for j, c in enumerate(ks[1:], start=1):
        rows = kept == c
        if not rows.any():
          continue
        smaller = gf_attention._bound_at(
          full.weights, full.tail_mass_bound, jnp.full(kept.shape, ks[j - 1])
        )
        assert np.all(np.asarray(smaller)[rows] > tol)
    else:
      assert len(np.unique(kept)) == 1

  def test_certified_policy_in_attention_fn_matches_dense_at_tight_tol(self):
    q, k, v = jax.random.normal(jax.random.key(32), (3, 2, 16, 2, 8))
    fn = gf.topk_attention_fn(k=gf.CertifiedK(ks=(2, 16), tol=1e-6))
    want = gsparse.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(fn(q, k, v, is_causal=True), want, atol=1e-4)


def test_docstring_examples_run():
  for mod in (gf_attention, gf_policies):
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, mod.__name__
    assert result.failed == 0, mod.__name__


def test_import_gsparse_does_not_import_flax_subpackage():
  import subprocess
  import sys

  code = "import sys, gsparse; print('gsparse.flax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
