"""The default selection, "auto": the fastest exact route for the platform and shape.

`auto_selection` is the one place where `topk_attention`'s default is
decided, statically (at trace time, from the backend and the shapes). Every
choice it makes is exact: the same indices as `selection="full"`, tie order
included (up to the logits' rounding, which each route computes in its own
matmul), and none holds more than a chunk of the `[T, S]` logit matrix:

* CPU: the chunked `ExactSelection`, with the native multi-threaded top-k
  of each row (`gsparse._native`) and a query chunk of at most
  `_CPU_CHUNK_ROWS` rows and `_CPU_CHUNK_ELEMENTS` logits.
* GPU/TPU: `FusedExactSelection`, the Pallas kernel
  `gsparse.kernels.select.fused_topk_select` (the logits never leave the
  chip), when its static requirements hold (a Python-float `scale`, 16- or
  32-bit floats); else the chunked `ExactSelection`.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.lax import PrecisionLike

from gsparse import _checks
from gsparse._admissible import Admissible
from gsparse._numerics import finish_top_k
from gsparse.kernels.select import fused_topk_select
from gsparse.selection._common import SelectionResult, kept_values
from gsparse.selection.exact import ExactSelection

AUTO = "auto"

# A chunk of at most 128 query rows and `query_chunk * S` float32 logits of at
# most 8 MiB. Forward process CPU time (d = k = 64, causal) at 128 rows against
# the earlier rule (2 MiB, up to 512 rows): -37% at n = 1024 (512 rows before),
# -13% at 2048 (256), equal at 4096 and 8192, -22% at 16384 (32 rows): fewer
# rows per chunk stay near the cache, fewer chunks cost less loop overhead.
_CPU_CHUNK_ELEMENTS = 1 << 21
_CPU_CHUNK_ROWS = 128
_KERNEL_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class FusedExactSelection:
  """Exact top-k from the fused Pallas selection kernel (GPU/TPU).

  Wraps `gsparse.kernels.select.fused_topk_select`: the same indices as
  "full", and the row log-sum-exp at no extra cost. The kernel's outputs are
  constants to autodiff; gradients come from the gather over the kept keys,
  which recomputes their logits (O(T k H)).

  Attributes:
    block_q, block_k: the kernel's tiles (powers of two), None for its defaults.
    interpret: run the kernel in the Pallas interpreter (None: on CPU only).
  """

  block_q: int | None = None
  block_k: int | None = None
  interpret: bool | None = None

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      v = getattr(self, name)
      if v is not None:
        _checks.check_int(name, v, minimum=1)
        if v & (v - 1):
          raise ValueError(f"{name}={v!r} must be a power of two")
    if self.interpret is not None and not isinstance(self.interpret, bool):
      raise TypeError(f"interpret must be a bool or None, got {self.interpret!r}")

  def select(
    self,
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
    """Exact top-k on checked inputs (see `gsparse.selection.select`).

    `scale` must be a Python float; `precision` is the kernel's own (the
    logits are accumulated in float32). The index-range masks (`adm`:
    lengths, window, segment ids) go into the kernel, evaluated per tile.
    `band_counts` is not honoured: the kernel keeps no logit row to count,
    so its result has None (the single-gap certificate).
    """
    del selection_key, precision, band_counts
    kk = min(k + 1, key.shape[-3])  # the (k+1)-th logit bounds the dropped keys
    res = fused_topk_select(
      query,
      key,
      k=kk,
      scale=float(scale),
      is_causal=is_causal,
      mask=mask,
      bias=bias,
      block_q=self.block_q,
      block_k=self.block_k,
      interpret=self.interpret,
      **_range_kwargs(adm, query.shape[:-3], query.shape[-3], key.shape[-3]),
    )
    idx, nxt = finish_top_k(res.logits, res.indices, k)
    kept = kept_values(res.logits, idx) if kept_logits else None
    return SelectionResult(idx, nxt, res.num_keys, None, res.logsumexp if row_lse else None, kept)


def _range_kwargs(adm: Admissible | None, batch: tuple[int, ...], t: int, s: int) -> dict:
  """`fused_topk_select`'s index-range arguments from a batch-flattened `Admissible`."""
  if adm is None:
    return {}
  shaped = lambda x, *tail: None if x is None else x.reshape(*batch, *tail)
  segments = None if adm.q_seg is None else (shaped(adm.q_seg, t), shaped(adm.kv_seg, s))
  return dict(
    query_seq_lengths=shaped(adm.q_len),
    key_value_seq_lengths=shaped(adm.kv_len),
    segment_ids=segments,
    local_window_size=adm.window,
  )


def _fused_serves(query: jax.Array, key: jax.Array, scale) -> bool:
  """The fused kernel's static requirements: a concrete scale and 16/32-bit floats."""
  dtypes_ok = all(x.dtype.name in _KERNEL_DTYPES for x in (query, key))
  return dtypes_ok and _checks.concrete_or_none(scale) is not None


def auto_selection(
  query: jax.Array,
  key: jax.Array,
  *,
  scale,
  ranges: bool = False,
  platform: str | None = None,
) -> ExactSelection | FusedExactSelection:
  """The exact selection "auto" stands for, for these (checked) inputs.

  Args:
    query: `[batch..., T, N, H]`.
    key: `[batch..., S, K, H]`.
    scale: the resolved logit scale (a Python float or a tracer).
    ranges: whether index-range masks (lengths, window, segment ids) are
      given. Ignored: every route takes them, the fused kernel too
      (`gsparse.kernels.select_ranges`); kept for existing callers.
    platform: the backend; default `jax.default_backend()`.

  Returns:
    An `ExactSelection` or a `FusedExactSelection` (see the module docstring).
  """
  platform = jax.default_backend() if platform is None else platform
  accel = platform in ("gpu", "cuda", "rocm", "tpu")
  del ranges  # the fused kernel takes the index ranges (gsparse.kernels.select_ranges)
  if accel and _fused_serves(query, key, scale):
    return FusedExactSelection()
  s = max(key.shape[-3], 1)
  chunk = max(16, min(_CPU_CHUNK_ROWS, _CPU_CHUNK_ELEMENTS // s))
  return ExactSelection(query_chunk=1 << (chunk.bit_length() - 1))
