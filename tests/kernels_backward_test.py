"""Tests of the Pallas backward of the sparse-gather kernels (issue 16, items 4 and 5).

`gsparse.kernels.token_bwd` and `gsparse.kernels.block_bwd` must give the same
dq, dk, dv (and dbias) as the XLA backward `gather_backward_xla`, which stays
the reference: these tests differentiate one forward kernel twice, once with
`backward="pallas"` and once with `backward="xla"`, and compare (float32
tolerance). The inputs have masked slots (`-1`), out-of-range and duplicate
raw indices (de-duplicated), a fully masked query, causal masking, a bias,
GQA, head sizes and T / S that are not multiples of the tiles, and cotangents
on every output (out, log-sum-exp, slot logits). `check_grads` checks the
Pallas backward against finite differences, and the public routes run the
non-finite table of docs/errors.md (tests/numerics_test.py) with it.

`GpuBackwardTest` runs the Triton variant compiled on a GPU and in the Pallas
interpreter elsewhere; `TpuBackwardTest` the Mosaic variant on a TPU or in the
TPU interpreter. The lowering for "cuda" and "tpu" from the CPU host is in
tests/kernels_test.py (`LoweringTest`, which now counts the backward kernels).
"""

import functools

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.experimental.pallas import tpu as pltpu
from jax.test_util import check_grads

from gsparse import gather, kernels
from gsparse.kernels.backward import gather_backward_xla, slot_positions
from gsparse.kernels.block_bwd import block_backward_pallas
from gsparse.kernels.token_bwd import token_backward_pallas
from tests import numerics_test

SCALE = 0.37
TOL = dict(atol=2e-5, rtol=2e-5)
# bfloat16 inputs: the Triton block kernels round p and ds to bfloat16 before
# their products (as flash attention does), the XLA backward does not.
TOL_BF16 = dict(atol=3e-2, rtol=3e-2)


def _inputs(seed, b, t, n, kh, s, h, hv):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(ks[0], (b, t, n, h)),
    jax.random.normal(ks[1], (b, s, kh, h)),
    jax.random.normal(ks[2], (b, s, kh, hv)),
  )


def _token_case(seed, b, t, n, kh, s, h, hv, kk):
  """Inputs, de-duplicated indices (masked, out of range, duplicates), a fully masked query."""
  q, k, v = _inputs(seed, b, t, n, kh, s, h, hv)
  raw = jax.random.randint(jax.random.key(seed + 1), (b, t, n, kk), -2, s + 2)
  idx = gather.dedup_indices(raw.at[0, 0, 0, :].set(-1), s)
  bias = jax.random.normal(jax.random.key(seed + 2), idx.shape)
  return q, k, v, idx, bias


