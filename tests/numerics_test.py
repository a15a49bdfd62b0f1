"""Non-finite and degenerate input: one semantics on every route (docs/errors.md).

`test_nonfinite_table` runs a table of hostile cases, packed as the batch
elements of one input, through every selection x implementation x
eager/jit/vmap route, forward and backward, and checks each against the
float64 NumPy reference of `tests/np_reference.py` (no gsparse code computes
an expectation). The other tests are the regressions of issue 21, items 1-7;
each failed on the code before the fix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse
from gsparse.certificate import kept_set_tail_bound
from gsparse.selection import BlockSelection, LSHSelection
from tests import np_reference as ref

T = S = 4
K = 2
SCALE = 0.5
# Approximate selections small enough to drop keys at S = 4.
SELECTIONS = {
  "full": "full",
  "exact": "exact",
  "block": BlockSelection(block_size=2, num_blocks=1),
  "lsh": LSHSelection(block_size=2),
}
IMPLEMENTATIONS = ("xla", "masked", "pallas")
NINF, PINF, NAN = -np.inf, np.inf, np.nan

# name -> (edits of (q, k, v, bias, mask) as index -> value, rows whose grads are checked)
CASES = {
  "clean": [],
  "nan_query": [("q", (1, 0, 0), NAN)],
  "nan_key": [("k", (2, 0, 1), NAN)],
  "nan_value": [("v", (1, 0, 0), NAN)],
  "nan_bias": [("bias", (0, 1, 3), NAN)],
  "neg_inf_bias_row": [("bias", (0, 1, slice(None)), NINF)],
  "neg_inf_bias_hides_nan_key": [("k", (0, 0, 2), NAN), ("bias", (0, slice(None), 0), NINF)],
  "mask_hides_nan_key": [("k", (3, 0, 0), NAN), ("mask", (0, slice(None), 3), False)],
  "pos_inf_query": [("q", (2, 0, 1), PINF)],
  "pos_inf_bias": [("bias", (0, 3, 0), PINF)],
  "neg_inf_bias_half": [("bias", (0, slice(0, 2), slice(1, 4)), NINF)],
  "pos_inf_value": [("v", (1, 0, 0), PINF)],
  "mixed_inf_values": [("v", (1, 0, 0), PINF), ("v", (2, 0, 0), NINF), ("v", (3, 0, 1), NINF)],
  "mask_hides_inf_value": [("v", (2, 0, 0), PINF), ("mask", (0, slice(0, 2), 2), False)],
  # Row 0 may attend keys 0 and 2 only; each key block holds a NaN key (round 3 of issue 21).
  "mask_hides_nan_key_blocks": [
    ("k", (1, 0, 0), NAN),
    ("k", (3, 0, 0), NAN),
    ("mask", (0, 0, 1), False),
    ("mask", (0, 0, 3), False),
  ],
}
FINITE_CASES = ("clean", "neg_inf_bias_row", "neg_inf_bias_hides_nan_key", "mask_hides_nan_key")


def _table_inputs():
  """`(q [B,T,1,H], k, v, bias [B,1,T,S], mask [B,1,T,S])` float32, one batch element per case."""
  rng = np.random.default_rng(21)
  b = len(CASES)
  x = {
    "q": rng.standard_normal((b, T, 1, 4)),
    "k": rng.standard_normal((b, S, 1, 4)),
    "v": rng.standard_normal((b, S, 1, 2)),
    "bias": 0.1 * rng.standard_normal((b, 1, T, S)),
    "mask": np.ones((b, 1, T, S), bool),
  }
  for i, edits in enumerate(CASES.values()):
    for name, where, val in edits:
      x[name][i][where] = val
  return tuple(
    x[n].astype(np.float32) if n != "mask" else x[n] for n in ("q", "k", "v", "bias", "mask")
  )


def _route(selection, implementation):
  """One jitted program: the route's forward and backward, and its forward under vmap."""
  sel = SELECTIONS[selection]

  def f(q, k, v, bias, mask):
    return gsparse.topk_attention(
      q,
      k,
      v,
      bias,
      mask,
      k=K,
      scale=SCALE,
      selection=sel,
      selection_key=jax.random.key(0),
      implementation=implementation,
      return_stats=True,
    )

  def loss(q, k, v, bias, mask, cot):
    out, stats = f(q, k, v, bias, mask)
    return jnp.sum(cot * out), (out, stats)

  def program(q, k, v, bias, mask, cot):
    (_, fwd), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
      q, k, v, bias, mask, cot
    )
    return fwd, grads, jax.vmap(f)(q, k, v, bias, mask)

  return f, jax.jit(program)


