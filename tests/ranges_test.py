"""Sequence lengths, local window, segment ids and return_residual in topk_attention.

References are built independently of gsparse: `jax.nn.dot_product_attention`
with its own `query_seq_lengths` / `key_value_seq_lengths` /
`local_window_size`, and a NumPy-built boolean mask for segment ids (which
jax.nn lacks) and for the "full" selection at k < S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse
from gsparse import _admissible
from gsparse.flax import sparse_attention, topk_attention_fn
from gsparse.selection import BlockSelection, ExactSelection

B, T, S, N, K, H = 2, 12, 10, 4, 2, 8
Q_LEN = np.array([12, 5], np.int32)
KV_LEN = np.array([10, 3], np.int32)
Q_SEG = np.array([[0] * 4 + [1] * 5 + [2] * 3, [0] * 6 + [1] * 6], np.int32)
KV_SEG = np.array([[0] * 3 + [1] * 4 + [2] * 3, [0] * 5 + [1] * 5], np.int32)
CASES = {
  "q_len": dict(query_seq_lengths=Q_LEN),
  "kv_len": dict(key_value_seq_lengths=KV_LEN),
  "window": dict(local_window_size=(2, 1)),
  "window_int": dict(local_window_size=3),
  "segments": dict(segment_ids=gsparse.SegmentIds(Q_SEG, KV_SEG)),
  "all": dict(
    query_seq_lengths=Q_LEN,
    key_value_seq_lengths=KV_LEN,
    local_window_size=(4, 2),
    segment_ids=gsparse.SegmentIds(Q_SEG, KV_SEG),
  ),
}


def _np_mask(kw, is_causal, t=T, s=S):
  """`[B, 1, T, S]` admissibility from the definitions, in NumPy."""
  r, c = np.arange(t)[:, None], np.arange(s)[None, :]
  m = np.ones((B, 1, t, s), bool)
  if is_causal:
    m &= c <= r
  if "query_seq_lengths" in kw:
    m &= (r < np.asarray(kw["query_seq_lengths"])[:, None, None])[:, None]
  if "key_value_seq_lengths" in kw:
    m &= (c < np.asarray(kw["key_value_seq_lengths"])[:, None, None])[:, None]
  if "local_window_size" in kw:
    w = kw["local_window_size"]
    left, right = (w, w) if isinstance(w, int) else w
    m &= (c >= r - left) & (c <= r + right)
  if "segment_ids" in kw:
    qs, ks = (np.asarray(x) for x in kw["segment_ids"])
    m &= (qs[:, :, None] == ks[:, None, :])[:, None]
  return m


def _inputs(seed, t=T, s=S):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(kq, (B, t, N, H)),
    jax.random.normal(kk, (B, s, K, H)),
    jax.random.normal(kv, (B, s, K, H)),
  )


def _reference(q, k, v, kw, is_causal):
  """jax.nn with its own arguments; segment ids as a NumPy mask."""
  nn_kw = {n: kw[n] for n in kw if n != "segment_ids"}
  mask = None
  if "segment_ids" in kw:
    mask = jnp.asarray(_np_mask({"segment_ids": kw["segment_ids"]}, False))
  return jax.nn.dot_product_attention(
    q, k, v, mask=mask, is_causal=is_causal, return_residual=True, **nn_kw
  )


# Every selection on the XLA gather (causal on two of them), and the gather
# implementations on one selection: the token gather only sees the selection's
# indices, so it needs no index-range masks of its own.
ROUTES = [
  ("full", "xla", False),
  ("exact", "xla", True),
  ("block", "xla", False),
  ("lsh", "xla", True),
  ("block", "masked", True),
  ("exact", "pallas", False),
]


@pytest.mark.parametrize(("selection", "implementation", "is_causal"), ROUTES)
def test_all_arguments_match_jax_nn_at_k_ge_s(selection, implementation, is_causal):
  q, k, v = _inputs(0)
  kw = CASES["all"]
  ref, ref_lse = _reference(q, k, v, kw, is_causal)
  out, lse = jax.jit(
    lambda q, k, v: gsparse.topk_attention(
      q,
      k,
      v,
      k=S,
      selection=selection,
      implementation=implementation,
      is_causal=is_causal,
      selection_key=jax.random.key(1),
      return_residual=True,
      **kw,
    )  # fmt: skip
  )(q, k, v)
  has = _np_mask(kw, is_causal).any(-1)[:, 0][..., None]  # [B, T, 1]: rows with a key
  assert has.any() and not has.all()  # both kinds of rows occur
  np.testing.assert_allclose(
    np.where(has[..., None], out, 0), np.where(has[..., None], ref, 0), atol=2e-6
  )
  assert np.all(np.where(has[..., None], 0, np.asarray(out)) == 0)  # no key: zeros, as documented
  np.testing.assert_allclose(np.where(has, lse, 0), np.where(has, ref_lse, 0), atol=2e-6)
  assert np.all(np.isneginf(np.asarray(lse)[~np.broadcast_to(has, lse.shape)]))
  assert lse.dtype == ref_lse.dtype and lse.shape == ref_lse.shape


@pytest.mark.parametrize("case", [c for c in CASES if c != "all"])
def test_each_argument_alone_matches_jax_nn(case):
  q, k, v = _inputs(1)
  kw = CASES[case]
  ref, _ = _reference(q, k, v, kw, False)
  out = jax.jit(lambda q, k, v: gsparse.topk_attention(q, k, v, k=S, selection="exact", **kw))(
    q, k, v
  )
  has = _np_mask(kw, False).any(-1)[:, 0][..., None, None]  # [B, T, 1, 1]
  np.testing.assert_allclose(np.where(has, out, 0), np.where(has, ref, 0), atol=2e-6)


def test_topk_below_s_equals_full_on_dense_mask():
  """k < S: the index-range route keeps the keys of "full" given the dense mask."""
  q, k, v = _inputs(2, t=16, s=16)
  segs = np.array([[0] * 7 + [1] * 9, [0] * 3 + [1] * 13], np.int32)
  kw = dict(
    query_seq_lengths=np.array([16, 11], np.int32),
    key_value_seq_lengths=np.array([14, 16], np.int32),
    local_window_size=(6, 5),
    segment_ids=segs,
  )
  mask = jnp.asarray(_np_mask({**kw, "segment_ids": (segs, segs)}, True, 16, 16))
  run = jax.jit(
    lambda q, k, v, sel: gsparse.topk_attention(
      q,
      k,
      v,
      k=3,
      selection=sel,
      is_causal=True,
      return_stats=True,
      selection_key=jax.random.key(3),
      **kw,
    ),  # fmt: skip
    static_argnums=3,
  )
  full = jax.jit(
    lambda q, k, v, m: gsparse.topk_attention(q, k, v, None, m, k=3, return_stats=True)
  )
  ref, ref_st = full(q, k, v, mask)
  for sel in (ExactSelection(query_chunk=5), BlockSelection(block_size=4, num_blocks=4)):
    out, st = run(q, k, v, sel)
    np.testing.assert_array_equal(np.sort(st.indices, -1), np.sort(ref_st.indices, -1))
    np.testing.assert_allclose(out, ref, atol=2e-6)
  # LSH is approximate: whatever it keeps is admissible.
  idx = np.asarray(run(q, k, v, "lsh")[1].indices)  # [B, T, N, 3]
  b, t, n, j = np.nonzero(idx >= 0)
  assert len(b) and np.all(np.asarray(mask)[b, 0, t, idx[b, t, n, j]])


@pytest.mark.parametrize("selection", ["exact", "block"])
def test_gradients_match_jax_nn(selection):
  q, k, v = _inputs(3)
  kw = CASES["all"]
  has = jnp.asarray(_np_mask(kw, True).any(-1)[:, 0][..., None, None])
  w = jax.random.normal(jax.random.key(4), (B, T, N, H)) * has  # no cotangent on empty rows

  def loss_ref(q, k, v):
    return jnp.sum(_reference(q, k, v, kw, True)[0] * w)

  def loss(q, k, v):
    return jnp.sum(
      gsparse.topk_attention(q, k, v, k=S, selection=selection, is_causal=True, **kw) * w
    )

  grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
  for g, gr in zip(grads, jax.grad(loss_ref, (0, 1, 2))(q, k, v), strict=True):
    np.testing.assert_allclose(g, gr, atol=1e-5)


def test_vmap_and_traced_lengths_match_static():
  q, k, v = _inputs(5)

  def f(q, k, v, ql, kl):
    return gsparse.topk_attention(
      q, k, v, k=4, selection="exact", query_seq_lengths=ql, key_value_seq_lengths=kl,
      local_window_size=(3, 3),
    )  # fmt: skip

  static = jax.jit(lambda q, k, v: f(q, k, v, Q_LEN, KV_LEN))(q, k, v)
  np.testing.assert_allclose(jax.jit(f)(q, k, v, Q_LEN, KV_LEN), static, atol=1e-6)
  # vmap over the batch: unbatched calls with scalar lengths.
  np.testing.assert_allclose(jax.jit(jax.vmap(f))(q, k, v, Q_LEN, KV_LEN), static, atol=1e-6)
  # Traced lengths outside [0, T] / [0, S] are clipped (values unknown at trace time).
  clipped = jax.jit(f)(q, k, v, np.array([99, 5]), np.array([10, -4]))
  np.testing.assert_allclose(clipped, static.at[1].set(0), atol=1e-6)


@pytest.mark.parametrize("selection", ["exact", "lsh"])
def test_zero_lengths_give_zeros_and_finite_gradients(selection):
  q, k, v = _inputs(6)

  def f(q, k, v):
    out = gsparse.topk_attention(
      q, k, v, k=3, selection=selection, selection_key=jax.random.key(7),
      query_seq_lengths=np.array([0, 12]), key_value_seq_lengths=np.array([10, 0]),
    )  # fmt: skip
    return jnp.sum(out**2 + out), out

  grads, out = jax.jit(jax.grad(f, (0, 1, 2), has_aux=True))(q, k, v)
  assert np.all(np.asarray(out) == 0)
  assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_single_segment_array_equals_pair():
  one = _admissible.build((B,), S, S, segment_ids=KV_SEG)
  pair = _admissible.build((B,), S, S, segment_ids=gsparse.SegmentIds(KV_SEG, KV_SEG))
  np.testing.assert_array_equal(one.q_seg, pair.q_seg)
  np.testing.assert_array_equal(one.kv_seg, pair.kv_seg)


def test_flax_sparse_attention_forwards_ranges():
  q, k, v = _inputs(9)
  kw = CASES["all"]
  ref, _ = _reference(q, k, v, kw, True)
  has = _np_mask(kw, True).any(-1)[:, 0][..., None, None]
  out = jax.jit(
    lambda q, k, v: (
      sparse_attention(
        q,
        k,
        v,
        policy=S,
        is_causal=True,
        return_residuals=True,
        **kw,  # select_keys + gather
      ).output
    )
  )(q, k, v)
  np.testing.assert_allclose(np.where(has, out, 0), np.where(has, ref, 0), atol=2e-6)


def test_flax_attention_fn_window_option_and_per_call_ids():
  """`topk_attention_fn(k, local_window_size=...)` fixes a window; lengths and
  segment ids go per call (flax's modules do not pass them, a custom one may)."""
  q, k, v = _inputs(11)
  kw = CASES["all"]
  fn = topk_attention_fn(S, selection="exact", local_window_size=kw["local_window_size"])
  per_call = {n: kw[n] for n in kw if n != "local_window_size"}
  out = jax.jit(lambda q, k, v: fn(q, k, v, **per_call))(q, k, v)
  ref, _ = _reference(q, k, v, kw, False)
  has = _np_mask(kw, False).any(-1)[:, 0][..., None, None]
  np.testing.assert_allclose(np.where(has, out, 0), np.where(has, ref, 0), atol=2e-6)


def _max_intermediate(jaxpr) -> int:
  """Largest array size among the variables of a jaxpr, sub-jaxprs included."""
  best = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      best = max(best, int(np.prod(getattr(var.aval, "shape", ()))))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          sub = sub.jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          best = max(best, _max_intermediate(sub))
  return best


def test_exact_selection_holds_no_t_by_s_array():
  """T = S = 4096: every intermediate of the exact route is far below T * S."""
  t = s = 4096
  q = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)
  lens = jax.ShapeDtypeStruct((1,), jnp.int32)
  seg = jax.ShapeDtypeStruct((1, t), jnp.int32)

  def f(q, ql, seg, mask=None):
    return gsparse.topk_attention(
      q, q, q, None, mask, k=8, selection="exact", is_causal=True, query_seq_lengths=ql,
      key_value_seq_lengths=ql, local_window_size=(512, 0), segment_ids=seg,
    )  # fmt: skip

  biggest = _max_intermediate(jax.make_jaxpr(f)(q, lens, seg).jaxpr)
  assert biggest <= t * s // 8, biggest  # chunks of 256 rows: 256 * S = T * S / 16
  # The check can fail: the same call with a dense T x S mask holds one.
  dense = jax.make_jaxpr(f)(q, lens, seg, jax.ShapeDtypeStruct((t, s), bool)).jaxpr
  assert _max_intermediate(dense) >= t * s


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_block_gather_masks_inside_the_listed_blocks(implementation):
  """Blocks 0 and 2 of 4 keys listed for every query block: jax.nn with the
  listed keys as a mask plus its own lengths and window ("pallas" runs the
  block kernel with the ranges as side inputs: its jaxpr holds a pallas_call)."""
  q, k, v = _inputs(10)
  kw = CASES["all"]
  bidx = jnp.broadcast_to(jnp.array([0, 2], jnp.int32), (B, 3, N, 2))
  listed = np.isin(np.arange(S) // 4, [0, 2])
  f = jax.jit(
    lambda q, k, v, bi: gsparse.block_sparse_gather_attention(
      q, k, v, bi, block_q=4, block_k=4, is_causal=True, implementation=implementation, **kw
    )
  )
  kernels_in_jaxpr = str(jax.make_jaxpr(f)(q, k, v, bidx)).count("pallas_call")
  assert kernels_in_jaxpr == (implementation == "pallas")
  out = f(q, k, v, bidx)
  nn_kw = {n: kw[n] for n in kw if n != "segment_ids"}
  seg = _np_mask({"segment_ids": kw["segment_ids"]}, False)
  ref = jax.nn.dot_product_attention(q, k, v, mask=seg & listed, is_causal=True, **nn_kw)
  has = (_np_mask(kw, True) & listed).any(-1)[:, 0][..., None, None]
  assert has.any() and not has.all()
  np.testing.assert_allclose(np.where(has, out, 0), np.where(has, ref, 0), atol=2e-6)
  assert np.all(np.where(has, 0, np.asarray(out)) == 0)


def test_dense_dot_product_attention_takes_the_same_arguments():
  q, k, v = _inputs(12)
  kw = CASES["all"]
  ref, _ = _reference(q, k, v, kw, True)
  out = jax.jit(lambda q, k, v: gsparse.dot_product_attention(q, k, v, is_causal=True, **kw))(
    q, k, v
  )
  has = _np_mask(kw, True).any(-1)[:, 0][..., None, None]
  np.testing.assert_allclose(np.where(has, out, 0), np.where(has, ref, 0), atol=2e-6)
  assert np.all(np.where(has, 0, np.asarray(out)) == 0)


@pytest.mark.parametrize("selection", ["full", "exact", "block", None])
def test_nan_value_rows_past_the_key_length_leave_the_error_bound_finite(selection):
  # Padding past `key_value_seq_lengths` is never attended, so a NaN there
  # must not make any row's certificate NaN (Lemma C5: NaN only for rows that
  # may attend a non-finite value row). A NaN inside the length still does,
  # for exactly the rows whose admissible keys include it.
  rng = np.random.default_rng(0)
  q, kk, v = (
    rng.standard_normal(shape, np.float32) for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H))
  )
  kw = dict(k=2, return_stats=True, key_value_seq_lengths=KV_LEN)
  if selection is not None:
    kw["selection"] = selection
  pad = v.copy()
  for b, n in enumerate(KV_LEN):
    pad[b, n:] = np.nan
  out, stats = gsparse.topk_attention(q, kk, pad, **kw)
  assert np.isfinite(np.asarray(out)).all()
  assert np.isfinite(np.asarray(stats.error_bound)).all()
  inside = v.copy()
  inside[0, 4] = np.nan  # admissible for every row of batch 0 (length 10), no row of batch 1
  _, stats = gsparse.topk_attention(q, kk, inside, **kw)
  eb = np.asarray(stats.error_bound)
  assert np.isnan(eb[0]).all() and np.isfinite(eb[1]).all()
