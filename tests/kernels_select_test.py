"""Tests of the fused top-k selection kernel (gsparse/kernels/select.py).

`GpuSelectTest` runs the Triton variant on a GPU and skips elsewhere;
`GpuSelectInterpretTest` runs the same tests in the Pallas interpreter (this
is what runs on CPU). `TpuSelectInterpretTest` runs the Mosaic variant under
`pltpu.force_tpu_interpret_mode()`. `SelectLoweringTest` lowers both variants
for "cuda" and "tpu" from the CPU host: the Triton and Mosaic lowering rules
accept the kernels; the device compilers never ran (no accelerator here).

The reference is `_np_top_k`: float64 NumPy logits, a stable sort of each row
by (NaN first, value descending, index ascending), -1 beyond the row's keys,
and a float64 log-sum-exp. It shares no code with the kernel. Inputs are
small integers and the scale a power of two, so every logit is exact in
float32 and float64 alike: ties are real ties, and the indices must match
exactly, tie order included.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.experimental.pallas import tpu as pltpu

from gsparse.kernels import select as fsel


def _np_top_k(q, k, *, kk, scale, is_causal=False, mask=None, bias=None):
  """float64 reference: `[*b, T, N, H]`, `[*b, S, K, H]` -> (idx, vals, lse, num)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  *batch, t, n, _ = q.shape
  s, kh = k.shape[-3], k.shape[-2]
  k = np.repeat(k, n // kh, axis=-2)
  logits = np.einsum("...tnh,...snh->...nts", q, k) * scale
  full = logits.shape
  if bias is not None:
    logits = logits + np.broadcast_to(np.asarray(bias, np.float64), full)
  valid = np.ones(full, bool)
  if mask is not None:
    valid &= np.broadcast_to(np.asarray(mask), full)
  if is_causal:
    valid &= np.arange(s)[None, :] <= np.arange(t)[:, None]
  idx = np.full((*full[:-1], kk), -1, np.int64)
  vals = np.full((*full[:-1], kk), -np.inf)
  lse = np.empty(full[:-1])
  for pos in np.ndindex(*full[:-1]):
    row = logits[pos]
    keys = [j for j in range(s) if valid[pos][j] and row[j] != -np.inf]
    keys.sort(key=lambda j: (not np.isnan(row[j]), -row[j] if not np.isnan(row[j]) else 0, j))
    keys = keys[:kk]
    idx[pos][: len(keys)] = keys
    vals[pos][: len(keys)] = row[keys]
    x = row[valid[pos]]
    if np.isnan(x).any():
      lse[pos] = np.nan
    elif (x == np.inf).any():
      lse[pos] = np.inf
    elif not (x > -np.inf).any():
      lse[pos] = -np.inf
    else:
      mx = x.max()
      lse[pos] = mx + np.log(np.sum(np.exp(x - mx)))
  num = valid.sum(-1)
  mv = lambda a: np.moveaxis(a, len(batch), len(batch) + 1)  # [.., N, T, *] -> [.., T, N, *]
  return mv(idx), mv(vals), np.swapaxes(lse, -1, -2), np.swapaxes(num, -1, -2)


def _int_inputs(seed, b, t, n, kh, s, h, lo=-2, hi=3):
  kq, kk = jax.random.split(jax.random.key(seed))
  q = jax.random.randint(kq, (b, t, n, h), lo, hi).astype(jnp.float32)
  k = jax.random.randint(kk, (b, s, kh, h), lo, hi).astype(jnp.float32)
  return np.array(q), np.array(k)  # writable copies


def _assert_matches(got, ref, err_msg=""):
  idx, vals, lse, num = ref
  np.testing.assert_array_equal(np.asarray(got.indices), idx, err_msg=err_msg)
  np.testing.assert_array_equal(np.asarray(got.logits), vals.astype(np.float32), err_msg=err_msg)
  np.testing.assert_array_equal(np.asarray(got.num_keys), num, err_msg=err_msg)
  lg = np.asarray(got.logsumexp)
  np.testing.assert_array_equal(np.isnan(lg), np.isnan(lse), err_msg=err_msg)
  np.testing.assert_array_equal(np.isneginf(lg), np.isneginf(lse), err_msg=err_msg)
  np.testing.assert_array_equal(np.isposinf(lg), np.isposinf(lse), err_msg=err_msg)
  fin = np.isfinite(lse)
  np.testing.assert_allclose(lg[fin], lse[fin], rtol=1e-6, atol=1e-6, err_msg=err_msg)


class GpuSelectTest(parameterized.TestCase):
  """The Triton variant; runs on a GPU, skipped elsewhere."""

  VARIANT = "gpu"
  INTERPRET = False
  BLOCKS = dict(block_q=16, block_k=16)  # Triton's dot wants >= 16

  def setUp(self):
    super().setUp()
    backend = jax.default_backend()
    if not self.INTERPRET and backend != "gpu":
      self.skipTest(f"{type(self).__name__} needs a GPU (backend is {backend})")

  def _select(self, query, key, **kw):
    return fsel.fused_topk_select(
      query, key, variant=self.VARIANT, interpret=self.INTERPRET, **self.BLOCKS, **kw
    )

  def test_ties_nan_mask_bias_and_empty_rows(self):
    # GQA, T and S not multiples of the blocks, head dim 5. Integer logits
    # tie often; row (0, 0, 0) has a zero query (all S logits tie); query
    # (0, 1, 1) is NaN (its admissible logits are NaN); key 3 of batch 1,
    # head 0 is NaN (ranks first wherever admissible); bias -inf entries are
    # dropped, bias row (2, 4) is all -inf and mask row (batch 1, query 6) is
    # all False: both rows give -1 everywhere and lse -inf (bias) / -inf.
    b, t, n, kh, s, h, kk = 2, 21, 4, 2, 37, 5, 6
    q, k = _int_inputs(0, b, t, n, kh, s, h)
    q[0, 0, 0] = 0.0
    q[0, 1, 1, 0] = np.nan
    k[1, 3, 0, 2] = np.nan
    rng = np.random.default_rng(1)
    mask = rng.random((b, 1, t, s)) < 0.9  # [B, 1, T, S]: broadcast over heads
    mask[1, 0, 6] = False
    bias = rng.integers(-1, 2, (n, t, s)).astype(np.float32)  # [N, T, S]: over batch
    bias[rng.random(bias.shape) < 0.1] = -np.inf
    bias[2, 4] = -np.inf
    mask[0, 0, 0], bias[0, 0] = True, 0.0  # the tie row: all logits 0
    mask[:, 0, 3, 7], bias[1, 3, 7] = True, np.inf  # a +inf logit: ranked first, lse +inf
    got = self._select(q, k, k=kk, scale=0.5, mask=mask, bias=bias)
    ref = _np_top_k(q, k, kk=kk, scale=0.5, mask=mask, bias=bias)
    _assert_matches(got, ref)
    self.assertTrue((ref[0][0, 0, 0] == np.arange(kk)).all())  # the tie row
    self.assertTrue((ref[0][:, 4, 2] == -1).all() and (ref[0][1, 6] == -1).all())
    self.assertEqual(ref[2][0, 3, 1], np.inf)  # the +inf row (batch 0; batch 1 has a NaN key)

  def test_causal_more_queries_than_keys_k_beyond_keys(self):
    # T > S, top-left causal: query i has min(i + 1, S) keys; k = 12 > S = 9,
    # so every slot past the row's keys is -1. A [S] padding mask drops key 5.
    # bfloat16 inputs (the kernel accumulates in float32).
    b, t, n, kh, s, h, kk = 1, 24, 2, 1, 9, 8, 12
    q, k = _int_inputs(2, b, t, n, kh, s, h)
    mask = np.arange(s) != 5
    qb, kb = jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)  # exact: small ints
    got = self._select(qb, kb, k=kk, scale=0.25, is_causal=True, mask=mask)
    ref = _np_top_k(q, k, kk=kk, scale=0.25, is_causal=True, mask=mask)
    _assert_matches(got, ref)

  def test_increasing_logits_replace_every_block_under_vmap(self):
    # Logits grow with the key index, so every block beats the whole running
    # list (the worst case of the merge), while query 2 is zero: all its
    # logits tie, and the replacements driven by the other rows of its
    # program must leave its list at keys 0..7 (a later key that only ties
    # never enters). k = 8 is a power of two, so the list's last slot is
    # returned too. Under vmap over two inputs, the second with the key order
    # reversed (no replacement after the first block).
    t, s, h, kk = 20, 70, 4, 8
    k_inc = np.zeros((s, 1, h), np.float32)
    k_inc[:, 0, 0] = np.arange(s)
    k = np.stack([k_inc, k_inc[::-1]])
    q = np.ones((2, t, 1, h), np.float32)
    q[:, 2] = 0.0
    got = jax.vmap(lambda q, k: self._select(q, k, k=kk, scale=1.0))(q, k)
    for i in range(2):
      ref = _np_top_k(q[i], k[i], kk=kk, scale=1.0)
      _assert_matches(jax.tree.map(lambda x, i=i: x[i], got), ref, err_msg=f"input {i}")
    np.testing.assert_array_equal(np.asarray(got.indices)[:, 2, 0], [np.arange(kk)] * 2)


