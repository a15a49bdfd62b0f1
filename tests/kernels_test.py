"""Tests of the Pallas sparse-gather kernels (gsparse/kernels/).

`GpuKernelTest` runs the Triton kernel on a real GPU and skips elsewhere;
`GpuKernelInterpretTest` runs the same tests in the Pallas interpreter on any
backend (this is what runs on CPU). `TpuKernelTest` / `TpuKernelInterpretTest`
do the same for the Mosaic kernel; the interpret subclass runs it on CPU under
`pltpu.force_tpu_interpret_mode()`. `LoweringTest` lowers both kernels for
"cuda" and "tpu" from the CPU host: this checks the Triton and Mosaic lowering
rules accept them, not that the device compilers do. `GpuKernelTest` and
`PublicApiTest` ran on an NVIDIA H200 through `scripts/gpu_checks.sh`
(docs/kernels.md, "What ran where"); nothing has run on a TPU.

References: `sparse_gather_reference` / `block_gather_reference` build the dense
`[B, N, T, S]` mask from the indices and run dense softmax attention, so they
share no code with the kernels or the XLA gather. Gradients are compared with
autodiff through those references and checked with `jax.test_util.check_grads`
(float32; finite differences in bfloat16 would test bfloat16 rounding, not the
gradient).
"""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.experimental.pallas import tpu as pltpu
from jax.test_util import check_grads

import gsparse
from gsparse import block_gather, gather, kernels

# Forward / gradient tolerances per dtype (inputs in that dtype, float32 math).
FWD_TOL = {
  jnp.float32: dict(atol=2e-5, rtol=2e-5),
  jnp.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
GRAD_TOL = {
  jnp.float32: dict(atol=1e-4, rtol=1e-4),
  jnp.bfloat16: dict(atol=3e-2, rtol=3e-2),
}

# (B, T, N, K, S, H, Hv, k): GQA (N != K), head dims that are not powers of two,
# k not a power of two, T not a multiple of the query tile.
TOKEN_SHAPES = {
  "gqa_h6": (2, 5, 4, 2, 11, 6, 5, 7),
  "mha_h8": (1, 4, 2, 2, 8, 8, 8, 3),
}
# (B, T, N, K, S, H, Hv, block_q, block_k, nb): T and S not multiples of the blocks.
BLOCK_SHAPES = {
  "gqa_h6": (2, 7, 4, 2, 13, 6, 5, 2, 4, 3),
  "mqa_h5": (1, 8, 2, 1, 12, 5, 3, 4, 2, 2),
}
# The same cases with blocks the Triton kernel tiles (powers of two >= 16).
BLOCK_SHAPES_TRITON = {
  "gqa_h6": (2, 40, 4, 2, 50, 6, 5, 16, 16, 3),
  "mqa_h5": (1, 36, 2, 1, 45, 5, 3, 16, 32, 2),
}


def _inputs(seed, b, t, n, kh, s, h, hv, dtype):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, n, h), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, kh, h), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, kh, hv), jnp.float32).astype(dtype)
  return q, k, v


def _token_indices(seed, b, t, n, s, kk, kind):
  """De-duplicated token indices with masked, out-of-range, duplicate or causal slots."""
  key = jax.random.key(seed)
  if kind == "causal":
    raw = jax.random.randint(key, (b, t, n, kk), 0, s)
    raw = jnp.where(raw <= jnp.arange(t)[None, :, None, None], raw, -1)
  else:  # masked (-1), out of range (>= s) and duplicates (drawn with replacement)
    raw = jax.random.randint(key, (b, t, n, kk), -2, s + 2)
  raw = raw.at[0, 0, 0, :].set(-1)  # one query with no key at all
  return gather.dedup_indices(raw, s)