def _kept_mask(indices, s=S):
  return ref.kept_from_indices(indices, s)


def _check_against_reference(out, stats, inputs, selection):
  q, k, v, bias, mask = inputs
  exact = selection in ("full", "exact")
  kept, r = ref.check_topk_route(
    out, stats, q, k, v, topk=K, exact=exact, scale=SCALE, bias=bias, mask=mask
  )
  if exact:  # the very kept set of the reference's exact top-k (NaN rows: any tie order)
    defined = ~np.swapaxes(r.nan_row, -1, -2)  # [..., N, T], the kept set's layout
    want = ref.topk_reference(q, k, v, topk=K, scale=SCALE, bias=bias, mask=mask).kept
    np.testing.assert_array_equal(kept[defined], want[defined])
  return kept


@pytest.mark.slow
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_nonfinite_table(selection, implementation):
  """Every case of CASES on one route under jit and jit(vmap), forward and backward.

  The eager run of the same route is `test_nonfinite_table_eager` (op by op
  it costs seconds per route, so it runs on the default route only).
  """
  inputs = _table_inputs()
  q, k, v, bias, mask = inputs
  finite = np.array([name in FINITE_CASES for name in CASES])
  cot = np.random.default_rng(1).standard_normal((len(CASES), T, 1, 2)).astype(np.float32)
  _, program = _route(selection, implementation)
  (out, stats), grads, (vout, vstats) = program(*inputs, cot)
  kept = _check_against_reference(out, stats, inputs, selection)
  np.testing.assert_array_equal(_check_against_reference(vout, vstats, inputs, selection), kept)
  want = ref.topk_grads(
    q[finite],
    k[finite],
    v[finite],
    cot[finite],
    kept=kept[finite],
    scale=SCALE,
    bias=bias[finite],
    mask=mask[finite],
  )
  for got, exp in zip(grads, want, strict=True):
    got = np.asarray(got)[finite]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("selection", ["full", "exact"])
def test_nonfinite_table_eager(selection):
  """The table eagerly (op by op) on the default implementation."""
  inputs = _table_inputs()
  f, _ = _route(selection, None)
  _check_against_reference(*f(*inputs), inputs, selection)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gather_neg_inf_bias_row_zero_grads(implementation):
  """Issue 21 item 2: a slot row masked only by -inf biases: zero output and zero grads."""
  q, k, v = jax.random.normal(jax.random.key(2), (3, 4, 1, 4))
  idx = jnp.broadcast_to(jnp.array([0, 1], jnp.int32), (4, 1, 2))
  bias = jnp.zeros((4, 1, 2)).at[1].set(-jnp.inf)

  def loss(q, k, v):
    out = gsparse.sparse_gather_attention(q, k, v, idx, bias=bias, implementation=implementation)
    return jnp.sum(out[1]), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  assert np.all(np.asarray(out[1]) == 0)
  for g in grads:
    assert np.all(np.asarray(g) == 0), "row 1 reads nothing: its loss has zero gradient"