class GpuSelectInterpretTest(GpuSelectTest):
  """The Triton variant in the Pallas interpreter (runs on CPU)."""

  INTERPRET = True
  BLOCKS = dict(block_q=8, block_k=16)


class TpuSelectInterpretTest(parameterized.TestCase):
  """The Mosaic variant under `pltpu.force_tpu_interpret_mode()` (runs on CPU).

  The TPU interpreter is slow on CPU: one case with every feature.
  """

  def test_causal_mask_bias_nan_ties(self):
    with pltpu.force_tpu_interpret_mode():
      b, t, n, kh, s, h, kk = 1, 16, 2, 1, 150, 3, 5
      q, k = _int_inputs(3, b, t, n, kh, s, h)
      q[0, 3, 1] = 0.0  # all ties
      k[0, 2, 0, 1] = np.nan
      rng = np.random.default_rng(4)
      mask = rng.random((t, s)) < 0.8
      mask[9] = False
      bias = np.where(rng.random((b, n, t, s)) < 0.1, -np.inf, 0.0).astype(np.float32)
      got = fsel.fused_topk_select(
        q, k, k=kk, scale=0.5, is_causal=True, mask=mask, bias=bias, block_q=8, block_k=128,
        variant="tpu", interpret=True,
      )  # fmt: skip
    _assert_matches(got, _np_top_k(q, k, kk=kk, scale=0.5, is_causal=True, mask=mask, bias=bias))


