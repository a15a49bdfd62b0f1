"""Index ranges (sequence lengths, local window, segment ids) in the Pallas block kernels.

The reference is the XLA block path `block_sparse_gather_attention_xla(...,
adm=...)`, which evaluates `gsparse._admissible.admits` on the gathered slab
and differentiates by autodiff; it shares no code with the kernels' tile mask
(`gsparse.kernels._common.range_mask`) or their backward. The kernels run in
the Pallas interpreter ("gpu", the Triton kernels) and the TPU interpreter
("tpu", the Mosaic kernels) on CPU; `tests/kernels_test.py::LoweringTest`
lowers both with all four ranges for "cuda" and "tpu" from the CPU host, which
checks the Triton and Mosaic lowering rules accept the side inputs, not that a
device compiles or runs them (no GPU or TPU ran these tests).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import gsparse
from gsparse import _admissible, kernels
from gsparse.block_gather import block_sparse_gather_attention_xla
from gsparse.gather import dedup_indices

SCALE = 0.37
TOL = dict(atol=2e-5, rtol=2e-5)


def _interpret(variant: str) -> bool:
  """The Triton variant compiles on a GPU backend (scripts/gpu_checks.sh) and runs
  in the Pallas interpreter elsewhere; the TPU variant runs in the TPU interpreter."""
  return variant == "gpu" and jax.default_backend() != "gpu"


# (B, T, N, K, S, H, Hv, block_q, block_k, nb): GQA, T and S not multiples of
# the blocks. The TPU interpreter needs multiples of 8 (Mosaic tiles).
SHAPES = {"gpu": (2, 7, 4, 2, 13, 6, 5, 2, 4, 3), "tpu": (2, 16, 2, 1, 20, 6, 5, 8, 8, 2)}


def _case(variant, seed):
  b, t, n, kh, s, h, hv, bq, bk, nb = SHAPES[variant]
  ks = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k = jax.random.normal(ks[1], (b, s, kh, h))
  v = jax.random.normal(ks[2], (b, s, kh, hv))
  nkb = -(-s // bk)
  bidx = dedup_indices(jax.random.randint(ks[3], (b, -(-t // bq), n, nb), -1, nkb + 1), nkb)
  q_seg = jnp.sort(jax.random.randint(ks[4], (b, t), 0, 3), axis=1)
  kv_seg = jnp.sort(jax.random.randint(ks[5], (b, s), 0, 3), axis=1)
  ranges = {
    "lengths": dict(
      query_seq_lengths=jnp.array([t - 2, 0]), key_value_seq_lengths=jnp.array([s, 0])
    ),
    "kv_length": dict(key_value_seq_lengths=jnp.array([s - 5, 3])),
    "window": dict(local_window_size=(3, 1)),
    "segments": dict(segment_ids=(q_seg, kv_seg)),
    "all": dict(
      query_seq_lengths=jnp.array([t - 1, 5]),
      key_value_seq_lengths=jnp.array([s - 3, 9]),
      local_window_size=(4, 0),
      segment_ids=(q_seg, kv_seg),
    ),
  }
  return (q, k, v, bidx), (bq, bk), ranges


def _adm(q, k, kw):
  kw = dict(kw)
  if "segment_ids" in kw:
    kw["segment_ids"] = gsparse.SegmentIds(*kw["segment_ids"])
  return _admissible.build((q.shape[0],), q.shape[1], k.shape[1], **kw)


def _kernel_kw(adm):
  """The kernel's own arguments from a checked `Admissible` (as the public route passes them)."""
  seg = None if adm.q_seg is None else (adm.q_seg, adm.kv_seg)
  return dict(
    query_seq_lengths=adm.q_len,
    key_value_seq_lengths=adm.kv_len,
    segment_ids=seg,
    local_window_size=adm.window,
  )


