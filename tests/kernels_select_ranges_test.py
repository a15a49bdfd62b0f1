"""Index ranges in the fused top-k selection (gsparse/kernels/select_ranges.py).

`query_seq_lengths`, `key_value_seq_lengths`, `local_window_size` and
`segment_ids` go into `fused_topk_select` (both variants, in their
interpreters on CPU) and through `FusedExactSelection`, the GPU/TPU choice of
`selection="auto"`. References: the float64 NumPy top-k of
tests/kernels_select_test.py on a NumPy-built mask (no gsparse code), the
chunked `ExactSelection` with the same `Admissible`, and
`jax.nn.dot_product_attention` at k >= S (tests/ranges_test.py's reference).
Inputs are small integers and the scale a power of two, so logits are exact
and ties real: indices must match exactly, tie order included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import gsparse
from gsparse import _admissible
from gsparse.kernels import select as fsel
from gsparse.selection import ExactSelection, FusedExactSelection, auto
from tests.kernels_select_test import _assert_matches, _int_inputs, _np_top_k
from tests.ranges_test import CASES, S, _inputs, _np_mask, _reference

KK = 6


def _ranges(b, t, s, seed, window):
  """Lengths 0, full and partial (query and key), packed segment ids
  (cumulative sums of document starts, as the training script packs), and
  the `[B, 1, T, S]` NumPy mask of them."""
  rng = np.random.default_rng(seed)
  q_len = np.array([0, t, t - 4][:b], np.int32)
  kv_len = np.array([s, 0, s - 9][:b], np.int32)
  ids = np.cumsum(rng.random((b, max(t, s))) < 0.1, axis=1).astype(np.int32)
  q_seg, kv_seg = ids[:, :t], ids[:, :s]  # one packing of both (self-attention)
  kw = dict(
    query_seq_lengths=q_len,
    key_value_seq_lengths=kv_len,
    segment_ids=(q_seg, kv_seg),
    local_window_size=window,
  )
  r, c = np.arange(t)[:, None], np.arange(s)[None, :]
  m = (r < q_len[:, None, None]) & (c < kv_len[:, None, None])
  m &= (q_seg[:, :, None] == kv_seg[:, None, :]) & (c >= r - window[0]) & (c <= r + window[1])
  return kw, m[:, None]  # [B, 1, T, S]


def _check_all(q, k, kw, mask, *, is_causal, got):
  """`got` equals the NumPy top-k on the mask and `ExactSelection` on the ranges."""
  _assert_matches(got, _np_top_k(q, k, kk=KK, scale=0.5, is_causal=is_causal, mask=mask))
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  seg = kw["segment_ids"]
  adm = _admissible.build((b,), t, s, **(kw | dict(segment_ids=gsparse.SegmentIds(*seg))))
  ref = ExactSelection().select(
    jnp.asarray(q), jnp.asarray(k), None, None, k=KK, scale=0.5, is_causal=is_causal,
    adm=adm, row_lse=True, kept_logits=True,
  )  # fmt: skip
  np.testing.assert_array_equal(got.indices, ref.indices)
  np.testing.assert_array_equal(got.logits, ref.kept_logits)
  np.testing.assert_array_equal(got.num_keys, ref.num_keys)
  np.testing.assert_allclose(got.logsumexp, ref.row_logsumexp, rtol=1e-6, atol=1e-6)
  num = np.asarray(got.num_keys)
  assert (num == 0).any() and (num >= KK).any()  # empty rows and full rows both occur


@pytest.mark.parametrize("is_causal", [True, False])
def test_gpu_variant_interpret_matches_numpy_and_exact_selection(is_causal):
  # GQA (4 query heads on 2 key heads), T and S not multiples of the blocks.
  b, t, n, kh, s, h = 3, 21, 4, 2, 37, 5
  q, k = _int_inputs(0, b, t, n, kh, s, h)
  kw, mask = _ranges(b, t, s, 1, (5, 3))
  got = fsel.fused_topk_select(
    q, k, k=KK, scale=0.5, is_causal=is_causal, block_q=8, block_k=16, variant="gpu",
    interpret=True, **kw,
  )  # fmt: skip
  _check_all(q, k, kw, mask, is_causal=is_causal, got=got)


def test_tpu_variant_interpret_matches_numpy_and_exact_selection():
  # Two key blocks of 128: the window (8, 1) leaves the second wholly dead
  # for every query (skipped), as are all tiles of the zero-length rows.
  b, t, n, kh, s, h = 3, 16, 2, 1, 150, 3
  q, k = _int_inputs(2, b, t, n, kh, s, h)
  kw, mask = _ranges(b, t, s, 7, (8, 1))
  with pltpu.force_tpu_interpret_mode():
    got = fsel.fused_topk_select(
      q, k, k=KK, scale=0.5, is_causal=False, block_q=8, block_k=128, variant="tpu",
      interpret=True, **kw,
    )  # fmt: skip
  _check_all(q, k, kw, mask, is_causal=False, got=got)


def test_fused_selection_with_ranges_calls_the_kernel_and_matches_jax_nn(monkeypatch):
  """`FusedExactSelection` with index ranges runs the kernel (before: the
  chunked fallback), and topk_attention through it equals jax.nn at k >= S."""
  calls = []
  kernel = auto.fused_topk_select

  def spy(*args, **kwargs):
    calls.append(kwargs.get("segment_ids") is not None)
    return kernel(*args, **kwargs)

  monkeypatch.setattr(auto, "fused_topk_select", spy)
  q, k, v = _inputs(4)
  kw = CASES["all"]  # lengths, window and segment ids together
  ref, ref_lse = _reference(q, k, v, kw, True)
  out, lse = gsparse.topk_attention(
    q, k, v, k=S, selection=FusedExactSelection(interpret=True), is_causal=True,
    return_residual=True, **kw,
  )  # fmt: skip
  assert calls == [True]  # the kernel ran, with the segment ids
  has = _np_mask(kw, True).any(-1)[:, 0][..., None]  # [B, T, 1]: rows with a key
  assert has.any() and not has.all()
  np.testing.assert_allclose(
    np.where(has[..., None], out, 0), np.where(has[..., None], ref, 0), atol=2e-6
  )
  assert np.all(np.where(has[..., None], 0, np.asarray(out)) == 0)  # no key: zeros
  np.testing.assert_allclose(np.where(has, lse, 0), np.where(has, ref_lse, 0), atol=2e-6)


def test_bad_range_arguments_name_the_argument():
  q = jnp.zeros((2, 3, 2, 4), jnp.float32)
  k = jnp.zeros((2, 5, 1, 4), jnp.float32)
  for kw, match in (
    (dict(query_seq_lengths=jnp.ones((3,), jnp.int32)), "query_seq_lengths"),
    (dict(key_value_seq_lengths=jnp.ones((2,), jnp.float32)), "key_value_seq_lengths"),
    (dict(segment_ids=(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 4), jnp.int32))), r"\(kv\)"),
    (dict(segment_ids=jnp.zeros((2, 3), jnp.int32)), "segment_ids"),
    (dict(local_window_size=(1, -1)), "local_window_size"),
  ):
    with pytest.raises(ValueError, match=match):
      jax.jit(lambda q, k, kw=kw: fsel.fused_topk_select(q, k, k=2, scale=1.0, **kw))(q, k)


def test_gpu_variant_under_vmap_takes_per_example_ranges():
  # vmap over an extra leading axis: lengths and segment ids differ per example.
  q, k = _int_inputs(5, 2, 16, 2, 1, 40, 3)
  kw, mask = _ranges(2, 16, 40, 6, (3, 3))
  kw = {name: kw[name] for name in ("query_seq_lengths", "key_value_seq_lengths", "segment_ids")}

  def one(q, k, kw):
    return fsel.fused_topk_select(
      q[None], k[None], k=KK, scale=0.5, block_q=8, block_k=16, variant="gpu", interpret=True,
      local_window_size=(3, 3), **jax.tree.map(lambda x: x[None], kw),
    )  # fmt: skip

  got = jax.vmap(one)(q, k, jax.tree.map(jnp.asarray, kw))
  for i in range(2):
    ref = _np_top_k(q[i : i + 1], k[i : i + 1], kk=KK, scale=0.5, mask=mask[i : i + 1])
    _assert_matches(jax.tree.map(lambda x, i=i: x[i], got), ref, err_msg=f"example {i}")


@pytest.mark.parametrize(("variant", "platform", "marker"), [
  ("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call"),
])  # fmt: skip
def test_vmapped_kernel_with_ranges_lowers_for_device(variant, platform, marker):
  # From the CPU host: the Triton and Mosaic lowerings accept the range inputs'
  # blocks with vmap's extra grid axis (Mosaic rejects a batched flat SMEM vector).
  q = jnp.zeros((2, 1, 128, 2, 128), jnp.bfloat16)
  k = jnp.zeros((2, 1, 256, 1, 128), jnp.bfloat16)
  lens = jnp.array([[100], [50]], jnp.int32)
  seg = (jnp.zeros((2, 1, 128), jnp.int32), jnp.zeros((2, 1, 256), jnp.int32))
  f = lambda q, k, lens, seg: fsel.fused_topk_select(
    q, k, k=8, scale=0.1, variant=variant, interpret=False, query_seq_lengths=lens,
    key_value_seq_lengths=lens, segment_ids=seg, local_window_size=(64, 0),
  )  # fmt: skip
  lowered = jax.jit(jax.vmap(f)).trace(q, k, lens, seg).lower(lowering_platforms=(platform,))
  assert lowered.as_text().count(marker) == 1