class SelectDefaultsTest(parameterized.TestCase):
  """Default blocks and variant, no batch axes, and the jnp reference."""

  def test_defaults_and_jnp_reference_match_numpy(self):
    # Gaussian inputs: no ties (seeded; a near-tie within float32 rounding
    # would need two of these 3 x 5 logits within ~1e-7 of each other).
    kq, kk_ = jax.random.split(jax.random.key(5))
    q = np.asarray(jax.random.normal(kq, (3, 2, 6)))  # [T, N, H]
    k = np.asarray(jax.random.normal(kk_, (5, 1, 6)))  # [S, K, H]
    ref = _np_top_k(q, k, kk=4, scale=0.3, is_causal=True)
    got = fsel.fused_topk_select(q, k, k=4, scale=0.3, is_causal=True)
    np.testing.assert_array_equal(np.asarray(got.indices), ref[0])
    np.testing.assert_allclose(np.asarray(got.logits), ref[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.logsumexp), ref[2], rtol=1e-6, atol=1e-6)
    jref = fsel.fused_topk_select_reference(q, k, k=4, scale=0.3, is_causal=True)
    np.testing.assert_array_equal(np.asarray(jref.indices), ref[0])
    np.testing.assert_allclose(np.asarray(jref.logits), ref[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jref.logsumexp), ref[2], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(jref.num_keys), ref[3])


