"""Tests of gsparse.flax: top-k attention_fn in linen and nnx, policies, decode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

import gsparse
import gsparse.flax as gf

ATOL = 2e-5
B, T, D, HEADS = 2, 7, 16, 2


def _inputs(seed, *, t=T):
  return jax.random.normal(jax.random.key(seed), (B, t, D))


def _random_mask(key, shape):
  """Boolean mask with at least one admissible key per row (flax averages empty rows)."""
  m = jax.random.bernoulli(key, 0.6, shape)
  return m.at[..., 0].set(True)


class AttentionFnTest(parameterized.TestCase):
  # Linen has no is_causal: causality is a mask. Together with the nnx tests below, every
  # combination of (mask, causal) runs, and each wrapper runs with and without each.
  # The default suite runs masked + causal here and causal alone in nnx; the other two
  # combinations are marked slow (the second step of CI runs them).
  def test_linen_matches_flax_dense_when_k_covers_sequence_masked_causal(self):
    self._check_linen_matches_flax_dense(masked=True, causal=True)

  @pytest.mark.slow
  def test_linen_matches_flax_dense_when_k_covers_sequence_plain(self):
    self._check_linen_matches_flax_dense(masked=False, causal=False)

  def test_nnx_matches_flax_dense_when_k_covers_sequence_causal(self):
    self._check_nnx_matches_flax_dense(masked=False, causal=True)

  @pytest.mark.slow
  def test_nnx_matches_flax_dense_when_k_covers_sequence_masked(self):
    self._check_nnx_matches_flax_dense(masked=True, causal=False)

  def _check_linen_matches_flax_dense(self, *, masked, causal):
    x = _inputs(0)
    mask = _random_mask(jax.random.key(1), (B, 1, T, T)) if masked else None
    if causal:
      cm = nn.make_causal_mask(x[..., 0])
      mask = cm if mask is None else nn.combine_masks(mask, cm)
    dense = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D)
    sparse = nn.MultiHeadDotProductAttention(
      num_heads=HEADS, qkv_features=D, attention_fn=gf.topk_attention_fn(k=T)
    )
    params = jax.jit(dense.init)(jax.random.key(2), x)
    cot = jax.random.normal(jax.random.key(3), (B, T, D))

    @jax.jit
    def run(params, mask):
      def out_and_grad(layer):
        f = lambda p: jnp.sum(layer.apply(p, x, mask=mask) * cot)
        return layer.apply(params, x, mask=mask), jax.grad(f)(params)

      return out_and_grad(dense), out_and_grad(sparse)

    (want, g_want), (got, g_got) = run(params, mask)
    np.testing.assert_allclose(got, want, atol=ATOL)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
      assert np.all(np.isfinite(a))
      np.testing.assert_allclose(a, b, atol=1e-4)

  def _check_nnx_matches_flax_dense(self, *, masked, causal):
    x = _inputs(4)
    mask = _random_mask(jax.random.key(5), (B, HEADS, T, T)) if masked else None

    def make(fn):
      kw = {} if fn is None else {"attention_fn": fn}
      return nnx.MultiHeadAttention(
        num_heads=HEADS, in_features=D, qkv_features=D, decode=False, rngs=nnx.Rngs(6), **kw
      )

    dense, sparse = make(None), make(gf.topk_attention_fn(k=T + 3))
    cot = jax.random.normal(jax.random.key(7), (B, T, D))

    @nnx.jit
    def run(m, mask):
      loss = lambda m: jnp.sum(m(x, mask=mask, is_causal=causal) * cot)
      return m(x, mask=mask, is_causal=causal), nnx.grad(loss)(m)

    want, g_want = run(dense, mask)
    got, g_got = run(sparse, mask)
    np.testing.assert_allclose(got, want, atol=ATOL)
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
    fn = gf.topk_attention_fn(k=T + 2)
    want = jax.jit(lambda q, k, v: nn.dot_product_attention(q, k, v, bias=bias, **kw))(q, k, v)
    run = jax.jit(lambda rng: fn(q, k, v, bias=bias, **{**kw, "dropout_rng": rng}))
    got = run(kd)
    np.testing.assert_allclose(got, want, atol=ATOL)
    # Dropout is really on: a different key gives a different result.
    other = run(kb)
    assert not np.allclose(other, got)

  def test_independent_dropout_keeps_weights_with_keep_prob(self):
    q, k, v = jax.random.normal(jax.random.key(9), (3, 4, 32, 2, 8))
    run = jax.jit(
      lambda q, k, v, det: gf.sparse_attention(
        q,
        k,
        v,
        policy=8,
        dropout_rng=jax.random.key(10),
        dropout_rate=0.25,
        broadcast_dropout=False,
        deterministic=det,
        return_residuals=True,
      ),
      static_argnums=3,
    )
    res, plain = run(q, k, v, False), run(q, k, v, True)
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
    got, want, dense = jax.jit(
      lambda q, k, v: (
        gf.topk_attention_fn(k=5)(q, k, v, mask=mask, is_causal=True),
        gsparse.topk_attention(q, k, v, mask=mask, k=5, is_causal=True),
        gsparse.dot_product_attention(q, k, v, mask=mask, is_causal=True),
      )
    )(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(got, dense, atol=1e-3)

  def test_vmap_matches_batched_call(self):
    q, k, v = jax.random.normal(jax.random.key(16), (3, 4, 12, 2, 8))
    mask = _random_mask(jax.random.key(17), (4, 2, 12, 12))
    fn = gf.topk_attention_fn(k=3)
    batched, mapped = jax.jit(
      lambda q, k, v: (fn(q, k, v, mask=mask), jax.vmap(fn)(q, k, v, mask=mask))
    )(q, k, v)
    np.testing.assert_allclose(mapped, batched, atol=1e-6)

  def test_sow_weights_linen_and_nnx(self):
    x = _inputs(13)
    layer = nn.MultiHeadDotProductAttention(
      num_heads=HEADS, qkv_features=D, attention_fn=gf.topk_attention_fn(k=3)
    )
    params = jax.jit(layer.init)(jax.random.key(14), x)
    _, inter = jax.jit(lambda p: layer.apply(p, x, sow_weights=True, mutable=["intermediates"]))(
      params
    )
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
    nnx.jit(lambda m, x: m(x, sow_weights=True))(m, x)
    w = m.attention_weights.get_value()[0]
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
    with pytest.raises(ValueError, match=r"C=2 must be in \[0, 1\]"):
      gf.PowerLawK(alpha=1.0, C=2)
    q = jnp.ones((1, 4, 2, 8))
    fn = gf.topk_attention_fn(k=2)
    with pytest.raises(ValueError, match="dropout_rng"):
      jax.jit(lambda q: fn(q, q, q, dropout_rate=0.1, deterministic=False))(q)
    with pytest.raises(ValueError, match="dropout_rate"):
      jax.jit(lambda q: fn(q, q, q, dropout_rate=1.0))(q)

  def test_selection_and_implementation_are_forwarded(self):
    seen = []
    real = gsparse.topk.topk_attention

    # A topk_attention that accepts `implementation`, as later versions do.
    def fake(query, key, value, bias=None, mask=None, *, k, implementation=None, **kw):
      sel_key = kw.pop("selection_key", None)
      seen.append((k, implementation, kw.get("selection"), sel_key is not None))
      return real(query, key, value, bias, mask, k=k, **kw)

    real_select = gsparse.topk.select_keys

    # The selection alone, used by the paths that attend themselves (dropout here).
    def fake_select(query, key, value, bias=None, mask=None, *, k, implementation=None, **kw):
      sel_key = kw.pop("selection_key", None)
      seen.append((k, implementation, kw.get("selection"), sel_key is not None))
      return real_select(query, key, value, bias, mask, k=k, **kw)

    # A topk_attention without those arguments, as the foundation's.
    def bare(query, key, value, bias=None, mask=None, *, k, selection="full", return_stats=False):
      raise AssertionError("not called")

    q = jax.random.normal(jax.random.key(15), (1, 6, 2, 4))
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(gsparse.topk, "topk_attention", bare)
      with pytest.raises(TypeError, match="implementation"):
        gf.topk_attention_fn(k=2, implementation="xla")
      with pytest.raises(TypeError, match="selection_key"):
        gf.topk_attention_fn(k=2, selection_seed=0)
      mp.setattr(gsparse.topk, "topk_attention", fake)
      mp.setattr(gsparse.topk, "select_keys", fake_select)
      fn = gf.topk_attention_fn(k=2, selection="full", implementation="xla")
      jax.jit(fn)(q, q, q)
      jax.jit(lambda q: fn(q, q, q, dropout_rng=jax.random.key(0), dropout_rate=0.5))(q)
      jax.jit(gf.topk_attention_fn(k=3, selection_seed=1))(q, q, q)
    assert seen == [(2, "xla", "full", False)] * 2 + [(3, None, None, True)]

  def test_certified_passes_implementation_to_both_gather_passes(self):
    # The stop-gradient pre-pass of `CertifiedK` and the final pass both get
    # the user's `implementation` (the pre-pass used to take the default).
    # "block": the exact selections carry their kept logits and skip the pre-pass.
    seen = []
    real = gsparse.flax.certified.sparse_gather_attention

    def spy(*args, implementation="default", **kw):
      seen.append(implementation)
      return real(*args, implementation=implementation, **kw)

    q = jax.random.normal(jax.random.key(16), (1, 6, 2, 4))
    fn = gf.topk_attention_fn(
      k=gf.CertifiedK(ks=(2, 4), tol=0.5), implementation="masked", selection="block"
    )
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(gsparse.flax.certified, "sparse_gather_attention", spy)
      mp.setattr(gsparse.flax.attention, "sparse_gather_attention", spy)
      jax.jit(fn)(q, q, q)
    assert seen == ["masked", "masked"]


class DecodeTest(parameterized.TestCase):
  def test_linen_decode_matches_full_causal_forward(self, k=3):
    x = _inputs(20, t=9)
    fn = gf.topk_attention_fn(k=k)
    full = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D, attention_fn=fn)
    dec = nn.MultiHeadDotProductAttention(
      num_heads=HEADS, qkv_features=D, attention_fn=fn, decode=True
    )
    params = jax.jit(full.init)(jax.random.key(21), x)["params"]
    causal = nn.make_causal_mask(x[..., 0])
    want = jax.jit(lambda p: full.apply({"params": p}, x, mask=causal))(params)
    cache = jax.jit(dec.init)(jax.random.key(0), x)["cache"]
    step = jax.jit(
      lambda c, xt: dec.apply(
        {"params": params, "cache": c}, xt, sow_weights=True, mutable=["cache", "intermediates"]
      )
    )
    outs = []
    for t in range(x.shape[1]):
      o, mut = step(cache, x[:, t : t + 1])
      cache = mut["cache"]
      outs.append(o)
      # The top-k is taken over the filled cache positions 0..t only.
      (w,) = mut["intermediates"]["attention_weights"]  # [B, N, 1, max_len]
      np.testing.assert_array_equal(w[..., t + 1 :], 0.0)
      np.testing.assert_array_equal((w > 0).sum(-1), min(k, t + 1))
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, atol=ATOL)
    if k < x.shape[1]:  # Sparse on: differs from dense causal attention.
      dense = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D)
      ref = jax.jit(lambda p: dense.apply({"params": p}, x, mask=causal))(params)
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
    want = nnx.jit(lambda m, x: m(x, is_causal=True))(m, x)
    m.init_cache(x.shape)

    @nnx.jit
    def step(m, xt):
      return m(xt, decode=True)

    outs = [step(m, x[:, t : t + 1]) for t in range(x.shape[1])]
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, atol=ATOL)


class PolicyTest(parameterized.TestCase):
  def test_power_law_k(self):
    p = gf.PowerLawK(alpha=0.5, C=0.5)
    assert [p.num_keys(n) for n in (1, 4, 100, 10_000)] == [1, 1, 5, 50]
    assert gf.PowerLawK(alpha=10.0, C=1.0).num_keys(7) == 7

  def test_power_law_policy_keeps_that_many_keys(self):
    q, k, v = jax.random.normal(jax.random.key(30), (3, 1, 64, 2, 8))
    policy = gf.PowerLawK(alpha=1.0, C=0.5)
    res = jax.jit(
      lambda q, k, v: gf.sparse_attention(q, k, v, policy=policy, return_residuals=True)
    )(q, k, v)
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
    p = jax.jit(gsparse.attention_weights)(q, k)  # [1, N, T, S]
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
      # Bounds of every candidate from the full selection, recomputed independently in NumPy.
      full = jax.jit(lambda q, k, v: gf.sparse_attention(q, k, v, policy=n, return_residuals=True))(
        q, k, v
      )
      w = -np.sort(-np.asarray(full.weights, np.float64), axis=-1)
      share = np.cumsum(w, axis=-1) / w.sum(-1, keepdims=True)
      t_max = np.asarray(full.tail_mass_bound)[..., None]
      bounds = 1.0 - share[..., np.asarray(ks) - 1] * (1.0 - t_max)  # [..., C]
      for j, c in enumerate(ks[1:], start=1):
        rows = kept == c
        assert np.all(bounds[..., j][rows] <= tol + 1e-6)
        assert np.all(bounds[..., j - 1][rows] > tol - 1e-6)
    else:
      assert len(np.unique(kept)) == 1

  def test_certified_policy_in_attention_fn_matches_dense_at_tight_tol(self):
    q, k, v = jax.random.normal(jax.random.key(32), (3, 2, 16, 2, 8))
    fn = gf.topk_attention_fn(k=gf.CertifiedK(ks=(2, 16), tol=1e-6))
    got, want = jax.jit(
      lambda q, k, v: (
        fn(q, k, v, is_causal=True),
        gsparse.dot_product_attention(q, k, v, is_causal=True),
      )
    )(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-4)


def _certified_reference(w, t_max, ks, tol):
  """NumPy: smallest candidate whose bound from the first-k slots' share is <= tol."""
  share = np.cumsum(w, axis=-1) / w.sum(-1, keepdims=True)
  bounds = np.clip(1.0 - share[..., np.asarray(ks) - 1] * (1.0 - t_max[..., None]), 0.0, 1.0)
  ok = bounds <= tol
  first = np.where(ok.any(-1), ok.argmax(-1), len(ks) - 1)
  return np.asarray(ks)[first], np.take_along_axis(bounds, first[..., None], -1)[..., 0]


