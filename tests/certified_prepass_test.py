"""`CertifiedK` without its pre-pass: the exact selections carry their kept logits.

`gsparse.flax.certified.certified_subset` reads the kept weights from
`SelectionResult.kept_logits` where a selection carries them ("full", "exact",
"auto", `FusedExactSelection`) and runs a stop-gradient gather pass otherwise.
These tests check that the two ways agree (the gather pass is the reference,
run on the same selection with its kept logits removed), that the kept logits
are the logits a dense reference computes, and that the certified call of an
exact selection has one gather pass less than before.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse
import gsparse.topk as _topk
from gsparse.flax import CertifiedK, FixedK, sparse_attention
from gsparse.flax.certified import certified_subset
from gsparse.selection import ExactSelection, FusedExactSelection, gather_bias

B, T, S, N, KH, H = 2, 24, 32, 4, 2, 8
POLICY = CertifiedK(ks=(2, 4, 8, 16), tol=0.1)
SELECTIONS = {
  "full": "full",
  "auto": "auto",
  "native": ExactSelection(query_chunk=8),  # key_block None: the native CPU top-k
  "blocks": ExactSelection(query_chunk=8, key_block=4, search_steps=3),  # two-stage search
  "fused": FusedExactSelection(interpret=True),  # GPU/TPU "auto", Pallas interpreter here
}


def _inputs(seed):
  """GQA inputs with a bias (one all -inf row), a mask (one fully masked row)
  and a NaN key entry in batch element 1 (the rows that keep it are NaN)."""
  kq, kk, kv, kb = jax.random.split(jax.random.key(seed), 4)
  q = 2.0 * jax.random.normal(kq, (B, T, N, H))
  k = jax.random.normal(kk, (B, S, KH, H)).at[1, 5, 0, 3].set(jnp.nan)
  v = jax.random.normal(kv, (B, S, KH, H))
  bias = jax.random.normal(kb, (B, N, T, S)).at[0, 1, 3, :].set(-jnp.inf)
  mask = jnp.ones((B, N, T, S), bool).at[1, 2, 7, :].set(False).at[0, :, 10, 20:].set(False)
  return q, k, v, bias, mask


def _both(sel_cfg, q, k, v, bias, mask, *, is_causal):
  """`certified_subset` with the kept logits and with the gather pass (reference)."""
  sel = _topk.select_keys(
    q, k, v, bias, mask, k=16, selection=sel_cfg, is_causal=is_causal,
    row_logsumexp=True, kept_logits=True,
  )  # fmt: skip
  run = lambda s: certified_subset(
    s, q, k, v, bias, policy=POLICY, scale=None, precision=None, selection=sel_cfg
  )
  return sel, run(sel), run(sel._replace(kept_logits=None))


@pytest.mark.parametrize(
  "name,causal",
  [("full", False), ("auto", True), ("native", False), ("blocks", True), ("fused", True)],
)
def test_certified_with_and_without_prepass_agree(name, causal):
  q, k, v, bias, mask = _inputs(0)
  sel, (idx, num, tail), (idx0, num0, tail0) = jax.jit(
    lambda *a: _both(SELECTIONS[name], *a, is_causal=causal)
  )(q, k, v, bias, mask)
  assert sel.kept_logits is not None
  np.testing.assert_array_equal(idx, idx0)
  np.testing.assert_array_equal(num, num0)
  np.testing.assert_allclose(tail, tail0, atol=2e-6, rtol=0)  # NaN rows equal too
  # The NaN key makes rows NaN; the -inf bias row and the masked row are empty:
  # bound 0, smallest candidate, no index.
  assert bool(jnp.isnan(tail[1]).any()) and not bool(jnp.isnan(tail[0]).any())
  for b, t, n in ((0, 3, 1), (1, 7, 2)):
    assert tail[b, t, n] == 0 and num[b, t, n] == 2 and bool((idx[b, t, n] == -1).all())
  # A real choice of k: several candidates chosen; below k_max the tolerance holds.
  assert len(np.unique(np.asarray(num))) >= 3
  assert float(jnp.nanmax(jnp.where(num < 16, tail, 0.0))) <= POLICY.tol


def test_kept_logits_equal_dense_reference_logits():
  """The kept logits of every exact route (fused kernel in the Pallas
  interpreter included) against logits computed here in float64 NumPy."""
  q, k, v, bias, mask = _inputs(1)
  k = k.at[1, 5, 0, 3].set(0.0)  # finite: compare values
  qn, kn, bn = (np.asarray(x, np.float64) for x in (q, k, bias))
  dense = np.einsum("btnh,bsnh->bnts", qn, np.repeat(kn, N // KH, axis=2)) / np.sqrt(H) + bn
  for cfg in SELECTIONS.values():
    sel = _topk.select_keys(
      q, k, v, bias, mask, k=16, selection=cfg, is_causal=True, kept_logits=True
    )
    idx = np.asarray(sel.indices)
    ok = idx >= 0
    want = np.take_along_axis(np.moveaxis(dense, 1, 2), np.where(ok, idx, 0), axis=-1)
    got = np.asarray(sel.kept_logits)
    assert np.all(got[~ok] == -np.inf), cfg
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5, atol=1e-5, err_msg=str(cfg))
    assert sel.row_logsumexp is None  # only what was asked for


def test_only_exact_selections_carry_kept_logits():
  q, k, v, _, _ = _inputs(2)
  q, k, v = q[0, :8], k[0, :8], v[0, :8]
  run = jax.jit(_topk.select_keys, static_argnames=("k", "selection", "kept_logits"))
  assert run(q, k, v, k=4, selection="block", kept_logits=True).kept_logits is None
  assert run(q, k, v, k=4, selection="full").kept_logits is None  # not asked for
  with pytest.raises(TypeError, match="kept_logits"):
    _topk.select_keys(q, k, v, k=8, kept_logits=1)


def _count(jaxpr, pred) -> int:
  """Equations of `jaxpr` (sub-jaxprs included) for which `pred(eqn)` holds."""
  n = 0
  for eqn in jaxpr.eqns:
    n += bool(pred(eqn))
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          n += _count(sub.jaxpr, pred)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          n += _count(sub, pred)
  return n


@pytest.mark.parametrize("impl", ["xla", "masked"])
def test_exact_certified_call_has_no_gather_prepass(impl):
  """On the jaxpr: with an exact selection the certified call runs the same
  matmuls as a fixed-k call with residuals (selection + one gather pass); the
  old code ran a second gather pass (its `dot_general`s and, with "masked",
  a second `sparse_gather_attention_masked`). "block" still has the pre-pass."""
  q, k, v, _, _ = _inputs(3)

  def counts(policy, selection):
    fn = lambda q, k, v: sparse_attention(
      q, k, v, policy=policy, return_residuals=True,
      topk_kwargs=dict(selection=selection, implementation=impl),
    )  # fmt: skip
    jpr = jax.make_jaxpr(fn)(q, k, v).jaxpr
    dots = _count(jpr, lambda e: e.primitive.name == "dot_general")
    masked = _count(jpr, lambda e: e.params.get("name") == "sparse_gather_attention_masked")
    return dots, masked

  for selection in ("auto", "full", ExactSelection(query_chunk=8, key_block=4)):
    assert counts(POLICY, selection) == counts(FixedK(16), selection), selection
  dots, masked = counts(POLICY, "block")
  dots_fixed, masked_fixed = counts(FixedK(16), "block")
  assert dots > dots_fixed and masked == masked_fixed + (impl == "masked")


def test_jit_vmap_grad_through_the_final_pass():
  """Under jit: vmap equals the batched call, and the gradient is that
  of the gather over the certified indices (the selection and the
  certificate are constants), for "exact" with kept logits."""
  q, k, v, bias, _ = _inputs(4)
  k = k.at[1, 5, 0, 3].set(0.0)
  cfg = ExactSelection(query_chunk=8, key_block=4)
  run = lambda q, k, v, b: sparse_attention(
    q, k, v, b, policy=POLICY, is_causal=True, return_residuals=True,
    topk_kwargs=dict(selection=cfg),
  )  # fmt: skip
  res = jax.jit(run)(q, k, v, bias)
  mapped = jax.jit(jax.vmap(run))(q, k, v, bias)
  np.testing.assert_array_equal(mapped.indices, res.indices)
  np.testing.assert_allclose(mapped.output, res.output, atol=1e-6)
  np.testing.assert_allclose(mapped.tail_mass_bound, res.tail_mass_bound, atol=1e-6)

  cot = jax.random.normal(jax.random.key(5), res.output.shape)
  loss = lambda q, k, v, b: jnp.vdot(run(q, k, v, b).output, cot)
  idx = res.indices

  def ref_loss(q, k, v, b):
    out = gsparse.sparse_gather_attention(
      q, k, v, idx, bias=gather_bias(b, idx, S), assume_unique=True, implementation="xla"
    )
    return jnp.vdot(out, cot)

  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
  want = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)
  assert float(jnp.abs(got[0]).max()) > 0
