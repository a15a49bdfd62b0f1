"""Pallas kernels for sparse-gather attention, forward and backward.

They run behind `gsparse.sparse_gather_attention(..., implementation="pallas")`
and `gsparse.block_sparse_gather_attention(..., implementation="pallas")`.

Modules:
  * `_common`: `BlockSizes`, the variants ("gpu": Triton, "tpu": Mosaic),
    `default_variant`, and which block sizes the compiled kernels tile.
  * `token`: `token_gather_attention`, one list of `k` key positions per
    (query, head).
  * `block` (+ `block_tpu`, its Mosaic kernel): `block_gather_attention`,
    one list of key blocks per (query block, head), with optional index
    ranges (sequence lengths, segment ids, a local window).
  * `token_bwd` / `token_bwd_tpu`, `block_bwd` / `block_bwd_tpu` (+
    `block_tile`, their shared tile): the Pallas backward of both
    custom VJPs (dq, dk, dv without atomics; `key_major` sorts the pairs by
    key), run where the forward compiles for a device (`backward=`).
  * `backward`: `gather_backward_xla`, the XLA backward: the reference, and the
    default in interpret mode.
  * `reference`: pure-jnp dense-mask references of both.
  * `nonfinite`: the finite-part trick and the signed read counts for masked non-finite rows.

The kernels depend only on jax and the leaf `gsparse._layout`, never on the
gathers that call them. See docs/kernels.md.
"""

from gsparse.kernels._common import (
  BACKWARDS,
  VARIANTS,
  Backward,
  BlockSizes,
  Variant,
  block_sizes_supported,
  default_variant,
  resolve_backward,
)
from gsparse.kernels.backward import gather_backward_xla
from gsparse.kernels.block import block_gather_attention
from gsparse.kernels.reference import block_gather_reference, sparse_gather_reference
from gsparse.kernels.token import token_gather_attention

__all__ = [
  "BACKWARDS",
  "VARIANTS",
  "Backward",
  "BlockSizes",
  "Variant",
  "block_gather_attention",
  "block_gather_reference",
  "block_sizes_supported",
  "default_variant",
  "resolve_backward",
  "gather_backward_xla",
  "sparse_gather_reference",
  "token_gather_attention",
]