def _block_indices(seed, b, t, n, s, block_q, block_k, nb):
  nkb = -(-s // block_k)
  raw = jax.random.randint(jax.random.key(seed), (b, -(-t // block_q), n, nb), -1, nkb + 1)
  raw = raw.at[0, 0, 0, :].set(-1)
  return gather.dedup_indices(raw, nkb)


def _assert_close(x, y, tol, err_msg=""):
  x = np.asarray(jnp.asarray(x, jnp.float32))
  y = np.asarray(jnp.asarray(y, jnp.float32))
  np.testing.assert_allclose(x, y, err_msg=err_msg, **tol)


def _assert_lse_close(x, y, tol):
  x, y = np.asarray(x), np.asarray(y)
  np.testing.assert_array_equal(np.isneginf(x), np.isneginf(y))
  fin = np.isfinite(y)
  np.testing.assert_allclose(x[fin], y[fin], **tol)


class GpuKernelTest(parameterized.TestCase):
  """The Triton-style kernel; runs on a GPU, skipped elsewhere."""

  VARIANT = "gpu"
  INTERPRET = False
  BLOCK_SIZES = kernels.BlockSizes(block_q=2, block_slots=4)
  BLOCK_SHAPES = BLOCK_SHAPES_TRITON

  def setUp(self):
    super().setUp()
    backend = jax.default_backend()
    if not self.INTERPRET and backend != self.VARIANT:
      self.skipTest(
        f"{type(self).__name__} needs a {self.VARIANT.upper()} (backend is {backend}); "
        f"the interpret-mode subclass runs these tests on CPU"
      )
    # References and the XLA paths in float32: a GPU's DEFAULT float32 matmul
    # is TF32, which the float32 tolerances below would (rightly) reject.
    self.enter_context(jax.default_matmul_precision("highest"))

  def token(self, q, k, v, idx, bias=None, scale=0.37):
    return kernels.token_gather_attention(
      q,
      k,
      v,
      idx,
      bias,
      scale=scale,
      block_sizes=self.BLOCK_SIZES,
      variant=self.VARIANT,
      interpret=self.INTERPRET,
    )

  def block(self, q, k, v, bidx, *, block_q, block_k, is_causal, scale=0.37):
    return kernels.block_gather_attention(
      q,
      k,
      v,
      bidx,
      block_q=block_q,
      block_k=block_k,
      scale=scale,
      is_causal=is_causal,
      variant=self.VARIANT,
      interpret=self.INTERPRET,
    )

  # One forward and one gradient test per kernel run by default; the other
  # dtypes, shapes and index kinds run in the slow step of CI.
  def test_token_forward(self):
    self._check_token_forward("gqa_h6", jnp.float32, "dups")

  @pytest.mark.slow
  def test_token_forward_bfloat16_causal(self):
    self._check_token_forward("gqa_h6", jnp.bfloat16, "causal")

  def _check_token_forward(self, shape, dtype, kind):
    b, t, n, kh, s, h, hv, kk = TOKEN_SHAPES[shape]
    q, k, v = _inputs(0, b, t, n, kh, s, h, hv, dtype)
    idx = _token_indices(1, b, t, n, s, kk, kind)
    bias = jax.random.normal(jax.random.key(2), idx.shape, jnp.float32)
    out, lse, logits = self.token(q, k, v, idx, bias)
    ref_out, ref_lse = kernels.sparse_gather_reference(q, k, v, idx, bias, scale=0.37)
    self.assertEqual(out.dtype, dtype)
    self.assertEqual(out.shape, (b, t, n, hv))
    _assert_close(out, ref_out, FWD_TOL[dtype])
    _assert_lse_close(lse, ref_lse, FWD_TOL[dtype])
    # The fully masked query: zero output, lse = -inf.
    np.testing.assert_array_equal(np.asarray(out[0, 0, 0], np.float32), 0.0)
    self.assertEqual(float(lse[0, 0, 0]), -np.inf)
    # Slot logits: -inf exactly at masked slots, scale * q.k + bias elsewhere.
    valid = np.asarray(idx) >= 0
    np.testing.assert_array_equal(np.isneginf(np.asarray(logits)), ~valid)
    xla = gather.sparse_gather_attention_xla(q, k, v, idx, bias, 0.37)
    _assert_close(out, xla.output, FWD_TOL[dtype])

  def test_token_gradients_match_reference(self):
    self._check_token_gradients("gqa_h6", jnp.float32)

  @pytest.mark.slow
  def test_token_gradients_match_reference_bfloat16_mha(self):
    self._check_token_gradients("mha_h8", jnp.bfloat16)

  def _check_token_gradients(self, shape, dtype):
    b, t, n, kh, s, h, hv, kk = TOKEN_SHAPES[shape]
    q, k, v = _inputs(3, b, t, n, kh, s, h, hv, dtype)
    idx = _token_indices(4, b, t, n, s, kk, "dups")
    bias = jax.random.normal(jax.random.key(5), idx.shape, jnp.float32)
    ct = jax.random.normal(jax.random.key(6), (b, t, n, hv), jnp.float32)

    def loss(fn, q, k, v, bias):
      out, lse = fn(q, k, v, bias)
      return jnp.sum(out.astype(jnp.float32) * ct) + 0.3 * jnp.sum(
        jnp.where(lse > -jnp.inf, lse, 0)
      )

    kern = lambda q, k, v, bias: self.token(q, k, v, idx, bias)[:2]
    ref = lambda q, k, v, bias: kernels.sparse_gather_reference(q, k, v, idx, bias, scale=0.37)
    got = jax.jit(jax.grad(functools.partial(loss, kern), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    want = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want, strict=True):
      self.assertEqual(g.dtype, w.dtype, name)
      _assert_close(g, w, GRAD_TOL[dtype], err_msg=name)

  @pytest.mark.slow  # finite differences; test_token_gradients_match_reference runs by default
  def test_token_check_grads(self):
    b, t, n, kh, s, h, hv, kk = TOKEN_SHAPES["mha_h8"]
    q, k, v = _inputs(7, b, t, n, kh, s, h, hv, jnp.float32)
    idx = _token_indices(8, b, t, n, s, kk, "causal")
    bias = jax.random.normal(jax.random.key(9), idx.shape, jnp.float32)
    # Differentiates output, lse and slot logits at once (all three cotangents).
    f = jax.jit(
      lambda q, k, v, bias: jax.tree.map(
        lambda x: jnp.where(jnp.isfinite(x), x, 0.0), self.token(q, k, v, idx, bias)
      )
    )
    check_grads(f, (q, k, v, bias), order=1, modes=("rev",), eps=1e-3, atol=2e-2, rtol=2e-2)

  def test_block_forward(self):
    self._check_block_forward("gqa_h6", jnp.float32, is_causal=True)

  @pytest.mark.slow
  def test_block_forward_bfloat16_mqa(self):
    self._check_block_forward("mqa_h5", jnp.bfloat16, is_causal=False)

  def _check_block_forward(self, shape, dtype, *, is_causal):
    b, t, n, kh, s, h, hv, bq, bk, nb = self.BLOCK_SHAPES[shape]
    q, k, v = _inputs(10, b, t, n, kh, s, h, hv, dtype)
    bidx = _block_indices(11, b, t, n, s, bq, bk, nb)
    out, lse = self.block(q, k, v, bidx, block_q=bq, block_k=bk, is_causal=is_causal)
    ref_out, ref_lse = kernels.block_gather_reference(
      q, k, v, bidx, block_q=bq, block_k=bk, scale=0.37, is_causal=is_causal
    )
    self.assertEqual(out.dtype, dtype)
    _assert_close(out, ref_out, FWD_TOL[dtype])
    _assert_lse_close(lse, ref_lse, FWD_TOL[dtype])
    np.testing.assert_array_equal(np.asarray(out[0, :bq, 0], np.float32), 0.0)
    xla = block_gather.block_sparse_gather_attention_xla(
      q, k, v, bidx, block_q=bq, block_k=bk, scale=0.37, is_causal=is_causal
    )
    _assert_close(out, xla.output, FWD_TOL[dtype])

  def test_block_gradients_match_reference(self):
    self._check_block_gradients("gqa_h6", jnp.float32)

  @pytest.mark.slow  # the same in bfloat16 (the forward tests cover bfloat16 by default)
  def test_block_gradients_match_reference_bfloat16(self):
    self._check_block_gradients("gqa_h6", jnp.bfloat16)

  def _check_block_gradients(self, shape, dtype):
    b, t, n, kh, s, h, hv, bq, bk, nb = self.BLOCK_SHAPES[shape]
    q, k, v = _inputs(12, b, t, n, kh, s, h, hv, dtype)
    bidx = _block_indices(13, b, t, n, s, bq, bk, nb)
    ct = jax.random.normal(jax.random.key(14), (b, t, n, hv), jnp.float32)

    def loss(fn, q, k, v):
      out, lse = fn(q, k, v)
      return jnp.sum(out.astype(jnp.float32) * ct) + 0.3 * jnp.sum(
        jnp.where(lse > -jnp.inf, lse, 0)
      )

    kern = lambda q, k, v: self.block(q, k, v, bidx, block_q=bq, block_k=bk, is_causal=True)
    ref = lambda q, k, v: kernels.block_gather_reference(
      q, k, v, bidx, block_q=bq, block_k=bk, scale=0.37, is_causal=True
    )
    got = jax.jit(jax.grad(functools.partial(loss, kern), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2)))(q, k, v)
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
      _assert_close(g, w, GRAD_TOL[dtype], err_msg=name)

  @pytest.mark.slow  # finite differences; test_block_gradients_match_reference runs by default
  def test_block_check_grads(self):
    b, t, n, kh, s, h, hv, bq, bk, nb = self.BLOCK_SHAPES["mqa_h5"]
    q, k, v = _inputs(15, b, t, n, kh, s, h, hv, jnp.float32)
    bidx = _block_indices(16, b, t, n, s, bq, bk, nb)
    f = jax.jit(
      lambda q, k, v: jax.tree.map(
        lambda x: jnp.where(jnp.isfinite(x), x, 0.0),
        self.block(q, k, v, bidx, block_q=bq, block_k=bk, is_causal=True),
      )
    )
    check_grads(f, (q, k, v), order=1, modes=("rev",), eps=1e-3, atol=2e-2, rtol=2e-2)


class GpuKernelInterpretTest(GpuKernelTest):
  """The Triton-style kernel in the Pallas interpreter (runs on CPU).

  Small blocks keep the interpreter fast; the interpreter tiles any size.
  """

  INTERPRET = True
  BLOCK_SHAPES = BLOCK_SHAPES


class TpuKernelTest(parameterized.TestCase):
  """The Mosaic kernel; runs on a TPU, skipped elsewhere.

  The TPU interpreter is slow on CPU, so this class is small: one forward test
  per granularity.
  """

  INTERPRET = False

  def setUp(self):
    super().setUp()
    backend = jax.default_backend()
    if not self.INTERPRET and backend != "tpu":
      self.skipTest(
        f"{type(self).__name__} needs a TPU (backend is {backend}); "
        "TpuKernelInterpretTest runs these tests on CPU"
      )
    if self.INTERPRET:
      ctx = pltpu.force_tpu_interpret_mode()
      ctx.__enter__()
      self.addCleanup(ctx.__exit__, None, None, None)

  def test_token_forward(self):
    # The backward is the shared XLA code tested in GpuKernelInterpretTest.
    b, t, n, kh, s, h, hv, kk = 1, 3, 2, 1, 9, 6, 5, 4
    q, k, v = _inputs(20, b, t, n, kh, s, h, hv, jnp.float32)
    idx = _token_indices(21, b, t, n, s, kk, "dups")
    bias = jax.random.normal(jax.random.key(22), idx.shape, jnp.float32)
    out, lse, logits = kernels.token_gather_attention(
      q, k, v, idx, bias, scale=0.37, block_sizes=kernels.BlockSizes(block_q=2), variant="tpu"
    )
    ref_out, ref_lse = kernels.sparse_gather_reference(q, k, v, idx, bias, scale=0.37)
    _assert_close(out, ref_out, FWD_TOL[jnp.float32])
    _assert_lse_close(lse, ref_lse, FWD_TOL[jnp.float32])
    np.testing.assert_array_equal(np.isneginf(np.asarray(logits)), np.asarray(idx) < 0)

  @pytest.mark.slow  # the Mosaic interpreter compiles slowly; the token kernel runs by default
  def test_block_forward_causal(self):
    b, t, n, kh, s, h, hv, bq, bk, nb = 1, 8, 2, 1, 11, 6, 5, 8, 8, 2
    q, k, v = _inputs(22, b, t, n, kh, s, h, hv, jnp.bfloat16)
    bidx = _block_indices(23, b, t, n, s, bq, bk, nb).at[0, 0, 1].set(jnp.array([0, 2]))
    out, lse = kernels.block_gather_attention(
      q, k, v, bidx, block_q=bq, block_k=bk, scale=0.37, is_causal=True, variant="tpu"
    )
    ref_out, ref_lse = kernels.block_gather_reference(
      q, k, v, bidx, block_q=bq, block_k=bk, scale=0.37, is_causal=True
    )
    _assert_close(out, ref_out, FWD_TOL[jnp.bfloat16])
    _assert_lse_close(lse, ref_lse, FWD_TOL[jnp.bfloat16])


class TpuKernelInterpretTest(TpuKernelTest):
  """The Mosaic kernel under `pltpu.force_tpu_interpret_mode()` (runs on CPU)."""

  INTERPRET = True


class LoweringTest(parameterized.TestCase):
  """Lowers the device kernels from the CPU host (no device compile, no run)."""

  @parameterized.parameters(
    ("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")
  )
  def test_kernels_lower_for_device(self, variant, platform, marker):
    q = jnp.zeros((1, 32, 4, 128), jnp.bfloat16)
    k = jnp.zeros((1, 64, 2, 128), jnp.bfloat16)
    idx = jnp.zeros((1, 32, 4, 16), jnp.int32)
    bidx = jnp.zeros((1, 2, 4, 2), jnp.int32)

    def fwd_and_grad(q, k, v):
      def loss(q, k, v):
        o1 = kernels.token_gather_attention(q, k, v, idx, scale=0.1, variant=variant)[0]
        o2 = kernels.block_gather_attention(
          q, k, v, bidx, block_q=16, block_k=16, scale=0.1, is_causal=True, variant=variant
        )[0]
        return jnp.sum(o1.astype(jnp.float32)) + jnp.sum(o2.astype(jnp.float32))

      return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    lowered = jax.jit(fwd_and_grad).trace(q, k, k).lower(lowering_platforms=(platform,))
    text = lowered.as_text()
    # Two forward kernels and, off interpret mode, the Pallas backward of each:
    # dq and dk/dv (gsparse.kernels.token_bwd, gsparse.kernels.block_bwd).
    self.assertEqual(text.count(marker), 6, f"expected six {marker} kernels")
    for name in ("token_bwd_dq", "token_bwd_dkdv", "block_bwd_dq", "block_bwd_dkdv"):
      self.assertIn(f"gsparse_{name}_{variant}", text)

  @parameterized.parameters(
    ("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")
  )
  def test_block_kernels_with_index_ranges_lower_for_device(self, variant, platform, marker):
    """The block forward, dq and dk/dv kernels with all four index ranges as side inputs."""
    b, t, s = 2, 32, 64
    q = jnp.zeros((b, t, 4, 128), jnp.bfloat16)
    k = jnp.zeros((b, s, 2, 128), jnp.bfloat16)
    bidx = jnp.zeros((b, t // 16, 4, 2), jnp.int32)
    ranges = dict(
      query_seq_lengths=jnp.array([20, t], jnp.int32),
      key_value_seq_lengths=jnp.array([s, 10], jnp.int32),
      segment_ids=(jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)),
      local_window_size=(8, 0),
    )

    def loss(q, k, v):
      out = kernels.block_gather_attention(
        q, k, v, bidx, block_q=16, block_k=16, scale=0.1, is_causal=True, variant=variant, **ranges
      )[0]
      return jnp.sum(out.astype(jnp.float32))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    text = jax.jit(grad).trace(q, k, k).lower(lowering_platforms=(platform,)).as_text()
    self.assertEqual(text.count(marker), 3, f"expected three {marker} kernels")
    for name in ("block_gather", "block_bwd_dq", "block_bwd_dkdv"):
      self.assertIn(f"gsparse_{name}_{variant}", text)


class PublicApiTest(parameterized.TestCase):
  """`implementation=` dispatch through the public functions (Pallas interpreter on CPU)."""

  def test_sparse_gather_pallas_matches_xla_with_residuals(self):
    q, k, v = _inputs(30, 2, 5, 4, 2, 9, 6, 5, jnp.float32)
    q, k, v = (x.reshape(2, 1, *x.shape[1:]) for x in (q, k, v))  # batch dims (2, 1)
    idx = jax.random.randint(jax.random.key(31), (2, 1, 5, 4, 6), -1, 11)  # dups, -1, >= S
    bias = jax.random.normal(jax.random.key(32), idx.shape)
    a = gsparse.sparse_gather_attention(
      q, k, v, idx, bias=bias, return_residuals=True, implementation="xla"
    )
    b = gsparse.sparse_gather_attention(
      q, k, v, idx, bias=bias, return_residuals=True, implementation="pallas"
    )
    _assert_close(b.output, a.output, FWD_TOL[jnp.float32])
    _assert_lse_close(b.logsumexp, a.logsumexp, FWD_TOL[jnp.float32])
    _assert_close(b.weights, a.weights, FWD_TOL[jnp.float32])

  def test_topk_attention_pallas_under_jit_vmap_and_grad(self):
    q, k, v = _inputs(33, 3, 6, 2, 1, 6, 4, 4, jnp.float32)

    def f(impl):
      def one(q, k, v):
        out, stats = gsparse.topk_attention(
          q, k, v, k=3, is_causal=True, implementation=impl, return_stats=True
        )
        return jnp.sum(out**2), (out, stats.error_bound)

      # One compile per implementation: forward, certificate and dq together.
      return jax.jit(jax.vmap(jax.value_and_grad(one, has_aux=True)))(q, k, v)

    (_, (out_x, err_x)), dq_x = f("xla")
    (_, (out_p, err_p)), dq_p = f("pallas")
    _assert_close(out_p, out_x, FWD_TOL[jnp.float32])
    _assert_close(err_p, err_x, FWD_TOL[jnp.float32])
    _assert_close(dq_p, dq_x, GRAD_TOL[jnp.float32])

  def test_block_public_api_pallas_matches_xla(self):
    # Three query blocks, four key blocks (the last one partial); a real GPU
    # kernel tiles powers of two >= 16 only, the interpreter anything.
    bq, bk = (16, 16) if jax.default_backend() == "gpu" else (2, 3)
    q, k, v = _inputs(34, 1, 3 * bq, 2, 2, 3 * bk + 1, 4, 4, jnp.float32)
    bidx = jax.random.randint(jax.random.key(35), (1, 3, 2, 3), -1, 5)  # dups, -1, >= nkb
    kw = dict(block_q=bq, block_k=bk, is_causal=True, return_residuals=True)
    a = block_gather.block_sparse_gather_attention(q, k, v, bidx, implementation="xla", **kw)
    b = block_gather.block_sparse_gather_attention(q, k, v, bidx, implementation="pallas", **kw)
    _assert_close(b.output, a.output, FWD_TOL[jnp.float32])
    _assert_lse_close(b.logsumexp, a.logsumexp, FWD_TOL[jnp.float32])
    ref_out, _ = kernels.block_gather_reference(
      q,
      k,
      v,
      gather.dedup_indices(jnp.where(bidx < 4, bidx, -1), 4),
      block_q=bq,
      block_k=bk,
      scale=0.5,
      is_causal=True,
    )
    _assert_close(a.output, ref_out, FWD_TOL[jnp.float32])

  def test_masked_matches_xla_forward_residuals_and_gradients(self):
    """Dense logits masked to the lists = the gather, with -1, >= S, duplicates, GQA, bias."""
    self._check_masked_matches_xla(jnp.float32)

  @pytest.mark.slow  # the same in bfloat16
  def test_masked_matches_xla_forward_residuals_and_gradients_bfloat16(self):
    self._check_masked_matches_xla(jnp.bfloat16)

  def _check_masked_matches_xla(self, dtype):
    q, k, v = _inputs(36, 2, 5, 4, 2, 9, 6, 5, dtype)
    idx = jax.random.randint(jax.random.key(37), (2, 5, 4, 6), -2, 11)
    idx = idx.at[0, 0, 0].set(-1)  # a query with no key
    bias = jax.random.normal(jax.random.key(38), idx.shape, dtype)

    def run(impl):
      def loss(q, k, v, bias):
        r = gsparse.sparse_gather_attention(
          q, k, v, idx, bias=bias, return_residuals=True, implementation=impl
        )
        return jnp.sum(jnp.sin(r.output.astype(jnp.float32))) + jnp.sum(r.weights**2), r

      (_, res), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))(q, k, v, bias)
      return res, grads

    (a, ga), (b, gb) = run("xla"), run("masked")
    _assert_close(b.output, a.output, FWD_TOL[dtype])
    _assert_lse_close(b.logsumexp, a.logsumexp, FWD_TOL[dtype])
    _assert_close(b.weights, a.weights, FWD_TOL[dtype])
    self.assertTrue(np.all(np.asarray(b.output[0, 0, 0], np.float32) == 0))
    for x, y in zip(gb, ga, strict=True):
      _assert_close(x, y, GRAD_TOL[dtype])

  def test_masked_non_finite_rows_stay_where_they_are_read(self):
    """NaN/inf in an unlisted key or value reaches no output and no gradient (no 0 * NaN)."""
    q, k, v = _inputs(39, 1, 6, 2, 1, 8, 4, 3, jnp.float32)
    idx = jnp.broadcast_to(jnp.array([0, 1, 2]), (1, 6, 2, 3))
    idx = idx.at[0, 0, 0].set(jnp.array([5, 6, 1]))  # only query 0, head 0 reads keys 5, 6
    k = k.at[0, 5, 0, 2].set(jnp.nan)
    v = v.at[0, 6, 0, 1].set(jnp.inf)
    v = v.at[0, 7, 0, 0].set(jnp.nan)  # key 7 is read by nobody
    out = gsparse.sparse_gather_attention(q, k, v, idx, implementation="masked")
    ref = gsparse.sparse_gather_attention(q, k, v, idx, implementation="xla")
    self.assertTrue(np.all(np.isnan(out[0, 0, 0])))  # reads the NaN key: NaN row
    np.testing.assert_allclose(out[0, 1:], ref[0, 1:], atol=2e-5)  # the other queries: finite
    np.testing.assert_allclose(out[0, 0, 1], ref[0, 0, 1], atol=2e-5)
    self.assertTrue(np.all(np.isfinite(out[0, 1:])))

    def loss(q):
      o = gsparse.sparse_gather_attention(q, k, v, idx, implementation="masked")
      return jnp.sum(o[0, 1:])

    self.assertTrue(np.all(np.isfinite(jax.grad(loss)(q))))

  def test_default_token_implementation_on_cpu(self):
    """None picks "masked" for long lists over short key sets, "xla" otherwise."""
    if jax.default_backend() != "cpu":
      self.skipTest("checks the CPU default")
    q = jnp.zeros((2, 64, 4, 8))
    kv = jax.ShapeDtypeStruct((2, 512, 4, 8), jnp.float32)
    self.assertEqual(gather._auto_token_implementation(q, kv, kv, 32), "masked")
    self.assertEqual(gather._auto_token_implementation(q, kv, kv, 31), "xla")  # 16 k < S
    big = jax.ShapeDtypeStruct((8, 4096, 8, 8), jnp.float32)  # 2**28 dense entries
    self.assertEqual(gather._auto_token_implementation(big, big, big, 512), "xla")

  @parameterized.parameters("gpu", "tpu")
  def test_default_on_device_falls_back_where_the_kernel_cannot_run(self, backend):
    """None takes "pallas" on GPU/TPU; "xla" for untileable blocks, float64 or a traced scale."""
    x = jax.ShapeDtypeStruct((1, 4, 2, 8), jnp.float32)
    wide = jax.ShapeDtypeStruct((1, 4, 2, 8), jnp.float64)
    block = functools.partial(block_gather._auto_block_implementation, x, x, x)
    with mock.patch.object(jax, "default_backend", return_value=backend):
      self.assertEqual(block(16, 32, None), "pallas")
      self.assertEqual(block(16, 32, 0.5), "pallas")
      self.assertEqual(block(12, 16, None), "xla")  # no tiling
      self.assertEqual(block(8, 16, None), "xla" if backend == "gpu" else "pallas")
      self.assertEqual(block_gather._auto_block_implementation(x, wide, x, 16, 16, None), "xla")
      self.assertEqual(gather._auto_token_implementation(x, x, x, 4, 0.5), "pallas")
      self.assertEqual(gather._auto_token_implementation(x, x, wide, 4, 0.5), "xla")
      traced = []

      @jax.jit
      def f(scale):
        traced.append(gather._auto_token_implementation(x, x, x, 4, scale))
        traced.append(block(16, 16, scale))
        return scale

      f(0.5)
      self.assertEqual(traced, ["xla", "xla"])

  def test_pallas_weights_are_the_softmax_of_the_slot_logits_at_large_logits(self):
    """Weights sum to one at logits near 1e4, where a float32 lse is off by ~1e-3."""
    q, k, v = _inputs(40, 1, 6, 2, 2, 9, 4, 4, jnp.float32)
    # Every key row the same: each query's 5 listed logits tie near 1e4, so
    # lse = max + log(5), which float32 rounds to a multiple of ~1e-3.
    q = q * 3e3
    k = jnp.broadcast_to(k[:, :1], k.shape)
    idx = jnp.broadcast_to(jnp.arange(5), (1, 6, 2, 5))
    res = gsparse.sparse_gather_attention(
      q, k, v, idx, return_residuals=True, implementation="pallas"
    )
    ref = gsparse.sparse_gather_attention(q, k, v, idx, return_residuals=True, implementation="xla")
    self.assertGreater(float(jnp.max(jnp.abs(res.logsumexp))), 1e3)  # the regime meant
    np.testing.assert_allclose(np.asarray(res.weights).sum(-1), 1.0, atol=2e-6)
    _assert_close(res.weights, ref.weights, dict(atol=2e-6, rtol=0))

  def test_default_implementation_on_cpu_is_xla(self):
    if jax.default_backend() != "cpu":
      self.skipTest("checks the CPU default")
    self.assertEqual(gather.resolve_implementation(None), "xla")
    self.assertEqual(kernels.default_variant(), ("gpu", True))


class ErrorTest(parameterized.TestCase):
  """Bad input raises at trace time, eagerly and under jit."""

  def setUp(self):
    super().setUp()
    self.q, self.k, self.v = _inputs(40, 1, 4, 2, 1, 6, 4, 4, jnp.float32)

  @parameterized.parameters(False, True)
  def test_bad_arguments(self, jit):
    q, k, v = self.q, self.k, self.v
    maybe_jit = (lambda f: jax.jit(f)) if jit else (lambda f: f)
    idx = jnp.zeros((1, 4, 2, 3), jnp.int32)
    cases = [
      (
        ValueError,
        "implementation='triton'",
        lambda q: gsparse.sparse_gather_attention(q, k, v, idx, implementation="triton"),
      ),
      (
        TypeError,
        "integer dtype",
        lambda q: gsparse.sparse_gather_attention(
          q, k, v, idx.astype(jnp.float32), implementation="pallas"
        ),
      ),
      (
        ValueError,
        "at least one key",
        lambda q: gsparse.sparse_gather_attention(q, k, v, idx[..., :0], implementation="pallas"),
      ),
      (
        ValueError,
        "indices must have shape",
        lambda q: gsparse.sparse_gather_attention(q, k, v, idx[:, :3], implementation="pallas"),
      ),
      (
        ValueError,
        "multiple of key/value heads",
        lambda q: gsparse.sparse_gather_attention(
          q[..., :1, :].repeat(3, -2),
          k.repeat(2, -2),
          v.repeat(2, -2),
          jnp.zeros((1, 4, 3, 3), jnp.int32),
          implementation="pallas",
        ),
      ),
      (
        ValueError,
        "block_indices must have shape",
        lambda q: block_gather.block_sparse_gather_attention(
          q, k, v, jnp.zeros((1, 3, 2, 2), jnp.int32), block_q=2, block_k=2, implementation="pallas"
        ),
      ),
      (
        TypeError,
        "block_indices must have an integer dtype",
        lambda q: block_gather.block_sparse_gather_attention(
          q, k, v, jnp.zeros((1, 2, 2, 2)), block_q=2, block_k=2
        ),
      ),
      (
        ValueError,
        "block_k=0",
        lambda q: block_gather.block_sparse_gather_attention(
          q, k, v, jnp.zeros((1, 2, 2, 2), jnp.int32), block_q=2, block_k=0
        ),
      ),
    ]
    for exc, msg, fn in cases:
      with self.assertRaisesRegex(exc, msg):
        maybe_jit(fn)(q)

  def test_traced_scale_rejected_by_pallas(self):
    q, k, v = self.q, self.k, self.v
    idx = jnp.zeros((1, 4, 2, 3), jnp.int32)
    f = jax.jit(
      lambda s: gsparse.sparse_gather_attention(q, k, v, idx, scale=s, implementation="pallas")
    )
    with self.assertRaisesRegex(TypeError, "scale known at trace time"):
      f(0.5)

  def test_device_block_sizes_checked_before_lowering(self):
    q, k, v = self.q, self.k, self.v
    bidx = jnp.zeros((1, 1, 2, 1), jnp.int32)
    for variant, msg in (("gpu", "power of two >= 16"), ("tpu", "multiple of 8")):
      with self.assertRaisesRegex(ValueError, f"block_q=4 must be a {msg}"):
        kernels.block_gather_attention(
          q, k, v, bidx, block_q=4, block_k=16, scale=1.0, variant=variant, interpret=False
        )

  def test_block_sizes_validated(self):
    with self.assertRaisesRegex(ValueError, "block_slots=3 must be a power of two"):
      kernels.BlockSizes(block_slots=3)
    with self.assertRaisesRegex(ValueError, "block_q=0 must be a positive int"):
      kernels.BlockSizes(block_q=0)
    with self.assertRaisesRegex(ValueError, "variant='cpu'"):
      kernels.token_gather_attention(
        self.q, self.k, self.v, jnp.zeros((1, 4, 2, 3), jnp.int32), scale=1.0, variant="cpu"
      )


if __name__ == "__main__":
  pytest.main([__file__, "-q"])