def test_certified_num_keys_heaviest_first_or_in_slot_order():
  # 200 rows of 16 slot weights; "full" and "exact" give them in decreasing
  # order (in_slot_order=True needs no sort), other selections in any order.
  rng = np.random.default_rng(0)
  w = rng.exponential(size=(200, 16)) ** 3
  w /= w.sum(-1, keepdims=True)
  t_max = rng.uniform(0.0, 0.1, size=200)
  ks, tol = (1, 2, 4, 8, 16), 0.3
  w_sorted = -np.sort(-w, axis=-1)
  want_k, want_b = _certified_reference(w_sorted, t_max, ks, tol)
  for weights, in_order in ((w_sorted, True), (w_sorted, False), (w, False)):
    k, b = gf.certified_num_keys(
      jnp.asarray(weights), jnp.asarray(t_max), ks, tol, in_slot_order=in_order
    )
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_allclose(b, want_b, rtol=1e-5, atol=1e-6)
  # In slot order on unsorted weights: the bound of keeping the first k slots.
  k, b = gf.certified_num_keys(jnp.asarray(w), jnp.asarray(t_max), ks, tol, in_slot_order=True)
  ref_k, ref_b = _certified_reference(w, t_max, ks, tol)
  np.testing.assert_array_equal(k, ref_k)
  np.testing.assert_allclose(b, ref_b, rtol=1e-5, atol=1e-6)
  assert np.any(ref_k != want_k)  # the order matters on these rows


