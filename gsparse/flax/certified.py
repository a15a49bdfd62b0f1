"""The certified choice of k per query (`CertifiedK`) for `gsparse.flax.sparse_attention`.

The kept weights come from the selection's own kept logits where it carries
them (the exact selections, `SelectionResult.kept_logits`), else from a
stop-gradient gather pass over the selected keys (LSH, block). With the
selection's certified (or, for the exact selections, exact) dropped mass,
`certified_num_keys` picks per query the smallest candidate k whose certified
tail is at most the tolerance, and `certified_subset` keeps those slots.

Rounding: with kept logits, every number of the certificate (kept weights,
kept log-sum-exp, the next logit, the row log-sum-exp) comes from one
computation of the logits, the selection's, so the certificate is exact
arithmetic on one set of rounded logits (the pre-pass mixed the gather's
kept logits with the selection's next logit and row log-sum-exp). The final
pass recomputes the kept logits in its own matmul; the two differ by the
rounding of a length-H dot product, `|d| <= ~H eps |q| |k| scale`, which
changes any ratio of softmax masses by a factor within `exp(+-2 |d|)`: the
same order as the rounding of the bound's own arithmetic, and the same
mismatch the pre-pass had with the selection's logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import gsparse.topk as _topk
from gsparse.attention import masked_softmax_lse
from gsparse.flax.policies import CertifiedK
from gsparse.gather import sparse_gather_attention
from gsparse.selection import AUTO, EXACT_TYPES, SelectionResult, gather_bias, resolve_selection


def certified_num_keys(
  weights: jax.Array,
  tail_max: jax.Array,
  candidates: tuple[int, ...],
  tol: float,
  *,
  in_slot_order: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Per query, the smallest candidate k whose certified tail mass is <= tol.

  Args:
    weights: `[..., k_max]` softmax weights over the selected slots (sum 1, or
      0 for an empty row).
    tail_max: `[...]` certified bound on the mass outside the selection.
    candidates: sorted static candidate counts, the last one `<= k_max`.
    tol: tolerance.
    in_slot_order: if True, `W_k` is the mass of the first k slots (the keys
      kept are then the first k slots) instead of the k heaviest. The bound
      holds for any kept subset (see `CertifiedK`); for the selections "full"
      and "exact", whose slots are in decreasing logit order, the two agree
      up to rounding, and no sort is needed (XLA:CPU sorts with a comparator
      call per comparison).

  Returns:
    `(k [...] int32, bound [...])`: the chosen count and its certified bound
    `1 - (W_k / W)(1 - tail_max)` (for an empty row: the chosen count is the
    smallest candidate and the bound 0).
  """
  share, empty = _head_shares(weights, in_slot_order)
  cand = jnp.asarray(candidates, jnp.int32)
  head = jnp.take(share, cand - 1, axis=-1)  # [..., C]
  bounds = jnp.clip(1.0 - head * (1.0 - tail_max[..., None]), 0.0, 1.0)
  bounds = jnp.where(empty[..., None], 0.0, bounds)
  ok = bounds <= tol
  first = jnp.where(jnp.any(ok, axis=-1), jnp.argmax(ok, axis=-1), len(candidates) - 1)
  chosen = cand[first]
  bound = jnp.take_along_axis(bounds, first[..., None], axis=-1)[..., 0]
  return chosen, bound


def certified_subset(
  sel: SelectionResult,
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  bias: jax.Array | None,
  *,
  policy: CertifiedK,
  scale,
  precision,
  selection,
  implementation: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(indices with the uncertified slots at -1, num_kept [...], tail bound [...])`.

  The certificate comes from the kept weights and their log-sum-exp: from
  `sel.kept_logits` where the selection carries them, else from a
  stop-gradient gather pass over `sel.indices` (`_kept_weights`); exact
  selections see the whole row, so their dropped mass is known exactly and
  replaces the bound. `implementation` is the gather's
  (`gsparse.gather.resolve_implementation`), as for the final pass.
  """
  indices = sel.indices
  s = key.shape[-3]
  weights, kept_lse = _kept_weights(
    sel, query, key, value, bias, scale=scale, precision=precision, implementation=implementation
  )
  tail_k = _topk.selection_tail_bound(sel, kept_lse)
  exact = _topk.selection_exact_tail(sel, kept_lse, tail_k)
  tail_k = tail_k if exact is None else exact
  # "full" and the exact selections return the slots in decreasing logit
  # order: keep the first k slots, with no sort. Others: keep the k heaviest.
  in_order = _slots_in_logit_order(selection)
  num_kept, tail = certified_num_keys(
    weights, tail_k, policy.candidates(s), policy.tol, in_slot_order=in_order
  )
  if policy.granularity == "call":
    num_kept = jnp.broadcast_to(jnp.max(num_kept), num_kept.shape)
    tail = _bound_at(weights, tail_k, num_kept, in_order)
  # Rank of each slot (0 = kept first); drop ranks >= num_kept.
  if in_order:
    rank = jnp.arange(indices.shape[-1])
  else:
    order = jnp.argsort(-weights, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
  return jnp.where(rank < num_kept[..., None], indices, -1), num_kept, tail


def _kept_weights(sel, query, key, value, bias, *, scale, precision, implementation):
  """`(weights [..., k], log-sum-exp [...])` of the kept slots, without gradient.

  From `sel.kept_logits` (the softmax of the gather, `masked_softmax_lse`,
  over the slots with an index) when present, else a gather pass.
  """
  if sel.kept_logits is not None:
    return masked_softmax_lse(sel.kept_logits, sel.indices >= 0)
  sg = jax.lax.stop_gradient
  pre = sparse_gather_attention(
    sg(query),
    sg(key),
    sg(value),
    sel.indices,
    bias=sg(gather_bias(bias, sel.indices, key.shape[-3])),
    scale=scale,
    assume_unique=True,
    return_residuals=True,
    precision=precision,
    implementation=implementation,
  )
  return pre.weights, pre.logsumexp


def _slots_in_logit_order(selection) -> bool:
  """Whether `topk_attention`'s `selection` returns its slots in decreasing logit order."""
  cfg = resolve_selection(selection)
  return cfg in ("full", AUTO) or isinstance(cfg, EXACT_TYPES)


def _head_shares(weights: jax.Array, in_slot_order: bool) -> tuple[jax.Array, jax.Array]:
  """`(W_k / W for k = 1..k_max [..., k_max], empty row [...])`, with `W_k` the
  mass of the first k slots or (not `in_slot_order`) of the k heaviest."""
  w = weights if in_slot_order else -jnp.sort(-weights, axis=-1)  # descending
  share = jnp.cumsum(w, axis=-1)
  total = share[..., -1:]
  return share / jnp.where(total > 0, total, 1.0), total[..., 0] <= 0


def _bound_at(
  weights: jax.Array, tail_max: jax.Array, num_kept: jax.Array, in_slot_order: bool
) -> jax.Array:
  """Certified tail bound `1 - (W_k/W)(1 - tail_max)` at a traced per-query k."""
  share, empty = _head_shares(weights, in_slot_order)
  head = jnp.take_along_axis(share, (num_kept - 1)[..., None], axis=-1)[..., 0]
  bound = jnp.clip(1.0 - head * (1.0 - tail_max), 0.0, 1.0)
  return jnp.where(empty, 0.0, bound)
