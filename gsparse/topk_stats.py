"""The diagnostics of a top-k call: `TopKStats`, the certified and the exact tail mass.

`topk_attention(..., return_stats=True)` and the Flax wrappers build their
`TopKStats` here from a `SelectionResult` and the kept-key output: the
certified tail (`gsparse.certificate.kept_set_tail_bound`, or the smaller
band-count bound where the selection counted bands), the output error
certificate, and, where the selection saw every logit of the row, the exact
dropped mass.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gsparse.certificate import (
  kept_set_tail_bound,
  nonfinite_value_reach,
  output_error_certificate,
)
from gsparse.selection import (
  SelectionResult,
)
from gsparse.selection._bands import BAND_WIDTH


class TopKStats(NamedTuple):
  """Diagnostics returned by `topk_attention(..., return_stats=True)`.

  Attributes:
    indices: `[batch..., T, N, min(k, S)]` selected key positions (-1 = none).
    logsumexp: `[batch..., T, N]` log normaliser over the kept keys.
    tail_mass_bound: `[batch..., T, N]` certified upper bound on the softmax mass
      of the dropped keys (`gsparse.certificate.kept_set_tail_bound`, and
      where the selection carries band counts the smaller band-count bound:
      `selection_tail_bound`); NaN for a row whose output is NaN.
    error_bound: `[batch..., T, N]` certified upper bound on
      `||dense_output - topk_output||_2`.
    tail_mass: `[batch..., T, N]` the exact softmax mass of the dropped keys,
      `1 - exp(logsumexp - logsumexp_all)` (`exact_tail_mass`), from the
      exact selections ("auto", "full", "exact"), which see every logit of
      the row; None for "block" and "lsh", which do not. 0 for a row with
      nothing dropped or nothing admissible, NaN for a NaN row.
  """

  indices: jax.Array
  logsumexp: jax.Array
  tail_mass_bound: jax.Array
  error_bound: jax.Array
  tail_mass: jax.Array | None = None


def _num_kept(sel: SelectionResult) -> jax.Array:
  """Keys actually kept per row (<= k: fewer when a row has fewer admissible
  keys or an approximate selection found fewer)."""
  return jnp.sum(sel.indices >= 0, axis=-1, dtype=jnp.int32)


def selection_tail_bound(sel: SelectionResult, logsumexp: jax.Array) -> jax.Array:
  """Certified dropped softmax mass of `sel`, from the log-sum-exp over its kept keys.

  Every selection goes through `gsparse.certificate.kept_set_tail_bound`:
  the kept set is whatever `sel.indices` lists, `sel.next_logit` bounds every
  dropped admissible logit and `num_keys - kept` counts the dropped keys.
  Where the selection carries band counts (`sel.band_counts`: the exact
  selections under `return_stats=True`), the band-count certificate
  (`gsparse.bounds.certificates.band_count_tail_bound`, Proposition C4 in
  docs/theory.md) is computed too and the smaller of the two is returned:
  both are upper bounds, so their minimum is one. In a collapsed row (the
  logits below `s_{k+1}` far below it) the single gap counts every dropped
  key at `e^{s_{k+1}}` and can be loose by the number of dropped keys; the
  bands are within `e^{0.25} + N e^{-16}` of the true tail.
  """
  dropped = sel.num_keys - _num_kept(sel)
  single = kept_set_tail_bound(logsumexp, sel.next_logit, dropped)
  if sel.band_counts is None:
    return single
  # Imported here: `gsparse.bounds` is a large package that plain attention
  # never needs (and it imports `gsparse.certificate` itself).
  from gsparse.bounds.certificates import band_count_tail_bound

  counts = sel.band_counts.astype(jnp.promote_types(logsumexp.dtype, jnp.float32))
  band = band_count_tail_bound(logsumexp, sel.next_logit, counts, width=BAND_WIDTH)
  # NaN in either (a NaN row) stays NaN: `minimum` propagates it.
  return jnp.minimum(single, band.astype(single.dtype))


# Jitted (the shapes static) so that an op-by-op call reuses the compiled
# `lax.cond` of `nonfinite_value_reach` instead of compiling it per call.
@functools.partial(jax.jit, static_argnames=("is_causal", "num_queries", "num_heads"))
def _value_reach(value, mask, adm, *, is_causal, num_queries, num_heads) -> jax.Array:
  """`[batch..., T, N]`: rows that may attend a non-finite value row (NaN error bound).

  `mask` is the selection plan's checked mask with any `-inf` bias folded in,
  `adm` its index-range masks: every admissibility rule the selection used.
  """
  return nonfinite_value_reach(
    value, mask, is_causal=is_causal, num_queries=num_queries, num_heads=num_heads, adm=adm
  )


def exact_tail_mass(kept_lse: ArrayLike, row_lse: ArrayLike, num_dropped: ArrayLike) -> jax.Array:
  """The softmax mass outside a kept set, exactly: `1 - exp(kept_lse - row_lse)`.

  Args:
    kept_lse: `[...]` log-sum-exp of the kept logits of each row.
    row_lse: `[...]` log-sum-exp of every admissible logit of the row.
    num_dropped: `[...]` admissible keys not kept.

  Returns:
    `[...]` in `[0, 1]` (at least float32): 0 where nothing is dropped or the
    row has no mass (`row_lse == -inf`: fully masked); NaN where either
    log-sum-exp is NaN or `+inf` (a NaN or a kept `+inf` logit: the output is
    NaN). `expm1` keeps small tails accurate; rounding that puts `kept_lse`
    above `row_lse` gives 0.
  """
  kept_lse = jnp.asarray(kept_lse)
  dtype = jnp.promote_types(jnp.result_type(kept_lse, row_lse), jnp.float32)
  kept_lse, row_lse = kept_lse.astype(dtype), jnp.asarray(row_lse, dtype)
  nothing = (jnp.asarray(num_dropped) == 0) | (row_lse == -jnp.inf)
  diff = jnp.where(nothing, 0.0, kept_lse - row_lse)
  tail = -jnp.expm1(jnp.minimum(diff, 0.0))
  undefined = jnp.isnan(kept_lse) | jnp.isnan(row_lse) | (kept_lse == jnp.inf)
  return jnp.where(undefined | (row_lse == jnp.inf), jnp.nan, tail)


def topk_stats(
  sel: SelectionResult,
  logsumexp: jax.Array,
  output: jax.Array,
  value: jax.Array,
  k: int,
  *,
  value_reach: jax.Array | None = None,
) -> TopKStats:
  """Builds `TopKStats` (certificate included) from a selection and its output;
  `tail_mass` where the selection carried its row log-sum-exp.

  `value_reach`: see `gsparse.certificate.output_error_certificate`.
  """
  tail = selection_tail_bound(sel, logsumexp)
  err = output_error_certificate(tail, output, value, value_reach=value_reach)
  return TopKStats(sel.indices, logsumexp, tail, err, selection_exact_tail(sel, logsumexp, tail))


def selection_exact_tail(
  sel: SelectionResult, logsumexp: jax.Array, bound: jax.Array
) -> jax.Array | None:
  """`exact_tail_mass` of `sel` where it carries its row log-sum-exp, else None.

  Clipped to the certified `bound` (`selection_tail_bound`): the true tail is
  below it, so the clip only removes rounding (the difference of two
  log-sum-exps is accurate to about `eps * |logsumexp|`), and
  `tail_mass <= tail_mass_bound` holds exactly.
  """
  if sel.row_logsumexp is None:
    return None
  exact = exact_tail_mass(logsumexp, sel.row_logsumexp, sel.num_keys - _num_kept(sel))
  return jnp.minimum(exact, bound)