def _block_case(seed, b, t, n, kh, s, h, hv, bq, bk, nb):
  q, k, v = _inputs(seed, b, t, n, kh, s, h, hv)
  nkb = -(-s // bk)
  raw = jax.random.randint(jax.random.key(seed + 1), (b, -(-t // bq), n, nb), -1, nkb + 1)
  return q, k, v, gather.dedup_indices(raw.at[0, 0, 0, :].set(-1), nkb)


def _finite(x):
  return jnp.where(jnp.isfinite(x), x, 0.0)


class GpuBackwardTest(parameterized.TestCase):
  """The Triton variant: compiled on a GPU, in the Pallas interpreter elsewhere."""

  VARIANT = "gpu"
  # (B, T, N, K, S, H, Hv, k): GQA, T and S not multiples of the tiles.
  TOKEN = (2, 5, 4, 2, 37, 6, 5, 7)
  # (B, T, N, K, S, H, Hv, block_q, block_k, nb)
  BLOCK = (2, 7, 4, 2, 13, 6, 5, 2, 4, 3)

  def setUp(self):
    super().setUp()
    self.interpret = jax.default_backend() != self.VARIANT
    if self.VARIANT == "gpu" and not self.interpret:
      self.TOKEN = (2, 40, 4, 2, 70, 6, 5, 7)  # Triton block tiles
      self.BLOCK = (2, 40, 4, 2, 50, 6, 5, 16, 16, 3)

  def _token(self, backward, idx):
    return functools.partial(
      kernels.token_gather_attention,
      indices=idx,
      scale=SCALE,
      block_sizes=kernels.BlockSizes(block_q=2, block_slots=4),
      variant=self.VARIANT,
      interpret=self.interpret,
      backward=backward,
    )

  def _block(self, backward, bidx, bq, bk):
    return functools.partial(
      kernels.block_gather_attention,
      block_indices=bidx,
      block_q=bq,
      block_k=bk,
      scale=SCALE,
      is_causal=True,
      variant=self.VARIANT,
      interpret=self.interpret,
      backward=backward,
    )

  def test_token_matches_xla_backward(self):
    b, t, n, kh, s, h, hv, kk = self.TOKEN
    q, k, v, idx, bias = _token_case(0, *self.TOKEN)
    out, lse = kernels.sparse_gather_reference(q, k, v, idx, bias, scale=SCALE)
    do, dlse, dlogits = (
      jax.random.normal(jax.random.key(10 + i), x)
      for i, x in enumerate([(b, t, n, hv), (b, t, n), (b, t, n, kk)])
    )
    args = (q, k, v, idx, bias, out, lse, do, dlse, dlogits)
    got = jax.jit(functools.partial(
      token_backward_pallas, scale=SCALE, block_sizes=kernels.BlockSizes(block_q=2, block_slots=4),
      variant=self.VARIANT, interpret=self.interpret,
    ))(*args)  # fmt: skip
    want = jax.jit(functools.partial(gather_backward_xla, block_q=1, scale=SCALE, is_causal=False))(
      *args[:4], idx >= 0, *args[4:5], *args[6:]
    )
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want, strict=True):
      self.assertEqual(g.dtype, w.dtype, name)
      np.testing.assert_allclose(g, w, err_msg=name, **TOL)
    # The query with no key at all has zero gradients.
    np.testing.assert_array_equal(got[0][0, 0, 0], 0.0)
    np.testing.assert_array_equal(got[3][0, 0, 0], 0.0)

  def test_block_matches_xla_backward(self):
    self._check_block(jnp.float32, TOL)

  @pytest.mark.slow  # bfloat16 inputs; float32 runs by default
  def test_block_matches_xla_backward_bfloat16(self):
    self._check_block(jnp.bfloat16, TOL_BF16)

  def _check_block(self, dtype, tol):
    b, t, n, kh, s, h, hv, bq, bk, nb = self.BLOCK
    q, k, v, bidx = _block_case(1, *self.BLOCK)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    tp = bidx.shape[1] * bq
    qp = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))  # whole query blocks, as the VJP
    out, lse = kernels.block_gather_reference(
      qp, k, v, bidx, block_q=bq, block_k=bk, scale=SCALE, is_causal=True
    )
    do = jax.random.normal(jax.random.key(3), out.shape).at[:, t:].set(0.0)
    dlse = jax.random.normal(jax.random.key(4), lse.shape).at[:, t:].set(0.0)
    kw = dict(block_q=bq, scale=SCALE, is_causal=True, num_queries=t)
    got = jax.jit(functools.partial(
      block_backward_pallas, block_k=bk, variant=self.VARIANT, interpret=self.interpret, **kw
    ))(qp, k, v, bidx, out, lse, do, dlse)  # fmt: skip
    pos, valid = slot_positions(bidx, bk, s)
    want = jax.jit(functools.partial(gather_backward_xla, **kw))(
      qp, k, v, pos, valid, None, lse, do, dlse, None
    )
    for name, g, w in zip(("dq", "dk", "dv"), got, want[:3], strict=True):
      self.assertEqual(g.dtype, dtype, name)
      np.testing.assert_allclose(g.astype(jnp.float32), w.astype(jnp.float32), err_msg=name, **tol)
    np.testing.assert_array_equal(got[0][0, :bq, 0], 0.0)  # the fully masked query block
    np.testing.assert_array_equal(got[0][:, t:], 0.0)  # padded queries

  @pytest.mark.slow  # finite differences; the comparisons with the XLA backward run by default
  def test_check_grads(self):
    q, k, v, idx, bias = _token_case(5, 1, 3, 2, 1, 9, 4, 3, 4)
    token = jax.jit(lambda q, k, v, bias: jax.tree.map(
      _finite, self._token("pallas", idx)(q, k, v, bias=bias)
    ))  # fmt: skip
    check_grads(token, (q, k, v, bias), order=1, modes=("rev",), eps=1e-3, atol=2e-2, rtol=2e-2)
    q, k, v, bidx = _block_case(6, 1, 6, 2, 1, 9, 4, 3, 2, 2, 3)
    block = jax.jit(
      lambda q, k, v: jax.tree.map(_finite, self._block("pallas", bidx, 2, 2)(q, k, v))
    )
    check_grads(block, (q, k, v), order=1, modes=("rev",), eps=1e-3, atol=2e-2, rtol=2e-2)


class TpuBackwardTest(GpuBackwardTest):
  """The Mosaic variant: compiled on a TPU, in the TPU interpreter elsewhere.

  The TPU interpreter is slow on CPU: smaller shapes, blocks of 8 (Mosaic tiles).
  """

  VARIANT = "tpu"
  TOKEN = (1, 3, 2, 1, 40, 6, 5, 4)
  BLOCK = (1, 12, 2, 1, 19, 6, 5, 8, 8, 2)

  def setUp(self):
    super().setUp()
    if self.interpret:
      ctx = pltpu.force_tpu_interpret_mode()
      ctx.__enter__()
      self.addCleanup(ctx.__exit__, None, None, None)

  @pytest.mark.slow
  def test_block_matches_xla_backward(self):
    super().test_block_matches_xla_backward()

  @pytest.mark.slow
  def test_check_grads(self):
    super().test_check_grads()


def _primitives(jaxpr) -> set[str]:
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jex.core.jaxprs_in_params(eqn.params):
      names |= _primitives(sub)
  return names


@pytest.mark.parametrize("backward", ["pallas", "xla"])
def test_pallas_backward_has_no_scatter(backward):
  # Determinism by construction: the Pallas backward sums in kernels, in a
  # fixed order, and never scatter-adds (the XLA reference does).
  q, k, v, idx, _ = _token_case(7, 1, 4, 2, 1, 9, 4, 4, 3)
  bidx = jnp.array([[[[0, 1], [1, -1]]]], jnp.int32)

  def loss(q, k, v):
    kw = dict(scale=SCALE, variant="gpu", interpret=True, backward=backward)
    o1 = kernels.token_gather_attention(q, k, v, idx, **kw)[0]
    o2 = kernels.block_gather_attention(q, k, v, bidx, block_q=4, block_k=4, **kw)[0]
    return jnp.sum(o1) + jnp.sum(o2)

  prims = _primitives(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr)
  scatters = {p for p in prims if p.startswith("scatter")}
  if backward == "pallas":
    assert not scatters, scatters
  else:
    assert "scatter-add" in scatters, prims


def test_block_pallas_backward_hides_nan_behind_the_causal_mask():
  # Key 5 is in the diagonal key block of query block 1 (queries 4..7); with
  # T = 5 no real query attends it, so no gradient may see its NaN.
  q, k, v = _inputs(8, 1, 5, 1, 1, 8, 4, 4)
  bidx = jnp.array([[[[0, 1]], [[0, 1]]]], jnp.int32)
  w = jax.random.normal(jax.random.key(9), (1, 5, 1, 4))

  def grads(k, v, backward):
    def loss(q, k, v):
      out, _ = kernels.block_gather_attention(
        q, k, v, bidx, block_q=4, block_k=4, scale=SCALE, is_causal=True,
        variant="gpu", interpret=True, backward=backward,
      )  # fmt: skip
      return jnp.sum(out * w)

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  k_nan, v_nan = k.at[0, 5].set(jnp.nan), v.at[0, 5].set(jnp.nan)
  got = grads(k_nan, v_nan, "pallas")
  ref = grads(k_nan, v_nan, "xla")  # finite: tests/nonfinite_block_test.py
  for name, g, r in zip("qkv", got, ref, strict=True):
    assert np.isfinite(np.asarray(g)).all(), f"d{name} has NaN"
    np.testing.assert_allclose(g, r, err_msg=f"d{name}", **TOL)


def test_backward_argument_is_checked():
  q, k, v, idx, _ = _token_case(11, 1, 2, 1, 1, 4, 2, 2, 2)
  with pytest.raises(ValueError, match="backward="):
    kernels.token_gather_attention(q, k, v, idx, scale=SCALE, interpret=True, backward="cuda")
  with pytest.raises(ValueError, match="backward="):
    kernels.block_gather_attention(
      q, k, v, jnp.zeros((1, 1, 1, 1), jnp.int32), block_q=2, block_k=2, scale=SCALE,
      interpret=True, backward="scatter",
    )  # fmt: skip
  # "auto": the XLA backward in interpret mode (no scatter is the Pallas one).
  assert kernels.resolve_backward("auto", interpret=True) == "xla"
  assert kernels.resolve_backward("auto", interpret=False) == "pallas"


@pytest.fixture
def pallas_backward_in_interpret(monkeypatch):
  """The public routes with the Pallas backward where the kernels run in interpret mode.

  `backward="auto"` picks the XLA backward in interpret mode (CPU); this makes
  it pick the Pallas one. The choice is made when the two jitted kernel entry
  points trace, so their caches are cleared (not all of JAX's: that freed and
  recompiled everything the file had compiled before), and the test fails
  unless the patched choice was made again, i.e. no earlier trace with the
  XLA backward was reused.
  """
  calls = []

  def force(backward, *, interpret):
    calls.append(backward)
    return "pallas"

  entry_points = (kernels.token.token_gather_attention, kernels.block.block_gather_attention)
  for module in (kernels.token, kernels.block):
    monkeypatch.setattr(module, "resolve_backward", force)
  for fn in entry_points:
    fn.clear_cache()
  yield
  for fn in entry_points:
    fn.clear_cache()
  assert calls, "the kernels did not trace again: an earlier trace may have been reused"


@pytest.mark.usefixtures("pallas_backward_in_interpret")
def test_public_route_zero_grads_for_a_row_masked_by_bias():
  numerics_test.test_gather_neg_inf_bias_row_zero_grads("pallas")


@pytest.mark.slow  # the non-finite table through topk_attention: one route, forward and backward
@pytest.mark.usefixtures("pallas_backward_in_interpret")
@pytest.mark.parametrize("selection", ["full", "block"])
def test_public_route_nonfinite_table(selection):
  numerics_test.test_nonfinite_table(selection, "pallas")


@pytest.mark.slow  # two more compiles of each backward; the vmap batching rule of pallas_call
def test_pallas_backward_under_vmap():
  q, k, v, idx, _ = _token_case(12, 2, 3, 2, 1, 11, 4, 3, 4)
  q2, k2, v2, bidx = _block_case(13, 2, 5, 2, 1, 9, 4, 3, 2, 4, 2)

  def loss(backward, q, k, v, idx, q2, k2, v2, bidx):
    kw = dict(scale=SCALE, interpret=True, backward=backward)
    o1 = kernels.token_gather_attention(q[None], k[None], v[None], idx[None], **kw)[0]
    o2 = kernels.block_gather_attention(
      q2[None], k2[None], v2[None], bidx[None], block_q=2, block_k=4, is_causal=True, **kw
    )[0]
    return jnp.sum(o1) + jnp.sum(o2)

  def grads(backward):
    g = jax.grad(functools.partial(loss, backward), argnums=(0, 1, 2, 4, 5, 6))
    return jax.jit(jax.vmap(g))(q, k, v, idx, q2, k2, v2, bidx)

  for name, g, w in zip(("dq", "dk", "dv") * 2, grads("pallas"), grads("xla"), strict=True):
    np.testing.assert_allclose(g, w, err_msg=name, **TOL)
