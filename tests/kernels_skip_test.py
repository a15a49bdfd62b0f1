"""Block skipping in the Pallas block kernels (`gsparse.kernels.block_skip`).

Three kinds of evidence, none of which needs a device (no GPU or TPU ran them):

* the liveness predicate equals a NumPy brute force over every entry of every
  tile (exact: never skips a tile with an admitted entry, always skips one
  without, for the lengths, window and causal rules);
* the six kernel bodies (forward, dq, dk/dv; Triton and Mosaic), traced from
  the CPU host, read only scalars (the block id and its segment id range)
  before the liveness test, and every K/V
  read or copy and every matmul sits in the `cond` branch of a live tile. The
  old kernels loaded and multiplied every listed block, so this fails on them;
* in the Pallas and TPU interpreters, with most listed tiles dead (including
  tiles with a single admitted entry at each edge of the window and lengths)
  and the K/V of the key blocks only dead tiles list poisoned with NaN, outputs
  and gradients equal the XLA block path and the same call on clean K/V bit for
  bit; skipping one tile too many at any edge fails it (checked by mutation).

Poisoning alone cannot tell a skipped tile from a visited one: the kernels mask
the logits and contract finite parts (`gsparse.kernels.nonfinite`), so the old
kernels also give NaN-free results on poisoned dead tiles (checked by hand);
the structural test is the one that fails on them.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.extend import core as jex_core

import gsparse
from gsparse import _admissible, kernels
from gsparse.block_gather import block_sparse_gather_attention_xla
from gsparse.kernels.block_skip import segment_bounds, tile_live


def _interpret(variant: str) -> bool:
  """The Triton variant compiles on a GPU backend (scripts/gpu_checks.sh) and runs
  in the Pallas interpreter elsewhere; the TPU variant runs in the TPU interpreter."""
  return variant == "gpu" and jax.default_backend() != "gpu"


WINDOWS = [None, (0, 0), (3, 1), (5, 0), (0, 9)]


def _np_live(q0, k0, q_len, kv_len, bq, bk, window, is_causal):
  """Whether any entry of each tile is admitted, by brute force (NumPy broadcasting)."""
  q = q0[..., None, None] + np.arange(bq)[:, None]
  k = k0[..., None, None] + np.arange(bk)[None, :]
  ok = (k0[..., None, None] >= 0) & (q < q_len[..., None, None]) & (k < kv_len[..., None, None])
  if window is not None:
    ok &= (k >= q - window[0]) & (k <= q + window[1])
  if is_causal:
    ok &= k <= q
  return ok.any((-2, -1))


@pytest.mark.parametrize("bq,bk", [(4, 8), (8, 4)])
def test_tile_live_equals_brute_force_over_every_entry(bq, bk):
  """All tiles of T = 16, S = 24 (and a `-1` slot) for every pair of lengths,
  five windows and both causal settings: `tile_live` is exactly "some entry
  admitted" (ignoring segment ids), so skipping never drops a key and never
  visits a dead tile of these rules."""
  t, s = 16, 24
  q0, k0, q_len, kv_len = np.meshgrid(
    np.arange(0, t, bq), np.arange(-bk, s, bk), np.arange(t + 1), np.arange(s + 1), indexing="ij"
  )
  lens = (jnp.asarray(q_len), jnp.asarray(kv_len))
  dead = 0
  for window in WINDOWS:
    for is_causal in (False, True):
      want = _np_live(q0, k0, q_len, kv_len, bq, bk, window, is_causal)
      kw = dict(block_q=bq, block_k=bk, is_causal=is_causal, window=window)
      got = np.asarray(tile_live(jnp.asarray(q0), jnp.asarray(k0), lens, **kw))
      np.testing.assert_array_equal(got, want, err_msg=f"window={window} causal={is_causal}")
      # Without lengths (q_len = T, kv_len = S): the window and causality alone.
      full = (q_len == t) & (kv_len == s)
      no_lens = tile_live(jnp.asarray(q0[full]), jnp.asarray(k0[full]), None, **kw)
      np.testing.assert_array_equal(np.asarray(no_lens), want[full])
      dead += (~want).sum()
  assert 0 < dead < want.size * 2 * len(WINDOWS)  # both outcomes occur


@pytest.mark.parametrize("packed", [True, False])
def test_segment_id_ranges_skip_only_tiles_without_a_match(packed):
  """`tile_live` with `segment_bounds` against a brute force over every entry
  of every tile, for 50 draws of ids (T = 14, S = 21: partial last blocks).
  Packed ids (consecutive integers in position order) make the `[min, max]`
  test exact; unordered ids keep it sound (a tile with a matching pair is never
  skipped), and it still skips some tiles."""
  rng = np.random.default_rng(0)
  t, s, bq, bk = 14, 21, 4, 8
  tb, nk = -(-t // bq), -(-s // bk)
  q0, k0 = np.meshgrid(np.arange(tb) * bq, np.arange(nk) * bk, indexing="ij")
  skipped = 0
  for _ in range(50):
    if packed:
      qs, ks = np.cumsum(rng.random(t) < 0.2), np.cumsum(rng.random(s) < 0.15)
    else:
      qs, ks = rng.integers(0, 4, t), rng.integers(0, 4, s)
    # Padding ids -1 and -2 never match.
    qp, kp = np.pad(qs, (0, tb * bq - t), constant_values=-1), np.pad(ks, (0, nk * bk - s), constant_values=-2)  # fmt: skip
    match = (qp[:, None] == kp[None, :]).reshape(tb, bq, nk, bk).any((1, 3))
    qb = segment_bounds(jnp.asarray(qs)[None], bq, tb)[0]
    kb = segment_bounds(jnp.asarray(ks)[None], bk, nk)[0]
    seg = (qb[:tb, None], qb[tb:, None], kb[None, :nk], kb[None, nk:])
    kw = dict(block_q=bq, block_k=bk, is_causal=False, window=None)
    got = np.asarray(tile_live(jnp.asarray(q0), jnp.asarray(k0), None, seg=seg, **kw))
    if packed:
      np.testing.assert_array_equal(got, match)
    else:
      assert np.all(got | ~match)
    skipped += (~got).sum()
  assert skipped > 0


def _pallas_calls(jaxpr):
  """Every `pallas_call` equation in `jaxpr` and its sub-jaxprs."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else [param]:
        if isinstance(sub, jex_core.ClosedJaxpr):
          yield from _pallas_calls(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          yield from _pallas_calls(sub)


def _prims(jaxpr):
  """Names of all primitives in `jaxpr`, nested jaxprs included."""
  out = []
  for eqn in jaxpr.eqns:
    out.append(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else [param]:
        if isinstance(sub, jex_core.ClosedJaxpr | jex_core.Jaxpr):
          out += _prims(getattr(sub, "jaxpr", sub))
  return out


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_kernel_loops_read_only_scalars_before_the_liveness_test(variant):
  """Traced (not run) forward, dq and dk/dv kernels: each loop step's top level
  reads three scalars (the block or query-block id and that block's segment id
  range), does no matmul and no DMA, and ends in one `cond` whose live branch
  holds every K/V read and matmul."""
  q = jnp.zeros((1, 16, 2, 8))
  k = jnp.zeros((1, 32, 1, 8))
  bidx = jnp.zeros((1, 1, 2, 2), jnp.int32)

  def loss(q, k, v):
    out, _ = kernels.block_gather_attention(
      q, k, v, bidx, block_q=16, block_k=16, scale=0.1, is_causal=True, variant=variant,
      interpret=variant == "gpu", backward="pallas", local_window_size=(4, 0),
      key_value_seq_lengths=jnp.array([20]),
    )  # fmt: skip
    return jnp.sum(out)

  jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, k, k)
  calls = {str(e.params["name"]): e.params["jaxpr"] for e in _pallas_calls(jaxpr.jaxpr)}
  names = [f"gsparse_{n}_{variant}" for n in ("block_gather", "block_bwd_dq", "block_bwd_dkdv")]
  assert set(names) <= set(calls)
  for name in names:
    (loop,) = [e for e in calls[name].eqns if e.primitive.name in ("scan", "while")]
    body = (loop.params.get("jaxpr") or loop.params["body_jaxpr"]).jaxpr
    top = [e.primitive.name for e in body.eqns]
    # Reads before the test: the block id, then (with ranges) the key or query
    # block's segment id range, all scalars.
    gets = [e.outvars[0].aval.shape for e in body.eqns if e.primitive.name == "get"]
    assert len(gets) == 3 and set(gets) == {()}, (name, top, gets)
    assert "dot_general" not in top and "dma_start" not in top, (name, top)
    assert top[-1] == "cond" and top.count("cond") == 1, (name, top)
    skip, step = (_prims(b.jaxpr) for b in body.eqns[-1].params["branches"])
    assert "dot_general" not in skip and "get" not in skip and "dma_start" not in skip, name
    assert step.count("dot_general") >= 2, name
    if variant == "tpu":  # K/V (forward, dq) or Q/dO/lse/delta (dk/dv) copied in the live branch
      assert step.count("dma_start") >= 2, name


# (T, S, block_q, block_k, nb, window, is_causal, lengths of batch 0, segments of
# batch 2); the TPU interpreter wants multiples of 8. Each window reaches exactly
# one key into the key block two before a query block (and, without causality,
# one key into the block after it), and each length leaves one query (key) in a
# tile with admitted entries, so skipping one tile too many drops an admitted
# key. Batch 2's ids: queries and keys from `cut` on are segment 1, keys in
# `[lo, hi)` get ids no query has (a block dead by its segment ids alone), and
# the blocks around `cut` hold single matching pairs at the range edges.
SHAPES = {
  "gpu": (16, 32, 4, 4, 8, (5, 1), False, (13, 13), (9, 12, 16)),
  "tpu": (24, 48, 8, 8, 6, (9, 3), True, (17, 17), (17, 16, 24)),
}


def _ids(b, size, cut, lo=0, hi=0):
  """`[b, size]` int32 segment ids: zeros but batch 2, as described above."""
  pos = np.arange(size)
  ids = np.zeros((b, size), np.int32)
  ids[2] = (pos >= cut) + 6 * ((pos >= lo) & (pos < hi))
  return ids


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_dead_tiles_poisoned_with_nan_change_nothing(variant):
  """Every query block lists the key blocks from two before it onwards, and
  `-1` slots, with a local window, lengths and segment ids: most listed tiles
  are dead. The K/V of the key blocks that no live tile reads set to NaN leave
  outputs, lse and gradients bitwise unchanged and equal to the XLA block path;
  rows past the query length (or with key length 0) keep the convention: zero
  output, `-inf` lse, zero gradients."""
  t, s, bq, bk, nb, window, is_causal, (ql, kvl), (cut, lo, hi) = SHAPES[variant]
  b, n, kh, h = 3, 2, 1, 4
  ks = jax.random.split(jax.random.key(11), 3)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k = jax.random.normal(ks[1], (b, s, kh, h))
  v = jax.random.normal(ks[2], (b, s, kh, h))
  nkb, tb = s // bk, t // bq
  # Every query block lists the key blocks around it and beyond, plus -1 slots.
  near = jnp.arange(tb)[:, None] * bq // bk + jnp.arange(nb)[None, :] - 2
  bidx = jnp.where((near >= 0) & (near < nkb), near, -1)
  bidx = np.broadcast_to(bidx[None, :, None, :], (b, tb, n, nb)).astype(np.int32)
  q_len, kv_len = jnp.array([ql, t, t]), jnp.array([kvl, 0, s])
  q_seg, kv_seg = _ids(b, t, cut), _ids(b, s, cut, lo, hi)
  kw = dict(
    query_seq_lengths=q_len,
    key_value_seq_lengths=kv_len,
    local_window_size=window,
    segment_ids=(jnp.asarray(q_seg), jnp.asarray(kv_seg)),
  )
  # Dead (query block, listed key block) pairs, and the key positions that no live tile reads.
  qb = np.broadcast_to(np.arange(tb)[None, :, None, None], bidx.shape)
  lens = (q_len[:, None, None, None], kv_len[:, None, None, None])
  q_tiles, k_tiles = q_seg.reshape(b, tb, bq), kv_seg.reshape(b, nkb, bk)
  at_q = lambda x: x[np.arange(b)[:, None, None, None], qb]
  at_k = lambda x: x[np.arange(b)[:, None, None, None], np.maximum(bidx, 0)]
  seg = (at_q(q_tiles.min(-1)), at_q(q_tiles.max(-1)), at_k(k_tiles.min(-1)), at_k(k_tiles.max(-1)))
  tile = functools.partial(tile_live, qb * bq, bidx * bk, lens, block_q=bq, block_k=bk)
  live = np.asarray(tile(is_causal=is_causal, window=window, seg=seg))
  no_seg = np.asarray(tile(is_causal=is_causal, window=window))
  assert (~live & (bidx >= 0)).sum() > live.sum()  # mostly dead
  assert (no_seg & ~live).any()  # some dead by their segment ids alone
  read = np.zeros((b, nkb), bool)
  for bb, i, nn, j in zip(*np.nonzero(live), strict=True):
    read[bb, int(bidx[bb, i, nn, j])] = True
  unread = jnp.asarray(np.repeat(~read, bk, axis=1))[:, :, None, None]
  assert unread[2, lo].all()  # poisoned because of the segment ids
  kp, vp = jnp.where(unread, jnp.nan, k), jnp.where(unread, jnp.nan, v)

  def ker(q, k, v):
    return kernels.block_gather_attention(
      q, k, v, bidx, block_q=bq, block_k=bk, scale=0.4, is_causal=is_causal, variant=variant,
      interpret=_interpret(variant), backward="pallas", **kw,
    )  # fmt: skip

  adm = _admissible.build(
    (b,), t, s, **{**kw, "segment_ids": gsparse.SegmentIds(*kw["segment_ids"])}
  )

  def ref(q, k, v):
    r = block_sparse_gather_attention_xla(
      q, k, v, bidx, block_q=bq, block_k=bk, scale=0.4, is_causal=is_causal, adm=adm
    )
    return r.output, r.logsumexp

  def both(fn):
    def loss(q, k, v):
      out, lse = fn(q, k, v)
      return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)))

  with pltpu.force_tpu_interpret_mode() if variant == "tpu" else contextlib.nullcontext():
    clean = jax.tree.leaves(both(ker)(q, k, v))
    poisoned = jax.tree.leaves(both(ker)(q, kp, vp))
  want = jax.tree.leaves(both(ref)(q, k, v))
  for name, c, p, w in zip(("out", "lse", "dq", "dk", "dv"), clean, poisoned, want, strict=True):
    np.testing.assert_array_equal(np.asarray(p).view(np.uint32), np.asarray(c).view(np.uint32), err_msg=name)  # fmt: skip
    np.testing.assert_allclose(c, w, atol=2e-5, rtol=2e-5, err_msg=name)
  out, lse, dq, dk, dv = clean
  rows_past = np.s_[0, ql:]
  assert np.all(np.asarray(out)[rows_past] == 0) and np.all(np.isneginf(np.asarray(lse)[rows_past]))
  assert np.all(np.asarray(out)[1] == 0) and np.all(np.isneginf(np.asarray(lse)[1]))
  assert np.all(np.asarray(dq)[1] == 0) and np.all(np.asarray(dk)[1] == 0)
  assert np.all(np.asarray(dk)[np.asarray(unread)[..., 0, 0]] == 0)
