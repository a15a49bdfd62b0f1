"""Block skipping in the Pallas block kernels (`gsparse.kernels.block_skip`).

Three kinds of evidence, none of which needs a device (no GPU or TPU ran them):

* the liveness predicate equals a NumPy brute force over every entry of every
  tile (exact: never skips a tile with an admitted entry, always skips one
  without, for the lengths, window and causal rules);
* the six kernel bodies (forward, dq, dk/dv; Triton and Mosaic), traced from
  the CPU host, read only the block id before the liveness test, and every K/V
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

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.extend import core as jex_core

from gsparse import _admissible, kernels
from gsparse.block_gather import block_sparse_gather_attention_xla
from gsparse.kernels.block_skip import tile_live

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
def test_kernel_loops_read_only_the_block_id_before_the_liveness_test(variant):
  """Traced (not run) forward, dq and dk/dv kernels: each loop step's top level
  reads one scalar (the block or query-block id), does no matmul and no DMA,
  and ends in one `cond` whose live branch holds every K/V read and matmul."""
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
    assert top.count("get") == 1, (name, top)
    assert "dot_general" not in top and "dma_start" not in top, (name, top)
    assert top[-1] == "cond" and top.count("cond") == 1, (name, top)
    skip, step = (_prims(b.jaxpr) for b in body.eqns[-1].params["branches"])
    assert "dot_general" not in skip and "get" not in skip and "dma_start" not in skip, name
    assert step.count("dot_general") >= 2, name
    if variant == "tpu":  # K/V (forward, dq) or Q/dO/lse/delta (dk/dv) copied in the live branch
      assert step.count("dma_start") >= 2, name


# (B, T, N, K, S, H, block_q, block_k, nb, window, is_causal, lengths of batch 0);
# the TPU interpreter wants multiples of 8. Each window reaches exactly one key
# into the key block two before a query block (and, without causality, one key
# into the block after it), and each length leaves one query (key) in a tile
# with admitted entries, so skipping one tile too many drops an admitted key.
SHAPES = {
  "gpu": (2, 16, 2, 1, 32, 4, 4, 4, 8, (5, 1), False, (13, 13)),
  "tpu": (2, 24, 2, 1, 48, 4, 8, 8, 6, (9, 3), True, (17, 17)),
}


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_dead_tiles_poisoned_with_nan_change_nothing(variant):
  """Every query block lists the key blocks from two before it onwards, and
  `-1` slots, with a local window and lengths: most listed tiles are dead.
  The K/V of the key blocks that no live tile reads set to NaN leave outputs,
  lse and gradients bitwise unchanged and equal to the XLA block path; rows
  past the query length (or with key length 0) keep the convention: zero
  output, `-inf` lse, zero gradients."""
  b, t, n, kh, s, h, bq, bk, nb, window, is_causal, (ql, kvl) = SHAPES[variant]
  ks = jax.random.split(jax.random.key(11), 3)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k = jax.random.normal(ks[1], (b, s, kh, h))
  v = jax.random.normal(ks[2], (b, s, kh, h))
  nkb, tb = s // bk, t // bq
  # Every query block lists the key blocks around it and beyond, plus -1 slots.
  near = jnp.arange(tb)[:, None] * bq // bk + jnp.arange(nb)[None, :] - 2
  bidx = jnp.where((near >= 0) & (near < nkb), near, -1)
  bidx = jnp.broadcast_to(bidx[None, :, None, :], (b, tb, n, nb)).astype(jnp.int32)
  q_len, kv_len = jnp.array([ql, t]), jnp.array([kvl, 0])
  kw = dict(query_seq_lengths=q_len, key_value_seq_lengths=kv_len, local_window_size=window)
  # Dead (query block, listed key block) pairs, and the key positions that no live tile reads.
  qb = jnp.broadcast_to(jnp.arange(tb)[None, :, None, None], bidx.shape)
  lens = (q_len[:, None, None, None], kv_len[:, None, None, None])
  live = tile_live(
    qb * bq, bidx * bk, lens, block_q=bq, block_k=bk, is_causal=is_causal, window=window
  )
  assert (~live & (bidx >= 0)).sum() > live.sum()  # mostly dead
  read = np.zeros((b, nkb), bool)
  for bb, i, nn, j in zip(*np.nonzero(np.asarray(live)), strict=True):
    read[bb, int(bidx[bb, i, nn, j])] = True
  unread = jnp.asarray(np.repeat(~read, bk, axis=1))[:, :, None, None]
  assert unread.any()
  kp, vp = jnp.where(unread, jnp.nan, k), jnp.where(unread, jnp.nan, v)

  def ker(q, k, v):
    return kernels.block_gather_attention(
      q, k, v, bidx, block_q=bq, block_k=bk, scale=0.4, is_causal=is_causal, variant=variant,
      interpret=variant == "gpu", backward="pallas", **kw,
    )  # fmt: skip

  adm = _admissible.build((b,), t, s, **kw)

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
