"""Scalable key selection for top-k attention: exact, block and LSH.

`gsparse.topk_attention(..., selection=...)` splits top-k attention into a
selection (which keys each query keeps) and the sparse gather over the kept
keys. The naive selection ("full") materialises the `[N, T, S]` logit matrix
and calls `jax.lax.top_k` on it. The selections here never hold more than a
chunk of it. The default, "auto", is the fastest exact one for the platform
and shape (`auto_selection`: the chunked `ExactSelection` on CPU, the fused
Pallas kernel `FusedExactSelection` on GPU/TPU), resolved once at trace time.

* `ExactSelection` ("exact"): queries are processed in chunks of
  `query_chunk` rows (`jax.lax.map`). For each chunk the logits against all
  keys are computed and the keys are cut into blocks of `key_block`. A
  threshold `lo` such that at least `k + 1` block maxima are `>= lo` is found
  by bisection on the int32 keys that order floats as `jax.lax.top_k` does
  (starting from the minimum of the maxima of `k + 1` disjoint groups of
  blocks); every logit `>= lo` lies in a block whose maximum is `>= lo`, and
  at least `k + 1` logits are `>= lo`, so the top-(k+1) logits, ties
  included, lie in the flagged blocks. The flagged blocks are compacted in
  increasing key order (a prefix count in two small matmuls and a scatter),
  and `jax.lax.top_k` on their logits (those below `lo` masked) returns
  exactly the indices, tie order included, of `jax.lax.top_k` on the full
  row. A row that still flags more than `candidate_blocks` blocks (heavy ties,
  e.g. a zero query) bisects on until `lo` is exactly the (k+1)-th largest
  block maximum and keeps the blocks above it plus the lowest blocks equal to
  it, k + 1 in all: the blocks that `jax.lax.top_k` on the block maxima
  keeps (if a logit x lay outside them, the k + 1 kept blocks would each hold
  a distinct logit ranked before x).
  The point of the threshold: on XLA:CPU `jax.lax.top_k` is a comparator
  sort of each row and costs more than the matmul of the logits, so it runs
  only on the few candidate blocks. On the XLA path `topk_attention`
  also computes the output inside the chunk loop from the logits already at
  hand (`select_and_attend`), so the kept keys are never gathered. Peak
  memory is O(query_chunk * S) per head plus the O(T * k) result.
* `BlockSelection` ("block"): keys are cut into blocks summarised by their
  per-channel minimum and maximum. `q . k <= sum_h max(q_h min_h, q_h max_h)`
  for every key of a block, so each block gets a certified upper bound on its
  logits in two small matmuls; the `num_blocks` blocks with the largest bound
  are kept and the exact top-k is taken inside them. Approximate (recall is
  measured, see `selection_recall`), but the certificate stays valid: a
  dropped block's bound caps its logits.
* `LSHSelection` ("lsh"): the sortLSH step of HyperAttention (Han et al.,
  2024): queries and keys are hashed by the signs of random projections
  (angular LSH), the codes are ordered so that neighbouring codes differ in
  one sign, queries and keys are sorted by code, and each block of sorted
  queries scores a window of sorted keys around it. The diagonal block (keys
  near the query's own position) is always scored too, which keeps causal
  rows covered. Uniform column sampling, which HyperAttention uses for the
  remaining mass, is dropped: under sparsity the top-k carry the output.
  An optional sampled estimate of the dropped mass corrects the normaliser.
  O(T * block * H) work, never the full logit matrix.

Logits that evaluate to `-inf` count as masked. All selections support
`mask`, `bias`, `is_causal`, the index-range masks of `gsparse._admissible`
(sequence lengths, a local window, segment ids; evaluated per chunk, never as
a T x S array) and grouped-query heads, and give the same result
under `jax.jit` and `jax.vmap`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.lax import PrecisionLike
from jax.typing import ArrayLike

from gsparse._admissible import Admissible
from gsparse.selection._common import SelectionResult, auto_key_block, gather_bias
from gsparse.selection.auto import AUTO, FusedExactSelection, auto_selection
from gsparse.selection.block import BlockSelection
from gsparse.selection.exact import ExactSelection, select_and_attend
from gsparse.selection.lsh import LSHSelection

__all__ = [
  "AUTO",
  "EXACT_TYPES",
  "NAMES",
  "BlockSelection",
  "ExactSelection",
  "FusedExactSelection",
  "LSHSelection",
  "SelectionConfig",
  "SelectionResult",
  "auto_key_block",
  "auto_selection",
  "gather_bias",
  "resolve_selection",
  "select",
  "select_and_attend",
  "selection_recall",
]

SelectionConfig = ExactSelection | BlockSelection | LSHSelection | FusedExactSelection
_CONFIG_TYPES = (ExactSelection, BlockSelection, LSHSelection, FusedExactSelection)
_CONFIGS = {"exact": ExactSelection, "block": BlockSelection, "lsh": LSHSelection}
NAMES = (AUTO, "full", *_CONFIGS)  # every name `selection=` accepts
EXACT_TYPES = (ExactSelection, FusedExactSelection)  # configs with "full"'s indices


def resolve_selection(selection: Any) -> str | SelectionConfig:
  """Maps a selection name or config to "auto", "full" or a config dataclass.

  "auto" stays a name here: its config depends on the platform and the
  shapes, and `auto_selection` picks it once these are known.

  Raises:
    ValueError: unknown name. TypeError: neither a str nor a config.

  Example:
    >>> from gsparse.selection import resolve_selection
    >>> resolve_selection("block")
    BlockSelection(block_size=32, num_blocks=16, query_chunk=256, summary='minmax')
  """
  if isinstance(selection, _CONFIG_TYPES):
    return selection
  if isinstance(selection, str):
    if selection in (AUTO, "full"):
      return selection
    if selection in _CONFIGS:
      return _CONFIGS[selection]()
    raise ValueError(f"selection={selection!r} must be one of {NAMES} or a selection config")
  raise TypeError(
    "selection must be a str or ExactSelection/BlockSelection/LSHSelection/"
    f"FusedExactSelection, got {selection!r}"
  )


def select(
  config: SelectionConfig,
  query: jax.Array,
  key: jax.Array,
  bias: jax.Array | None,
  mask: jax.Array | None,
  *,
  k: int,
  scale: float,
  is_causal: bool,
  selection_key: jax.Array | None = None,
  precision: PrecisionLike = None,
  adm: Admissible | None = None,
  row_lse: bool = False,
  kept_logits: bool = False,
  band_counts: bool = False,
) -> SelectionResult:
  """Runs a selection on checked inputs (see `gsparse.topk_attention`).

  Args:
    config: an `ExactSelection`, `BlockSelection` or `LSHSelection`.
    query: `[batch..., T, N, H]`.
    key: `[batch..., S, K, H]`.
    bias: None or broadcastable to `[batch..., N, T, S]`.
    mask: None or boolean broadcastable to `[batch..., N, T, S]`.
    k: keys kept per query.
    scale: logit scale.
    is_causal: top-left aligned causal mask.
    selection_key: PRNG key, required by `LSHSelection` (the projections and samples).
    precision: einsum precision.
    adm: index-range masks (lengths, window, segment ids) from
      `gsparse._admissible.build`, evaluated per chunk; None for none.
    row_lse: also return the log-sum-exp of every row
      (`SelectionResult.row_logsumexp`); the exact selections only, the
      others ignore it (None).
    kept_logits: also return the kept slots' logits
      (`SelectionResult.kept_logits`); the exact selections only, as `row_lse`.
    band_counts: also return the dropped logits' band counts
      (`SelectionResult.band_counts`); the exact selections only, and not
      the fused kernel (None there: the single-gap certificate).

  Returns:
    A `SelectionResult` in the `[batch..., T, N, *]` layout.
  """
  if not isinstance(config, _CONFIG_TYPES):
    raise TypeError(f"unknown selection config {config!r}")
  k = min(k, key.shape[-3])  # k > S keeps every key: no S-sized padding of a huge k
  exact = isinstance(config, EXACT_TYPES)
  extra = dict(row_lse=row_lse, kept_logits=kept_logits, band_counts=band_counts)
  extra = extra if exact else {}
  return config.select(
    query,
    key,
    bias,
    mask,
    k=k,
    scale=scale,
    is_causal=is_causal,
    selection_key=selection_key,
    precision=precision,
    adm=adm,
    **extra,
  )


def selection_recall(indices: ArrayLike, reference: ArrayLike) -> jax.Array:
  """Fraction of the reference keys of each row that `indices` also selects.

  Args:
    indices: `[..., k]` selected key positions (-1 = none).
    reference: `[..., k_ref]` the true top-k (e.g. from `selection="exact"`), -1 = none.

  Returns:
    `[...]` float32 recall in [0, 1]; 1 for rows whose reference is empty.

  Example:
    >>> import jax.numpy as jnp
    >>> from gsparse.selection import selection_recall
    >>> selection_recall(jnp.array([[0, 2, 5]]), jnp.array([[2, 5, -1]])).tolist()
    [1.0]
  """
  indices = jnp.asarray(indices)
  reference = jnp.asarray(reference)
  for name, a in (("indices", indices), ("reference", reference)):
    if not jnp.issubdtype(a.dtype, jnp.integer):
      raise TypeError(f"{name} must have an integer dtype, got {a.dtype}")
    if a.ndim < 1:
      raise ValueError(f"{name} must have at least 1 dimension [..., k], got shape {a.shape}")
  if indices.shape[:-1] != reference.shape[:-1]:
    raise ValueError(
      f"indices and reference must have the same leading dimensions, got {indices.shape} "
      f"and {reference.shape}"
    )
  hit = jnp.zeros(reference.shape, bool)
  # Loop over the selected slots to keep memory at O(rows * k_ref).
  hit = jax.lax.fori_loop(
    0,
    indices.shape[-1],
    lambda i, h: h | (reference == jax.lax.dynamic_index_in_dim(indices, i, -1, keepdims=True)),
    hit,
  )
  valid = reference >= 0
  num = jnp.sum(hit & valid, axis=-1)
  den = jnp.sum(valid, axis=-1)
  return jnp.where(den > 0, num / jnp.maximum(den, 1), 1.0).astype(jnp.float32)
