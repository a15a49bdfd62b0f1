"""Top-k attention: keep the k largest logits of every query, renormalise.

Top-k attention is selection (which keys) followed by the sparse gather
(`gsparse.gather.sparse_gather_attention`). Selection is not differentiated
(indices are integers); gradients flow through the gather, exactly as through
dense attention restricted to the kept keys.

Rows with fewer than k admissible keys (masking, causality, short sequences)
keep all their admissible keys; `k >= S` equals dense attention.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
from jax.lax import PrecisionLike
from jax.typing import ArrayLike

from gsparse import _admissible, _checks
from gsparse._admissible import Admissible, SegmentIds
from gsparse._numerics import finish_top_k
from gsparse._numerics import top_k as _top_k
from gsparse.attention import compute_logits, fold_neg_inf_bias
from gsparse.gather import Implementation, resolve_implementation, sparse_gather_attention
from gsparse.selection import (
  AUTO,
  NAMES,
  ExactSelection,
  LSHSelection,
  SelectionConfig,
  SelectionResult,
  auto_selection,
  gather_bias,
  resolve_selection,
  select,
  select_and_attend,
)
from gsparse.selection._bands import dropped_band_counts
from gsparse.selection._common import kept_values, row_logsumexp
from gsparse.topk_stats import (  # noqa: F401  (TopKStats and the stats helpers are re-exported)
  TopKStats,
  _num_kept,
  _value_reach,
  exact_tail_mass,
  selection_exact_tail,
  selection_tail_bound,
  topk_stats,
)

SELECTIONS = NAMES
DEFAULT_SELECTION = AUTO  # resolved once, in `_plan`, by `gsparse.selection.auto_selection`


def select_topk_full(
  logits: jax.Array,
  valid: jax.Array | None,
  k: int,
  *,
  row_lse: bool = False,
  kept_logits: bool = False,
  band_counts: bool = False,
) -> SelectionResult:
  """Exact top-k selection from a materialised `[batch..., N, T, S]` logit matrix.

  Returns indices laid out `[batch..., T, N, min(k, S)]`. Ties are broken
  towards the lower key index (as `jax.lax.top_k`); NaN logits rank first and
  `-inf` logits are never listed (`finish_top_k`, shared by every selection).
  `row_lse` also returns the log-sum-exp of every row (`row_logsumexp`),
  `kept_logits` the kept slots' logits (`SelectionResult.kept_logits`),
  `band_counts` the dropped logits' band counts (`SelectionResult.band_counts`).
  """
  s = logits.shape[-1]
  k = min(k, s)
  masked = logits if valid is None else jnp.where(valid, logits, -jnp.inf)
  vals, idx = _top_k(masked, min(k + 1, s))
  if valid is None:
    num_keys = jnp.full(logits.shape[:-1], s, jnp.int32)
  else:
    num_keys = jnp.sum(valid, axis=-1, dtype=jnp.int32)
  idx, next_logit = finish_top_k(vals, idx, k)
  lse = jnp.swapaxes(row_logsumexp(masked), -2, -1) if row_lse else None
  kept = jnp.swapaxes(kept_values(vals, idx), -3, -2) if kept_logits else None
  bands = None
  if band_counts:
    bands = dropped_band_counts(masked, next_logit, num_keys, jnp.sum(idx >= 0, axis=-1))
    bands = jnp.swapaxes(bands, -3, -2)
  # [..., N, T, *] -> [..., T, N, *]
  return SelectionResult(
    jnp.swapaxes(idx, -3, -2),
    jnp.swapaxes(next_logit, -2, -1),
    jnp.swapaxes(num_keys, -2, -1),
    None,
    lse,
    kept,
    bands,
  )


@overload
def topk_attention(
  query: ArrayLike,
  key: ArrayLike,
  value: ArrayLike,
  bias: ArrayLike | None = None,
  mask: ArrayLike | None = None,
  *,
  k: int,
  scale: float | None = None,
  is_causal: bool = False,
  selection: str | SelectionConfig = DEFAULT_SELECTION,
  selection_key: ArrayLike | None = None,
  return_stats: Literal[False] = False,
  precision: PrecisionLike = None,
  implementation: Implementation | None = None,
  query_seq_lengths: ArrayLike | None = None,
  key_value_seq_lengths: ArrayLike | None = None,
  local_window_size: int | tuple[int, int] | None = None,
  segment_ids: ArrayLike | SegmentIds | None = None,
  return_residual: Literal[False] = False,
) -> jax.Array: ...


@overload
def topk_attention(
  query: ArrayLike,
  key: ArrayLike,
  value: ArrayLike,
  bias: ArrayLike | None = None,
  mask: ArrayLike | None = None,
  *,
  k: int,
  scale: float | None = None,
  is_causal: bool = False,
  selection: str | SelectionConfig = DEFAULT_SELECTION,
  selection_key: ArrayLike | None = None,
  return_stats: Literal[True],
  precision: PrecisionLike = None,
  implementation: Implementation | None = None,
  query_seq_lengths: ArrayLike | None = None,
  key_value_seq_lengths: ArrayLike | None = None,
  local_window_size: int | tuple[int, int] | None = None,
  segment_ids: ArrayLike | SegmentIds | None = None,
  return_residual: Literal[False] = False,
) -> tuple[jax.Array, TopKStats]: ...


@overload
def topk_attention(
  query: ArrayLike,
  key: ArrayLike,
  value: ArrayLike,
  bias: ArrayLike | None = None,
  mask: ArrayLike | None = None,
  *,
  k: int,
  scale: float | None = None,
  is_causal: bool = False,
  selection: str | SelectionConfig = DEFAULT_SELECTION,
  selection_key: ArrayLike | None = None,
  return_stats: Literal[False] = False,
  precision: PrecisionLike = None,
  implementation: Implementation | None = None,
  query_seq_lengths: ArrayLike | None = None,
  key_value_seq_lengths: ArrayLike | None = None,
  local_window_size: int | tuple[int, int] | None = None,
  segment_ids: ArrayLike | SegmentIds | None = None,
  return_residual: Literal[True],
) -> tuple[jax.Array, jax.Array]: ...


# Over 60 lines: its signature is jax.nn.dot_product_attention's plus the
# top-k arguments; the body is plan, select and gather, then the residual or stats.
def topk_attention(
  query: ArrayLike,
  key: ArrayLike,
  value: ArrayLike,
  bias: ArrayLike | None = None,
  mask: ArrayLike | None = None,
  *,
  k: int,
  scale: float | None = None,
  is_causal: bool = False,
  selection: str | SelectionConfig = DEFAULT_SELECTION,
  selection_key: ArrayLike | None = None,
  return_stats: bool = False,
  precision: PrecisionLike = None,
  implementation: Implementation | None = None,
  query_seq_lengths: ArrayLike | None = None,
  key_value_seq_lengths: ArrayLike | None = None,
  local_window_size: int | tuple[int, int] | None = None,
  segment_ids: ArrayLike | SegmentIds | None = None,
  return_residual: bool = False,
) -> jax.Array | tuple[jax.Array, TopKStats] | tuple[jax.Array, jax.Array]:
  """Top-k attention in the layout of `jax.nn.dot_product_attention`.

  For every query and head, keeps the `k` admissible keys with the largest
  logits, renormalises the softmax over them and averages their values.

  Args:
    query: `[batch..., T, N, H]` floating array.
    key: `[batch..., S, K, H]`, `N % K == 0`.
    value: `[batch..., S, K, Hv]`.
    bias: optional, broadcastable to `[batch..., N, T, S]`.
    mask: optional boolean, broadcastable to `[batch..., N, T, S]`; True keeps.
    k: number of keys kept per query, a Python int >= 1 (static); values
      above S are clipped to S (dense attention), however large.
    scale: logit scale; default `1 / sqrt(H)`.
    is_causal: top-left aligned causal mask.
    selection: how keys are selected (static): "auto" (the default) is the
      fastest exact route for the platform and shape
      (`gsparse.selection.auto_selection`: the chunked "exact" on CPU, the
      fused Pallas selection on GPU/TPU); "full" materialises the logit
      matrix and calls `jax.lax.top_k` (the reference); "exact" gives the
      same indices with O(chunk * S) memory; "block" and "lsh" are
      approximate and cheaper (see `gsparse.selection`). A name uses the
      default config; pass an `ExactSelection`, `BlockSelection`,
      `LSHSelection` or `FusedExactSelection` to tune it.
    selection_key: PRNG key, required by "lsh" (random projections and, if
      enabled, the normaliser samples); results are deterministic given it.
    return_stats: also return a `TopKStats` with the certificate. For
      "auto", "exact" and "full" the certificate uses the exact (k+1)-th
      logit (and, except on the fused GPU/TPU kernel, counts of the dropped
      logits in bands below it: the band-count certificate, tight in
      collapsed rows), and `tail_mass` is the exact dropped mass; for
      "block" a certified bound on the dropped blocks; for "lsh" a
      Cauchy-Schwarz bound on the keys never scored (valid, usually loose).
    precision: einsum precision.
    implementation: how the selected keys are gathered, passed to
      `gsparse.sparse_gather_attention`: None (Pallas kernel on GPU/TPU, XLA
      elsewhere), "xla", "masked" or "pallas".
    query_seq_lengths: optional `batch`-shaped integer lengths in [0, T], as
      `jax.nn.dot_product_attention`'s: query rows `t >= length` attend
      nothing and output zeros.
    key_value_seq_lengths: optional `batch`-shaped integer lengths in [0, S]:
      keys `s >= length` are masked.
    local_window_size: optional int or `(left, right)`, both >= 0: query `t`
      attends keys `t - left <= s <= t + right` (as `jax.nn`).
    segment_ids: optional packed-sequence ids: one integer `[batch..., T]`
      array (self-attention, T == S) or a `SegmentIds(q [batch..., T],
      kv [batch..., S])` (jax's Pallas `SegmentIds` works too); a query
      attends only keys with its id. Lengths, window and segment ids are
      index-range masks evaluated per chunk: no T x S array (the "full"
      selection aside, which holds the logit matrix anyway). Known lengths
      outside their range raise; traced ones are clipped to it.
    return_residual: return `(output, logsumexp [batch..., T, N])` as
      `jax.nn.dot_product_attention` does (the log-normaliser over the kept
      keys, LSH's sampled correction included, in `key.dtype`, without
      gradient). Not with `return_stats`, whose
      `logsumexp` field is the same array. A row with no admissible key gets
      `-inf` (jax.nn: a large negative finite number, its masking constant).

  Returns:
    `[batch..., T, N, Hv]` output in `query.dtype`, or `(output, TopKStats)`
    when `return_stats=True` (`stats.indices` has `min(k, S)` slots), or
    `(output, logsumexp)` when `return_residual=True`. Fully masked rows
    (also rows past `query_seq_lengths`) give zeros; NaN, `-inf` and `+inf` follow one semantics on
    every route (docs/errors.md): a `-inf` bias is exactly `mask=False`, a
    NaN that an admissible key brings in makes the row and its certificate
    NaN. Empty inputs (T, batch or Hv of 0) give empty results.

  Example:
    >>> import jax, gsparse
    >>> q, kk, v = jax.random.normal(jax.random.key(0), (3, 16, 2, 8))
    >>> out, stats = gsparse.topk_attention(q, kk, v, k=4, return_stats=True)
    >>> out.shape, stats.indices.shape
    ((16, 2, 8), (16, 2, 4))

    The certificate bounds the softmax mass that top-k dropped, per query:

    >>> from gsparse import sparsity
    >>> dropped = sparsity.tail_mass(gsparse.attention_weights(q, kk), k=4)  # [N, T]
    >>> bool((stats.tail_mass_bound >= dropped.T - 1e-6).all())
    True
  """
  for name, flag in (("return_stats", return_stats), ("return_residual", return_residual)):
    if not isinstance(flag, bool):
      raise TypeError(f"{name} must be a bool, got {flag!r}")
  if return_stats and return_residual:
    raise ValueError(
      "return_stats and return_residual are exclusive (stats.logsumexp is the residual)"
    )
  query, key, value = _checks.check_attention_inputs(query, key, value)
  ranges = dict(
    query_seq_lengths=query_seq_lengths,
    key_value_seq_lengths=key_value_seq_lengths,
    local_window_size=local_window_size,
    segment_ids=segment_ids,
  )
  plan = _plan(
    query,
    key,
    bias,
    mask,
    k=k,
    scale=scale,
    is_causal=is_causal,
    selection=selection,
    selection_key=selection_key,
    implementation=implementation,
    ranges=ranges,
  )
  run = dict(is_causal=is_causal, selection_key=selection_key, precision=precision)
  run.update(row_lse=return_stats, band_counts=return_stats)
  sel, topk_out, lse_k = _select_and_gather(
    plan, query, key, value, bias, scale=scale, implementation=implementation, **run
  )
  # A NaN bound on the dropped logits means a NaN logit among the admissible
  # keys not kept (LSH never scores some keys): the row is NaN, as dense.
  undefined = jnp.isnan(sel.next_logit) & (sel.num_keys > _num_kept(sel))
  topk_out = jnp.where(undefined[..., None], jnp.nan, topk_out).astype(topk_out.dtype)
  lse_k = jnp.where(undefined, jnp.nan, lse_k)
  output = topk_out
  if sel.log_rest is not None:  # LSH normaliser correction: rescale by H / (H + rest).
    lse = jnp.logaddexp(lse_k, sel.log_rest)
    factor = jnp.where(jnp.isfinite(lse), jnp.exp(lse_k - lse), 0.0)
    output = (output * factor[..., None]).astype(output.dtype)
  if return_residual:
    lse = lse_k if sel.log_rest is None else jnp.logaddexp(lse_k, sel.log_rest)
    return output, jax.lax.stop_gradient(lse).astype(key.dtype)
  if not return_stats:
    return output
  # The certificate is about the renormalised top-k output (before any LSH correction).
  *_, t, n, _ = query.shape
  reach = _value_reach(value, plan.mask, plan.adm, is_causal=is_causal, num_queries=t, num_heads=n)
  return output, topk_stats(sel, lse_k, topk_out, value, k, value_reach=reach)


def select_keys(
  query: ArrayLike,
  key: ArrayLike,
  value: ArrayLike,
  bias: ArrayLike | None = None,
  mask: ArrayLike | None = None,
  *,
  k: int,
  scale: float | None = None,
  is_causal: bool = False,
  selection: str | SelectionConfig = DEFAULT_SELECTION,
  selection_key: ArrayLike | None = None,
  precision: PrecisionLike = None,
  implementation: Implementation | None = None,
  query_seq_lengths: ArrayLike | None = None,
  key_value_seq_lengths: ArrayLike | None = None,
  local_window_size: int | tuple[int, int] | None = None,
  segment_ids: ArrayLike | SegmentIds | None = None,
  row_logsumexp: bool = False,
  kept_logits: bool = False,
  band_counts: bool = False,
) -> SelectionResult:
  """The keys `topk_attention` would keep, without attending over them.

  Same arguments as `topk_attention` (`value` is only checked against
  `key`). For callers that attend themselves, such as
  `gsparse.flax.sparse_attention`, which needs the kept weights of its own
  gather pass for the certified choice of k. `row_logsumexp=True` also
  returns the log-sum-exp of every row (`SelectionResult.row_logsumexp`)
  from the exact selections, for `exact_tail_mass`; others give None.
  `kept_logits=True` likewise returns the kept slots' logits
  (`SelectionResult.kept_logits`) from the exact selections, so that the
  caller has the kept weights without a gather pass. `band_counts=True`
  returns the dropped logits' band counts (`SelectionResult.band_counts`)
  from the chunked exact selection and "full", with which
  `selection_tail_bound` also takes the band-count certificate.
  """
  flags = dict(row_logsumexp=row_logsumexp, kept_logits=kept_logits, band_counts=band_counts)
  for name, flag in flags.items():
    if not isinstance(flag, bool):
      raise TypeError(f"{name} must be a bool, got {flag!r}")
  query, key, value = _checks.check_attention_inputs(query, key, value)
  plan = _plan(
    query,
    key,
    bias,
    mask,
    k=k,
    scale=scale,
    is_causal=is_causal,
    selection=selection,
    selection_key=selection_key,
    implementation=implementation,
    ranges=dict(
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size,
      segment_ids=segment_ids,
    ),
  )
  return _run(
    plan,
    query,
    key,
    is_causal=is_causal,
    selection_key=selection_key,
    precision=precision,
    row_lse=row_logsumexp,
    kept_logits=kept_logits,
    band_counts=band_counts,
  )


def _select_and_gather(
  plan,
  query,
  key,
  value,
  bias,
  *,
  scale,
  is_causal,
  selection_key,
  precision,
  implementation,
  row_lse,
  band_counts=False,
):
  """`(selection, top-k output in query.dtype, logsumexp)`: the route is chosen here, once.

  `implementation` is passed to the gather unresolved: its own automatic
  choice for None is kept. `row_lse`: the selection also returns the
  log-sum-exp of every row, where it can (exact selections); `band_counts`
  likewise the band counts of the dropped logits."""
  if isinstance(plan.config, ExactSelection) and plan.implementation == "xla":
    # "exact" on the XLA path attends in its own chunked pass, with the
    # logits it already has: no gather of the kept keys.
    sel, out, lse = select_and_attend(
      plan.config,
      query,
      key,
      value,
      plan.bias,
      plan.mask,
      k=plan.k,
      scale=plan.scale,
      is_causal=is_causal,
      precision=precision,
      adm=plan.adm,
      row_lse=row_lse,
      band_counts=band_counts,
    )
    return sel, out.astype(query.dtype), lse
  sel = _run(
    plan,
    query,
    key,
    is_causal=is_causal,
    selection_key=selection_key,
    precision=precision,
    row_lse=row_lse,
    band_counts=band_counts,
  )
  res = sparse_gather_attention(
    query,
    key,
    value,
    sel.indices,
    bias=gather_bias(bias, sel.indices, key.shape[-3]),
    scale=scale,
    assume_unique=True,
    return_residuals=True,
    precision=precision,
    implementation=implementation,
  )
  return sel, res.output, res.logsumexp


class _Plan(NamedTuple):
  """Checked selection arguments: the checked, `-inf`-folded `bias`/`mask`
  (on "full", the materialised route, with the index ranges folded in too),
  and `config`: "full", or a selection config with the resolved `scale`."""

  config: str | SelectionConfig
  implementation: str
  k: int
  scale: float | None
  bias: jax.Array | None
  mask: jax.Array | None
  adm: Admissible | None = None  # index-range masks (gsparse._admissible); None on "full"


def _plan(
  query, key, bias, mask, *, k, scale, is_causal, selection, selection_key, implementation, ranges
):
  """Checks the selection arguments once, for every route (at trace time).

  `ranges`: the index-range keywords (lengths, window, segment ids) for
  `gsparse._admissible.build`; the "full" route folds them into `mask`."""
  *batch, t, n, h = query.shape
  s = key.shape[-3]
  adm = _admissible.build(tuple(batch), t, s, **ranges)
  k = min(_checks.check_int("k", k, minimum=1), key.shape[-3])  # k > S is dense: clip
  config = resolve_selection(selection)
  impl = resolve_implementation(implementation)
  _checks.check_prng_key("selection_key", selection_key)
  if isinstance(config, LSHSelection):
    config.require_key(selection_key)
  # Every route gets the checked mask with any `-inf` bias folded in (the
  # certificate's value reach reads the same one).
  mask, bias = _checks.check_mask_and_bias(mask, bias, (*batch, n, t, s))
  full = config == "full" or query.size == 0  # nothing to select in an empty query
  if full and adm is not None:  # the logit matrix exists anyway: a dense mask costs no more
    mask, adm = _admissible.and_masks(mask, _admissible.dense_mask(adm, tuple(batch), t, s)), None
  mask, bias = fold_neg_inf_bias(mask, bias)
  if full:
    return _Plan("full", impl, k, scale, bias, mask)
  _checks.check_scale(scale)
  if not isinstance(is_causal, bool):
    raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
  scale = 1.0 / float(h) ** 0.5 if scale is None else scale
  if config == AUTO:  # the one place the default is resolved
    config = auto_selection(query, key, scale=scale, ranges=adm is not None)
  return _Plan(config, impl, k, scale, bias, mask, adm)


def _run(
  plan: _Plan, query, key, *, is_causal, selection_key, precision, **flags
) -> SelectionResult:
  """The selection of `plan` ("full": the logit matrix and `jax.lax.top_k`);
  `flags`: `row_lse`, `kept_logits`, `band_counts` (all default False)."""
  if plan.config == "full":
    lg = compute_logits(
      query, key, plan.bias, plan.mask, scale=plan.scale, is_causal=is_causal, precision=precision
    )
    return select_topk_full(lg.logits, lg.valid, plan.k, **flags)
  return select(
    plan.config,
    query,
    key,
    plan.bias,
    plan.mask,
    k=plan.k,
    scale=plan.scale,
    is_causal=is_causal,
    selection_key=selection_key,
    precision=precision,
    adm=plan.adm,
    **flags,
  )