def _listed_mask(bidx, bq, bk, t, s, is_causal):
  """`[B, T, N, S]` keys in a query's listed blocks (and causal), in NumPy."""
  bidx = np.asarray(bidx)
  blocks = np.repeat(bidx, bq, axis=1)[:, :t]  # [B, T, N, nb]
  hit = (np.arange(s) // bk)[None, None, None, :, None] == blocks[:, :, :, None, :]
  m = hit.any(-1)
  return m & (np.arange(s)[None, :] <= np.arange(t)[:, None])[None, :, None] if is_causal else m


def _np_ranges(kw, t, s):
  """`[B, T, 1, S]` admissibility from the definitions (`docs/masks.md`), in NumPy."""
  r, c = np.arange(t)[:, None], np.arange(s)[None, :]
  m = np.ones((2, t, s), bool)
  if "query_seq_lengths" in kw:
    m &= r < np.asarray(kw["query_seq_lengths"])[:, None, None]
  if "key_value_seq_lengths" in kw:
    m &= c < np.asarray(kw["key_value_seq_lengths"])[:, None, None]
  if "local_window_size" in kw:
    left, right = kw["local_window_size"]
    m &= (c >= r - left) & (c <= r + right)
  if "segment_ids" in kw:
    qs, ks = (np.asarray(x) for x in kw["segment_ids"])
    m &= qs[:, :, None] == ks[:, None, :]
  return m[:, :, None, :]


def _loss(fn):
  """A loss that weights every output entry differently and reaches the lse too."""

  def loss(q, k, v):
    out, lse = fn(q, k, v)
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
    return jnp.sum(out * w) + 0.3 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  return loss


def _check(variant, name, seed, *, backward, is_causal):
  (q, k, v, bidx), (bq, bk), ranges = _case(variant, seed)
  adm = _adm(q, k, ranges[name])

  def ref(q, k, v):
    r = block_sparse_gather_attention_xla(
      q, k, v, bidx, block_q=bq, block_k=bk, scale=SCALE, is_causal=is_causal, adm=adm
    )
    return r.output, r.logsumexp

  def ker(q, k, v):
    return kernels.block_gather_attention(
      q, k, v, bidx, block_q=bq, block_k=bk, scale=SCALE, is_causal=is_causal,
      variant=variant, interpret=_interpret(variant), backward=backward, **_kernel_kw(adm),
    )  # fmt: skip

  def both(fn):
    return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(_loss(fn), (0, 1, 2))(q, k, v)))

  (out, lse), grads = both(ker)(q, k, v)
  (ref_out, ref_lse), ref_grads = both(ref)(q, k, v)
  np.testing.assert_allclose(out, ref_out, **TOL)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
  np.testing.assert_allclose(np.where(np.isneginf(ref_lse), 0, lse), np.where(np.isneginf(ref_lse), 0, ref_lse), **TOL)  # fmt: skip
  for g, r in zip(grads, ref_grads, strict=True):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)
  # The ranges must matter: they mask some listed key (so the comparisons
  # above can fail on a kernel that ignores them).
  listed = _listed_mask(bidx, bq, bk, q.shape[1], k.shape[1], is_causal)
  ranged = listed & _np_ranges(ranges[name], q.shape[1], k.shape[1])
  assert (ranged != listed).any()
  return out, lse, adm


# By default the lengths (with 0) and the segments; the window runs by default
# in the "all" cases below, and alone, with a key length alone, in the slow step.
@pytest.mark.parametrize(
  "name",
  ["lengths", "segments", *(pytest.param(n, marks=pytest.mark.slow) for n in ("kv_length", "window"))],
)  # fmt: skip
def test_gpu_kernel_each_range_matches_the_xla_block_path(name):
  """Forward, lse and gradients (Pallas backward) of the Triton kernel, one argument at a time."""
  out, lse, adm = _check("gpu", name, 1, backward="pallas", is_causal=False)
  if name == "lengths":  # query length 0 and key length 0: zeros, lse -inf
    assert np.all(np.asarray(out)[1] == 0) and np.all(np.isneginf(np.asarray(lse)[1]))
    assert np.all(np.isneginf(np.asarray(lse)[0, int(adm.q_len[0]) :]))


@pytest.mark.parametrize(
  "backward", ["xla", pytest.param("pallas", marks=pytest.mark.slow)]
)  # the Pallas backward with all four ranges runs by default in the TPU case below
def test_gpu_kernel_all_ranges_causal_matches_the_xla_block_path(backward):
  """All four together with `is_causal`, through both backwards of the custom VJP."""
  _check("gpu", "all", 2, backward=backward, is_causal=True)


def test_tpu_kernel_all_ranges_causal_matches_the_xla_block_path():
  """The Mosaic forward and Pallas backward in the TPU interpreter, all four ranges."""
  with pltpu.force_tpu_interpret_mode():
    _check("tpu", "all", 3, backward="pallas", is_causal=True)


@pytest.mark.slow  # the TPU interpreter: one more compile of three kernels per case
@pytest.mark.parametrize("name", ["lengths", "window", "segments"])
def test_tpu_kernel_each_range_matches_the_xla_block_path(name):
  with pltpu.force_tpu_interpret_mode():
    _check("tpu", name, 4, backward="pallas", is_causal=False)


def test_public_route_under_vmap_runs_the_kernel_per_example():
  """`block_sparse_gather_attention(implementation="pallas")` under vmap over a
  leading axis (lengths vmapped too) equals the unbatched calls, and its jaxpr
  holds the kernel (the old route fell back to XLA with any range argument)."""
  (q, k, v, bidx), (bq, bk), ranges = _case("gpu", 5)
  kw = ranges["all"]
  seg = gsparse.SegmentIds(*kw["segment_ids"])
  lens = (kw["query_seq_lengths"], kw["key_value_seq_lengths"])

  def one(impl):
    def f(q, k, v, bidx, ql, kl, qs, ks):
      return gsparse.block_sparse_gather_attention(
        q[None], k[None], v[None], bidx[None], block_q=bq, block_k=bk, is_causal=True,
        implementation=impl, query_seq_lengths=ql[None], key_value_seq_lengths=kl[None],
        local_window_size=kw["local_window_size"], segment_ids=gsparse.SegmentIds(qs[None], ks[None]),
      )[0]  # fmt: skip

    return f

  args = (q, k, v, bidx, *lens, *seg)
  batched = jax.jit(jax.vmap(one("pallas")))
  assert str(jax.make_jaxpr(batched)(*args)).count("pallas_call") == 1
  out = batched(*args)
  ref = jax.jit(jax.vmap(one("xla")))(*args)
  np.testing.assert_allclose(out, ref, **TOL)