def test_only_sorted_selections_keep_slots_in_order():
  from gsparse.flax.certified import _slots_in_logit_order

  assert _slots_in_logit_order("full") and _slots_in_logit_order("exact")
  assert _slots_in_logit_order(gsparse.ExactSelection(query_chunk=8))
  assert not _slots_in_logit_order("block") and not _slots_in_logit_order("lsh")
  assert not _slots_in_logit_order(gsparse.BlockSelection(block_size=4, num_blocks=2))


def test_import_gsparse_does_not_import_flax_subpackage():
  import subprocess
  import sys

  code = "import sys, gsparse; print('gsparse.flax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


# Layer selection ---------------------------------------------------------------------------------

LAYER_SCALES = (1.5, 0.5, 2.0, 1.0)  # multiplies W_Q and W_K: tau^2 scales with the 4th power


class LinenStack(nn.Module):
  num_layers: int = len(LAYER_SCALES)

  @nn.compact
  def __call__(self, x, sow_weights=False):
    for i in range(self.num_layers):
      h = nn.LayerNorm(name=f"ln_{i}")(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D, name=f"attn_{i}")(
        h, sow_weights=sow_weights
      )
    return x


def _scaled_linen_params(seed):
  x = jnp.zeros((1, 4, D))
  params = LinenStack().init(jax.random.key(seed), x)["params"]
  params = jax.tree_util.tree_map_with_path(
    lambda path, w: (
      w
      * (
        LAYER_SCALES[int(path[0].key.split("_")[1])]
        if path[0].key.startswith("attn")
        and path[1].key in ("query", "key")
        and path[2].key == "kernel"
        else 1.0
      )
    ),
    params,
  )
  return params


