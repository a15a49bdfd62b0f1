"""`TopKStats.tail_mass_bound` of the exact selections: min(single gap, band count).

The reference is the float64 dense softmax, written in NumPy from the
definition (`tests.tail_mass_test._tail_reference` for the masked rows, a
sorted log-sum-exp for the collapsed ones): nothing here is computed by the
code under test. Every check is deterministic (fixed seeds), so none has a
false-failure rate.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse
from gsparse.selection import ExactSelection
from tests.tail_mass_test import TOPK, _inputs, _tail_reference

# "auto" is the chunked exact route on CPU; the small ExactSelection runs the
# two-stage block search and causal groups on the small shapes.
_ROUTES = ["auto", "full", "exact", ExactSelection(query_chunk=8, key_block=4, causal_groups=3)]


def _lse(a):
  top = a.max(-1, keepdims=True)
  return top[..., 0] + np.log(np.exp(a - top).sum(-1))


def _collapsed_rows(tau, *, t=32, s=512, n=4, h=16):
  """Queries of unit norm and Gaussian keys, logits `tau * g_j`, `g_j ~ N(0, 1)`
  given the query; at tau = 16 (far above sqrt(2 ln s) = 3.5, the collapsed
  phase) the logits below s_(k+1) are far below it."""
  keys = jax.random.split(jax.random.key(19), 3)
  q = jax.random.normal(keys[0], (t, n, h))
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  return q, jax.random.normal(keys[1], (s, n, h)), jax.random.normal(keys[2], (s, n, 4))


def _collapsed_tails(q, key, tau, k):
  """`([T, N] float64 tail of the top-k, [T, N] single-gap certificate)`."""
  lg = np.einsum("tnh,snh->nts", np.float64(q), np.float64(key)) * tau
  srt = -np.sort(-lg, axis=-1)
  head, rest = _lse(srt[..., :k]), _lse(srt[..., k:])
  tail = 1.0 / (1.0 + np.exp(head - rest))
  single = 1.0 / (1.0 + np.exp(head - np.log(lg.shape[-1] - k) - srt[..., k]))
  return tail.T, single.T


def test_band_certificate_is_tight_in_collapsed_rows():
  """128 collapsed rows per route: the certificate is valid and at most 10x
  the float64 tail (measured 1.002-1.167), where the single gap (main's
  certificate before the band counts) is over 100x in median (measured 207,
  max 492)."""
  tau, k = 16.0, 8
  q, key, v = _collapsed_rows(tau)
  tail, single = _collapsed_tails(q, key, tau, k)
  assert np.median(single / tail) > 100  # the rows are collapsed: the single gap is loose
  for route in _ROUTES[:3]:
    _, st = jax.jit(
      lambda q, key, v, route=route: gsparse.topk_attention(
        q, key, v, k=k, scale=tau, selection=route, return_stats=True
      )
    )(q, key, v)
    bound = np.asarray(st.tail_mass_bound, np.float64)
    slack = bound / tail
    assert slack.min() >= 1 - 1e-4, (route, slack.min())  # valid (float32 logits)
    assert slack.max() <= 10, (route, slack.max())


def _single_gap(q, k, v, bias, mask, route, is_causal):
  """The single-gap certificate of the same selection (no band counts)."""
  sel = gsparse.topk.select_keys(q, k, v, bias, mask, k=TOPK, selection=route, is_causal=is_causal)
  _, st = gsparse.topk_attention(
    q, k, v, bias, mask, k=TOPK, selection=route, is_causal=is_causal, return_stats=True
  )
  return gsparse.topk.selection_tail_bound(sel, st.logsumexp), st


@pytest.mark.parametrize("is_causal", [False, True])
def test_valid_on_masked_rows_every_exact_route(is_causal):
  """Random and adversarial rows (a fully masked row, a row of -inf bias, a
  NaN logit, rows with fewer keys than k under causality): on every exact
  route the bound is >= the float64 tail, NaN exactly where the single gap
  is NaN, 0 where it is 0, and never above it."""
  q, k, v, bias, mask = _inputs(0)
  want = _tail_reference(q, k, bias, mask, is_causal=is_causal, topk=TOPK)
  for route in (_ROUTES[0], _ROUTES[1], _ROUTES[3]):  # "exact" is "auto"'s class
    single, st = jax.jit(
      lambda q, k, v, b, m, route=route: _single_gap(q, k, v, b, m, route, is_causal)
    )(q, k, v, bias, mask)
    bound, single = np.asarray(st.tail_mass_bound, np.float64), np.asarray(single)
    np.testing.assert_array_equal(np.isnan(bound), np.isnan(want), err_msg=str(route))
    np.testing.assert_array_equal(np.isnan(bound), np.isnan(single), err_msg=str(route))
    fin = ~np.isnan(want)
    assert (bound[fin] >= want[fin] * (1 - 1e-5) - 1e-7).all(), route
    assert (bound[fin] <= single[fin]).all() and (bound[single == 0] == 0).all(), route
    assert (bound[fin] < single[fin] * 0.9).any(), route  # the bands do tighten some rows


def test_valid_under_index_ranges_and_ties():
  """Sequence lengths, a local window and segment ids (never a dense mask on
  the chunked route), against the float64 reference with the same rules as a
  mask; plus tied logits (a zero query row: every key at the same logit, so
  s_(k+1) ties the kept ones) and a row of huge logit gaps."""
  q, k, v, bias, _ = _inputs(3)
  bias = jnp.nan_to_num(bias, nan=0.0)  # NaN rows are test_valid_on_masked_rows'
  t, s = q.shape[0], k.shape[0]
  q = q.at[2].set(0.0)  # ties: every logit of row 2 is its bias
  bias = bias.at[:, 2].set(0.0).at[:, 4].multiply(1e3)  # row 4: gaps of thousands of nats
  kv_len, window = 33, (6, 3)
  seg = jnp.asarray(np.arange(max(t, s)) // 13)
  rows, cols = np.arange(t)[:, None], np.arange(s)[None, :]
  dense = (cols < kv_len) & (rows - cols <= window[0]) & (cols - rows <= window[1])
  dense &= np.asarray(seg[:t])[:, None] == np.asarray(seg[:s])[None, :]
  want = _tail_reference(q, k, bias, np.broadcast_to(dense, bias.shape), is_causal=False, topk=TOPK)
  ranges = dict(
    key_value_seq_lengths=jnp.asarray(kv_len),
    local_window_size=window,
    segment_ids=gsparse.SegmentIds(seg[:t], seg[:s]),
  )
  for route in ("auto", "full"):
    _, st = jax.jit(
      lambda q, k, v, b, route=route: gsparse.topk_attention(
        q, k, v, b, k=TOPK, selection=route, return_stats=True, **ranges
      )
    )(q, k, v, bias)
    bound = np.asarray(st.tail_mass_bound, np.float64)
    assert not np.isnan(want).any() and (want > 1e-3).sum() > t
    assert (bound >= want * (1 - 1e-5) - 1e-7).all(), route
    np.testing.assert_array_equal(bound[want == 0], 0.0)


def _has_scatter_add(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scatter-add":
      return True
    if any(_has_scatter_add(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params)):
      return True
  return False


@pytest.mark.parametrize("selection", ["full", "auto"])
def test_no_stats_no_band_pass(selection):
  """Without `return_stats` the band histogram (a scatter-add over the row)
  is not in the program; with it, it is. The gather is "xla" (no scatter-add
  in the forward of either route otherwise)."""
  q, k, v, _, _ = _inputs(2)

  def f(stats):
    return jax.make_jaxpr(
      lambda q, k, v: gsparse.topk_attention(
        q, k, v, k=TOPK, selection=selection, return_stats=stats, implementation="xla"
      )
    )(q, k, v).jaxpr

  assert not _has_scatter_add(f(False))
  assert _has_scatter_add(f(True))


def test_stats_under_jit_vmap_grad():
  """`return_stats=True` under vmap (a batch of 2) gives the per-element
  bounds, and grad of the output still runs with the stats requested."""
  q, k, v, _, _ = _inputs(4)
  qb, kb, vb = (jnp.stack([x, x[::-1]]) for x in (q, k, v))

  def run(q, k, v):
    return gsparse.topk_attention(q, k, v, k=TOPK, return_stats=True)

  _, batched = jax.jit(jax.vmap(run))(qb, kb, vb)
  for i in range(2):
    _, one = run(qb[i], kb[i], vb[i])
    np.testing.assert_allclose(batched.tail_mass_bound[i], one.tail_mass_bound, rtol=1e-5)

  def loss(q):
    out, st = run(q, k, v)
    return jnp.sum(out) + jnp.sum(jax.lax.stop_gradient(st.tail_mass_bound))

  g = jax.jit(jax.grad(loss))(q)
  assert g.shape == q.shape and bool(jnp.all(jnp.isfinite(g)))


def test_flax_residuals_carry_the_band_certificate():
  """`gsparse.flax.sparse_attention(..., return_residuals=True)` (fixed k) reports
  the same tight certificate on the collapsed rows (single gap: 492x max)."""
  from gsparse.flax import sparse_attention

  tau, k = 16.0, 8
  q, key, v = _collapsed_rows(tau, t=8)
  tail, _ = _collapsed_tails(q, key, tau, k)
  res = jax.jit(
    lambda q, key, v: sparse_attention(q, key, v, policy=k, scale=tau, return_residuals=True)
  )(q, key, v)
  slack = np.asarray(res.tail_mass_bound, np.float64) / tail
  assert slack.min() >= 1 - 1e-4 and slack.max() <= 10, (slack.min(), slack.max())
