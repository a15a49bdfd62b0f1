"""`TopKStats.tail_mass`: the exact dropped softmax mass of the exact selections.

The reference is written here, in float64 NumPy, from the definition: the
softmax mass of the admissible keys outside the row's top-k (ranked on the
float64 logits, ties to the lower index) over the mass of all of them.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse
from gsparse.selection import ExactSelection

T, S, N, K, H, TOPK = 24, 40, 2, 1, 8, 5


def _tail_reference(q, k, bias, mask, *, is_causal, topk):
  """`[T, N]` float64 tail mass of the top-`topk` set (nan: NaN row, 0: empty row)."""
  q, k, bias = (np.asarray(a, np.float64) for a in (q, k, bias))
  kk = np.repeat(k, N // K, axis=1)  # [S, N, H]
  lg = np.einsum("tnh,snh->nts", q, kk) / np.sqrt(H) + bias  # [N, T, S]
  ok = np.broadcast_to(np.asarray(mask), lg.shape).copy()
  if is_causal:
    ok &= np.arange(S)[None, :] <= np.arange(T)[:, None]
  ok &= lg != -np.inf  # a -inf bias is mask=False
  out = np.zeros((T, N))
  for n in range(N):
    for t in range(T):
      row, on = lg[n, t], ok[n, t]
      if np.isnan(row[on]).any():
        out[t, n] = np.nan
        continue
      if not on.any():
        continue
      live = np.flatnonzero(on)
      order = live[np.argsort(-row[live], kind="stable")]  # ties: lower index first
      w = np.exp(row[live] - row[live].max())
      dropped = np.isin(live, order[topk:])
      out[t, n] = w[dropped].sum() / w.sum()
  return out


def _inputs(seed):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (T, N, H)) * 2.0
  k = jax.random.normal(keys[1], (S, K, H))
  v = jax.random.normal(keys[2], (S, K, 3))
  mask = jax.random.bernoulli(keys[3], 0.7, (N, T, S))
  bias = jax.random.normal(keys[4], (N, T, S))
  bias = bias.at[0, 3].set(-jnp.inf)  # row (3, 0): every key at -inf bias
  mask = mask.at[1, 5].set(False)  # row (5, 1): fully masked
  bias = bias.at[1, 7, 2].set(jnp.nan)  # row (7, 1): NaN where admissible (mask set below)
  mask = mask.at[1, 7, 2].set(True)
  return q, k, v, bias, mask


# "auto" is the chunked exact route on CPU (auto_selection_test checks it gives "full"'s stats).
_SELECTIONS = ["full", ExactSelection(query_chunk=8, key_block=4, causal_groups=3)]


@pytest.mark.parametrize("is_causal", [False, True])
def test_tail_mass_matches_float64_reference(is_causal):
  q, k, v, bias, mask = _inputs(0)
  want = _tail_reference(q, k, bias, mask, is_causal=is_causal, topk=TOPK)
  assert np.isnan(want[7, 1]) and want[3, 0] == 0 and want[5, 1] == 0
  assert (want[~np.isnan(want)] > 1e-3).sum() > T  # the tails are not trivially 0
  for sel in _SELECTIONS:
    _, st = jax.jit(
      lambda q, k, v, b, m, sel=sel: gsparse.topk_attention(
        q, k, v, b, m, k=TOPK, is_causal=is_causal, selection=sel, return_stats=True
      )
    )(q, k, v, bias, mask)
    got = np.asarray(st.tail_mass, np.float64)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5, err_msg=str(sel))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    bound = np.asarray(st.tail_mass_bound)
    fin = ~np.isnan(got)
    assert (got[fin] <= bound[fin]).all() and (got[fin] >= 0).all()


def test_tail_mass_is_none_for_approximate_selections():
  q, k, v, _, _ = _inputs(1)
  for sel in ("block", "lsh"):
    _, st = jax.jit(
      lambda q, k, v, sel=sel: gsparse.topk_attention(
        q, k, v, k=TOPK, selection=sel, selection_key=jax.random.key(2), return_stats=True
      )
    )(q, k, v)
    assert st.tail_mass is None
    assert st.tail_mass_bound.shape == (T, N)


def test_exact_tail_mass_edge_cases():
  inf, nan = jnp.inf, jnp.nan
  kept = jnp.array([0.0, -inf, nan, 1.0, inf, 2.0, 0.0])
  row = jnp.array([jnp.log(4.0), -inf, 1.0, nan, inf, 2.0 + 1e-8, jnp.log(2.0)])
  dropped = jnp.array([3, 0, 1, 1, 1, 0, 1])
  got = np.asarray(gsparse.topk.exact_tail_mass(kept, row, dropped))
  np.testing.assert_allclose(got[0], 0.75, rtol=1e-6)
  assert got[1] == 0  # fully masked row
  assert np.isnan(got[2:5]).all()  # NaN on either side; a kept +inf logit
  assert got[5] == 0  # nothing dropped: 0, not rounding
  np.testing.assert_allclose(got[6], 0.5, rtol=1e-6)


def _has_row_reduction(jaxpr, s):
  """Whether some `exp` in `jaxpr` (sub-jaxprs included) reads an operand with S columns."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "exp" and eqn.invars[0].aval.shape[-1:] == (s,):
      return True
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      if _has_row_reduction(sub, s):
        return True
  return False


@pytest.mark.parametrize("selection", ["full", "auto"])
def test_no_stats_no_row_logsumexp(selection):
  """Without `return_stats` no exp runs over a whole row of S logits (the
  exact routes only exponentiate the k kept ones); with it, one does. The
  gather is "xla" ("masked" would exponentiate whole rows by design)."""
  q, k, v, _, _ = _inputs(2)
  assert S not in (T, TOPK, H)

  def f(stats):
    return jax.make_jaxpr(
      lambda q, k, v: gsparse.topk_attention(
        q, k, v, k=TOPK, selection=selection, return_stats=stats, implementation="xla"
      )
    )(q, k, v).jaxpr

  assert not _has_row_reduction(f(False), S)
  assert _has_row_reduction(f(True), S)