def test_lsh_certificate_negative_scale():
  """Issue 21 item 3: the LSH cap on unscored keys bounds them for scale < 0."""
  q, k, v = jax.random.normal(jax.random.key(3), (3, 32, 1, 8))
  f = jax.jit(
    lambda q, k, v: gsparse.topk_attention(
      q,
      k,
      v,
      k=4,
      scale=-1.0,
      selection=LSHSelection(block_size=4),
      selection_key=jax.random.key(1),
      return_stats=True,
    )
  )
  _, stats = f(q, k, v)
  r = ref.topk_reference(q, k, v, kept=_kept_mask(stats.indices, 32), scale=-1.0)
  assert (r.tail > 0.5).sum() > 10  # the case bites: most rows drop real mass
  tail = np.asarray(stats.tail_mass_bound)
  assert (tail >= r.tail - 1e-6).all(), f"{np.sum(tail < r.tail - 1e-6)} rows violate the bound"


EMPTY_SHAPES = {
  "T=0": ((0, 1, 4), (4, 1, 4), (4, 1, 3)),
  "Hv=0": ((3, 1, 4), (4, 1, 4), (4, 1, 0)),
  "batch=0": ((0, 3, 1, 4), (0, 4, 1, 4), (0, 4, 1, 3)),
}


@pytest.mark.parametrize("shapes", list(EMPTY_SHAPES), ids=list(EMPTY_SHAPES))
def test_empty_shapes_every_route(shapes):
  """Issue 21 item 5: empty inputs give the dense reference's empty result on every route.

  The crashes were at trace time, so every route is traced (`jax.eval_shape`,
  no run); the Pallas route, the one that crashed for every shape, also runs.
  """
  q, k, v = (jnp.ones(s) for s in EMPTY_SHAPES[shapes])
  want = ref.attention(q, k, v)
  for sel in SELECTIONS.values():
    for impl in IMPLEMENTATIONS:
      out, stats = jax.eval_shape(
        functools.partial(
          gsparse.topk_attention,
          k=2,
          selection=sel,
          implementation=impl,
          selection_key=jax.random.key(0),
          return_stats=True,
        ),
        q,
        k,
        v,
      )
      assert out.shape == want.shape and stats.tail_mass_bound.shape == want.shape[:-1]
  out = gsparse.topk_attention(q, k, v, k=2, implementation="pallas")
  np.testing.assert_array_equal(np.asarray(out), want)
  idx = jnp.zeros((*q.shape[:-1], 2), jnp.int32)
  out = gsparse.sparse_gather_attention(q, k, v, idx, implementation="pallas")
  np.testing.assert_array_equal(np.asarray(out), want)
  bidx = jnp.zeros((*q.shape[:-3], -(-q.shape[-3] // 16), 1, 1), jnp.int32)
  out = gsparse.block_sparse_gather_attention(
    q, k, v, bidx, block_q=16, block_k=16, implementation="pallas"
  )
  assert out.shape == want.shape


def test_head_dim_zero_is_one_error():
  """Issue 21 item 5: H = 0 is one ValueError naming head_dim, for dense and every route."""
  q, k, v = jnp.ones((3, 1, 0)), jnp.ones((4, 1, 0)), jnp.ones((4, 1, 2))
  with pytest.raises(ValueError, match="head_dim >= 1"):
    gsparse.dot_product_attention(q, k, v)
  for sel in SELECTIONS.values():
    with pytest.raises(ValueError, match="head_dim >= 1"):
      gsparse.topk_attention(q, k, v, k=2, selection=sel, selection_key=jax.random.key(0))


@pytest.mark.parametrize("selection", ["full", "exact"])
def test_huge_k_is_clipped(selection):
  """Issue 21 item 6: k far above S is clipped to S (dense attention), no huge allocation."""
  q, kk, v = jax.random.normal(jax.random.key(4), (3, 6, 1, 4))
  for k in (2**31, 10**12):  # traced only: the shapes show that nothing of size k exists
    out, stats = jax.eval_shape(
      functools.partial(gsparse.topk_attention, k=k, selection=selection, return_stats=True),
      q,
      kk,
      v,
    )
    assert stats.indices.shape == (6, 1, 6)
  out, stats = jax.jit(
    functools.partial(gsparse.topk_attention, k=2**31, selection=selection, return_stats=True)
  )(q, kk, v)
  np.testing.assert_allclose(np.asarray(out), ref.attention(q, kk, v), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(stats.tail_mass_bound), 0.0)


def test_kept_set_tail_bound_lemma():
  """The lemma on hand-made rows: the bound holds for any kept set, and the edge cases."""
  rng = np.random.default_rng(5)
  for _ in range(50):
    s = rng.standard_normal(12) * rng.choice([1.0, 30.0])
    kept = rng.random(12) < 0.5
    kept[0] = True
    lse = np.log(np.exp(s[kept]).sum())
    u = s[~kept].max() if (~kept).any() else -np.inf
    t = np.exp(s[~kept]).sum() / np.exp(s).sum()
    assert float(kept_set_tail_bound(lse, u, int((~kept).sum()))) >= t - 1e-6
  got = np.asarray(
    kept_set_tail_bound(
      jnp.array([0.0, -jnp.inf, 0.0, jnp.nan, 0.0, -jnp.inf, jnp.inf]),
      jnp.array([-jnp.inf, 0.0, jnp.inf, 0.0, jnp.nan, -jnp.inf, 0.0]),
      jnp.array([3, 2, 1, 0, 1, 0, 1]),
    )
  )
  np.testing.assert_array_equal(got[:3], [0.0, 1.0, 1.0])
  assert np.isnan(got[3]) and np.isnan(got[4]) and got[5] == 0.0 and np.isnan(got[6])
  np.testing.assert_allclose(float(kept_set_tail_bound(0.0, 0.0, 3)), 0.75, rtol=1e-6)


def test_error_bound_nan_only_for_rows_that_may_attend_a_nonfinite_value():
  """Issue 21 round 3: one `-inf` value used to make `error_bound` NaN for the
  whole head; now only the rows that may attend it (GQA, causal, a per-head
  mask hiding it from head 1) are NaN, the rest finite and valid (float64)."""
  rng = np.random.default_rng(5)
  q = rng.standard_normal((1, 6, 2, 4)).astype(np.float32)
  k = rng.standard_normal((1, 6, 1, 4)).astype(np.float32)
  v = rng.standard_normal((1, 6, 1, 3)).astype(np.float32)
  v[0, 3, 0, 1] = NINF
  mask = np.ones((1, 2, 6, 6), bool)
  mask[0, 1, :, 3] = False
  out, stats = gsparse.topk_attention(
    q, k, v, mask=mask, k=2, scale=SCALE, is_causal=True, selection="exact", return_stats=True
  )
  ref.check_topk_route(
    out, stats, q, k, v, topk=K, exact=True, scale=SCALE, mask=mask, is_causal=True
  )
  err = np.asarray(stats.error_bound)
  np.testing.assert_array_equal(np.isnan(err[0, :, 0]), np.arange(6) >= 3)
  assert np.isfinite(err[0, :, 1]).all()


def test_exact_xla_empty_slot_does_not_read_value_row_zero():
  """Found by the long fuzz profile (issue 21 round 3): on "exact" + xla an
  empty slot (-1) of a row with fewer admissible keys than k read value row 0
  with weight 0, so a NaN there made the row NaN (`0 * NaN`)."""
  rng = np.random.default_rng(8)
  q, k, v = (rng.standard_normal((4, 1, 3)).astype(np.float32) for _ in range(3))
  v[0, 0, 1] = NAN
  mask = np.ones((4, 4), bool)
  mask[:, 0] = False  # no row may attend key 0; row 0 (causal) has no key at all
  out, stats = gsparse.topk_attention(
    q, k, v, mask=mask, k=2, is_causal=True, selection="exact", implementation="xla",
    return_stats=True,
  )  # fmt: skip
  ref.check_topk_route(out, stats, q, k, v, topk=2, exact=True, mask=mask, is_causal=True)
  np.testing.assert_array_equal(out[0], 0.0)
  assert np.isfinite(np.asarray(out)).all()