class LayerSelectionTest(parameterized.TestCase):
  def test_ranking_matches_measured_sparsity_linen(self):
    params = _scaled_linen_params(40)
    n = 64
    ranked = gf.rank_attention_layers({"params": params}, seq_len=n)
    assert [r.path for r in ranked] == ["attn_2", "attn_0", "attn_3", "attn_1"]
    # Measured: effective support of the actual attention weights on Gaussian input.
    x = jax.random.normal(jax.random.key(41), (4, n, D))
    _, inter = jax.jit(
      lambda p, x: LinenStack().apply({"params": p}, x, sow_weights=True, mutable=["intermediates"])
    )(params, x)
    measured = {
      name: float(gsparse.sparsity.effective_support(v["attention_weights"][0]).mean())
      for name, v in inter["intermediates"].items()
    }
    assert sorted(measured, key=measured.get) == [r.path for r in ranked]
    # The sparsest layer is much sparser than the densest (not a near tie).
    assert measured["attn_2"] < 0.25 * measured["attn_1"]
    config = gf.select_sparse_layers(
      {"params": params}, k=8, seq_len=n, num_layers=2, max_support=n
    )
    assert config == {"attn_0": 8, "attn_1": None, "attn_2": 8, "attn_3": None}

  def test_nnx_walk_rank_and_configure(self):
    class Stack(nnx.Module):
      def __init__(self, rngs):
        self.layers = nnx.List(
          [
            nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False, rngs=rngs)
            for _ in LAYER_SCALES
          ]
        )
        for layer, c in zip(self.layers, LAYER_SCALES, strict=True):
          layer.query.kernel[...] = layer.query.kernel[...] * c
          layer.key.kernel[...] = layer.key.kernel[...] * c

      def __call__(self, x):
        for layer in self.layers:
          x = x + layer(x)
        return x

    model = Stack(nnx.Rngs(42))
    ranked = gf.rank_attention_layers(model, seq_len=64)
    assert [r.path for r in ranked] == ["layers/2", "layers/0", "layers/3", "layers/1"]
    # The reported norms are those of M = W_Q W_K^T / sqrt(h), computed directly.
    w = model.layers[2]
    m = gsparse.gaussian.interaction_matrix(w.query.kernel[...], w.key.kernel[...])
    np.testing.assert_allclose(
      ranked[0].fro_norm, jnp.sqrt(jnp.sum(m**2, axis=(-2, -1))), rtol=1e-4
    )
    config = gf.select_sparse_layers(model, k=4, seq_len=64, num_layers=1, max_support=64)
    assert config == {"layers/0": None, "layers/1": None, "layers/2": 4, "layers/3": None}
    x = jax.random.normal(jax.random.key(43), (1, 8, D))
    forward = nnx.jit(lambda model, x: model(x))
    before = forward(model, x)
    changed = gf.configure_nnx(model, config)
    assert changed == list(config)
    assert isinstance(model.layers[2].attention_fn, gf.TopKAttentionFn)
    assert model.layers[0].attention_fn is nnx.dot_product_attention
    after = forward(model, x)
    assert not np.allclose(before, after, atol=1e-4)  # layer 2 now keeps 4 of 8 keys
    with pytest.raises(ValueError, match="nope"):
      gf.configure_nnx(model, {"nope": 3})

  def test_predicted_support_is_monotone_and_clipped(self):
    s = np.array([[0.0], [0.5], [1.0], [3.0], [100.0]])
    p = gf.predicted_support(s, seq_len=50)
    assert p[0] == pytest.approx(50, rel=1e-12) and p[-1] == 1  # exp(log 50)
    assert np.all(np.diff(p) <= 0)
    # One singular value s = tau (sigma = 1); a = sqrt(2 ln 50) = 2.797. Diffuse phase
    # (s <= a/2): n e^{-s^2}; collapsed (s >= a): 1.
    np.testing.assert_allclose(p[1:3], [50 * np.exp(-0.25), 50 * np.exp(-1.0)], rtol=1e-12)
    assert p[3] == 1
    # Several singular values enter through ||M||_F: (3, 4) acts as one value 5.
    np.testing.assert_allclose(gf.predicted_support([[0.3, 0.4]], seq_len=50), 50 * np.exp(-0.25))