class SelectLoweringTest(parameterized.TestCase):
  """Lowers both variants from the CPU host (no device compile, no run)."""

  @parameterized.parameters(
    ("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")
  )
  def test_lowers_for_device(self, variant, platform, marker):
    q = jnp.zeros((1, 256, 4, 128), jnp.bfloat16)
    k = jnp.zeros((1, 512, 2, 128), jnp.bfloat16)
    mask = jnp.ones((1, 1, 1, 512), bool)
    bias = jnp.zeros((256, 512), jnp.float32)

    def both(q, k, mask, bias):
      a = fsel.fused_topk_select(q, k, k=64, scale=0.1, variant=variant, interpret=False)
      c = fsel.fused_topk_select(
        q, k, k=100, scale=0.1, is_causal=True, mask=mask, bias=bias, variant=variant,
        interpret=False,
      )  # fmt: skip
      # The index ranges: [B] lengths and [B, T] / [B, S] segment ids, a window.
      r = fsel.fused_topk_select(
        q, k, k=64, scale=0.1, is_causal=True, variant=variant, interpret=False,
        query_seq_lengths=jnp.array([200]), key_value_seq_lengths=jnp.array([300]),
        segment_ids=(jnp.zeros((1, 256), jnp.int32), jnp.zeros((1, 512), jnp.int32)),
        local_window_size=(128, 0),
      )  # fmt: skip
      return a, c, r

    text = jax.jit(both).trace(q, k, mask, bias).lower(lowering_platforms=(platform,)).as_text()
    self.assertEqual(text.count(marker), 3, f"expected three {marker} kernels")

  @parameterized.parameters(("gpu", "cuda"), ("tpu", "tpu"))
  def test_no_query_by_key_array_outside_the_kernel(self, variant, platform):
    # T = 256 queries, S = 512 keys: no [T, S] (or [S, T]) array may appear in
    # the lowered program outside the kernel (the kernel's own body is an
    # opaque custom call on both platforms).
    q = jnp.zeros((1, 256, 4, 128), jnp.bfloat16)
    k = jnp.zeros((1, 512, 2, 128), jnp.bfloat16)
    f = lambda q, k: fsel.fused_topk_select(
      q, k, k=64, scale=0.1, is_causal=True, variant=variant, interpret=False
    )
    text = jax.jit(f).trace(q, k).lower(lowering_platforms=(platform,)).as_text()
    self.assertIn("64xi32", text)  # the result types are in the text
    self.assertNotRegex(text, r"256x(\d+x)*512|512x(\d+x)*256")


class SelectErrorTest(parameterized.TestCase):
  """Bad arguments raise at trace time, naming the argument, also under jit."""

  @parameterized.parameters(
    (dict(k=0), ValueError, "k=0"),
    (dict(k=2.0), ValueError, "k=2.0"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(is_causal=1), ValueError, "is_causal"),
    (dict(variant="cpu"), ValueError, "variant"),
    (dict(block_q=12), ValueError, "block_q"),
    (dict(block_k=0), ValueError, "block_k"),
    (dict(mask=np.ones((3, 5), np.int32)), TypeError, "mask.dtype"),
    (dict(mask=np.ones((4, 5), bool)), ValueError, "mask"),
    (dict(bias=np.ones((2, 6), np.int32)), TypeError, "bias.dtype"),
    (dict(bias=np.ones((7, 2, 5), np.float32)), ValueError, "bias"),
  )
  def test_bad_arguments(self, kw, err, match):
    q = jnp.zeros((3, 2, 4), jnp.float32)
    k = jnp.zeros((5, 1, 4), jnp.float32)
    args = dict(k=2, scale=1.0) | kw
    with pytest.raises(err, match=match):
      fsel.fused_topk_select(q, k, **args)
    with pytest.raises(err, match=match):
      jax.jit(lambda q, k: fsel.fused_topk_select(q, k, **args))(q, k)

  @parameterized.parameters(
    (jnp.zeros((3, 2, 4)), jnp.zeros((5, 1, 3)), ValueError, "head dim"),
    (jnp.zeros((3, 3, 4)), jnp.zeros((5, 2, 4)), ValueError, "multiple of key heads"),
    (jnp.zeros((3, 4)), jnp.zeros((5, 4)), ValueError, "query"),
    (jnp.zeros((3, 2, 4), jnp.int32), jnp.zeros((5, 1, 4)), TypeError, "query.dtype"),
  )
  def test_bad_shapes_and_dtypes(self, q, k, err, match):
    with pytest.raises(err, match=match):
      fsel.fused_topk_select(q, k, k=2, scale=1.0)