@pytest.mark.slow  # two compiles of the forward and both backward kernels per variant
@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_pallas_backward_with_ranges_under_vmap(variant):
  """vmap of jax.grad with per-example lengths and segment ids (batched side
  inputs; scalar prefetch on TPU): the Pallas backward equals the XLA one."""
  (q, k, v, bidx), (bq, bk), ranges = _case(variant, 8)
  kw = ranges["all"]

  def grads(backward):
    def loss(q, k, v, bidx, ql, kl, qs, ks):
      out = kernels.block_gather_attention(
        q[None], k[None], v[None], bidx[None], block_q=bq, block_k=bk, scale=SCALE,
        is_causal=True, variant=variant, interpret=_interpret(variant), backward=backward,
        query_seq_lengths=ql[None], key_value_seq_lengths=kl[None],
        segment_ids=(qs[None], ks[None]), local_window_size=kw["local_window_size"],
      )[0]  # fmt: skip
      return jnp.sum(out * jnp.sin(out))

    lens = (kw["query_seq_lengths"], kw["key_value_seq_lengths"])
    args = (q, k, v, bidx, *lens, *kw["segment_ids"])
    return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))(*args)

  with pltpu.force_tpu_interpret_mode() if variant == "tpu" else contextlib.nullcontext():
    for name, g, w in zip(("dq", "dk", "dv"), grads("pallas"), grads("xla"), strict=True):
      np.testing.assert_allclose(g, w, err_msg=name, atol=1e-5, rtol=1e-5)


# Bad index-range arguments on the Pallas route: the same errors as the XLA
# route and topk_attention (`gsparse._admissible.build`), raised under jit.
_T, _S = SHAPES["gpu"][1], SHAPES["gpu"][4]
BAD = [
  ("query_seq_lengths", dict(query_seq_lengths=np.array([1, _T + 1])), ValueError, "must lie in"),
  (
    "key_value_seq_lengths",
    dict(key_value_seq_lengths=np.array([-1, 2])),
    ValueError,
    "must lie in",
  ),  # fmt: skip
  (
    "key_value_seq_lengths",
    dict(key_value_seq_lengths=np.ones(3, np.int32)),
    ValueError,
    "batch shape",
  ),  # fmt: skip
  ("local_window_size", dict(local_window_size=-1), ValueError, "must be >= 0"),
  ("local_window_size", dict(local_window_size=(1, 2.5)), TypeError, "pair"),
  (
    "segment_ids",
    dict(segment_ids=(np.zeros((2, _T)), np.zeros((2, _S)))),
    ValueError,
    "integer dtype",
  ),  # fmt: skip
  (
    "segment_ids",
    dict(segment_ids=(np.zeros((2, _T), np.int32), np.zeros((2, _S - 1), np.int32))),
    ValueError,
    "must have shape",
  ),  # fmt: skip
]


@pytest.mark.parametrize("name,kw,err,msg", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_pallas_route_rejects_bad_ranges_like_the_xla_route(name, kw, err, msg):
  (q, k, v, bidx), (bq, bk), _ = _case("gpu", 6)

  def call(impl):
    return jax.jit(
      lambda q, k, v: gsparse.block_sparse_gather_attention(
        q, k, v, bidx, block_q=bq, block_k=bk, implementation=impl, **kw
      )
    )(q, k, v)

  with pytest.raises(err, match=msg) as pallas_err:
    call("pallas")
  assert name in str(pallas_err.value)
  with pytest.raises(err) as xla_err:
    call("xla")
  assert str(xla_err.value) == str(pallas_err.value)


def test_kernel_rejects_side_inputs_of_the_wrong_shape():
  (q, k, v, bidx), (bq, bk), _ = _case("gpu", 7)
  call = lambda **kw: kernels.block_gather_attention(
    q, k, v, bidx, block_q=bq, block_k=bk, scale=SCALE, interpret=True, **kw
  )
  with pytest.raises(ValueError, match="query_seq_lengths must be an integer array of shape"):
    call(query_seq_lengths=jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match=r"segment_ids \(kv\) must be an integer array"):
    call(segment_ids=(jnp.zeros(q.shape[:2], jnp.int32), jnp.zeros(k.shape[:2], jnp.float32)))
  with pytest.raises(ValueError, match="local_window_size"):
    call(local_window_size=(-1, 0))