# Training ----------------------------------------------------------------------------------------


class Block(nnx.Module):
  def __init__(self, dim, attention_fn, rngs):
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=2, in_features=dim, decode=False, attention_fn=attention_fn, rngs=rngs
    )
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.down = nnx.Linear(2 * dim, dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x), is_causal=True)
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class TinyLM(nnx.Module):
  """Two pre-norm transformer blocks with causal top-k attention."""

  def __init__(self, *, vocab, seq_len, dim, k, rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, dim)))
    fn = gf.topk_attention_fn(k=k)
    self.blocks = nnx.List([Block(dim, fn, rngs) for _ in range(2)])
    self.out_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[...][: tokens.shape[-1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.out_norm(x))


@pytest.mark.slow  # 300 optimizer steps of a two-block transformer.
def test_tiny_transformer_trains_with_sparse_attention():
  import optax

  vocab, seq_len, batch, steps = 16, 16, 32, 300
  model = TinyLM(vocab=vocab, seq_len=seq_len, dim=32, k=4, rngs=nnx.Rngs(50))
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  def data(key):
    # Arithmetic sequences mod vocab: the next token needs the last two tokens.
    ka, kb = jax.random.split(key)
    a = jax.random.randint(ka, (batch, 1), 0, vocab)
    b = jax.random.randint(kb, (batch, 1), 1, vocab)
    return (a + b * jnp.arange(seq_len)) % vocab

  def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  graphdef, state = nnx.split((model, opt))

  def step(state, key):
    model, opt = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, data(key))
    opt.update(model, grads)
    return nnx.state((model, opt)), loss

  # One compiled scan over all steps (a Python loop of jitted steps is much slower on CPU).
  train = jax.jit(lambda state, key: jax.lax.scan(step, state, jax.random.split(key, steps)))
  _, losses = train(state, jax.random.key(51))
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses))
  first, last = losses[:20].mean(), losses[-20:].mean()
  # Uniform guessing is log(16) = 2.77; the first token of each target row is not predictable
  # from one token, so the floor is about log(15) / 15 = 0.18.
  assert first > 2.0, first
  assert last < 0.5 * first, (first, last)
