"""What every sparse-gather kernel shares: tiles, variants and the interpreter switch.

Variants (static `variant=`):

* `"gpu"`: a plain Pallas kernel written for the Triton lowering (block shapes
  are padded to powers of two; K/V stay in their `[B, S, K, H]` layout and rows
  are fetched with a gathered load). With `interpret=True` it runs anywhere.
* `"tpu"`: a Mosaic kernel; K/V stay in HBM (`pl.ANY`) and rows or key blocks
  are fetched with `pltpu.make_async_copy` into VMEM scratch, as JAX's TPU
  paged-attention kernel does. With `interpret=True` it runs in the TPU
  interpreter (`pltpu.InterpretParams`). Copies are not double-buffered: each
  step waits for its rows.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Variant = Literal["gpu", "tpu"]
VARIANTS: tuple[Variant, ...] = ("gpu", "tpu")
Backward = Literal["auto", "pallas", "xla"]
BACKWARDS: tuple[Backward, ...] = ("auto", "pallas", "xla")

# Triton lowers a float32 dot at DEFAULT precision to TF32 (10-bit mantissa);
# HIGHEST keeps float32 inputs in IEEE float32 and changes nothing for 16-bit
# inputs, whose products are exact in the float32 accumulator.
DOT_PRECISION = lax.Precision.HIGHEST


def is_pow2(x: int) -> bool:
  """Whether the Python int `x` is a power of two (>= 1)."""
  return x >= 1 and (x & (x - 1)) == 0


def next_pow2(x: int) -> int:
  """The smallest power of two `>= x` (1 for `x <= 1`)."""
  return 1 << max(0, (int(x) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the token-level kernel (static under `jit`).

  Attributes:
    block_q: queries handled by one program (one grid step).
    block_slots: slots read per inner step of the GPU kernel (the running
      softmax advances by this many keys); the slot count is padded up to a
      multiple of `min(block_slots, next_pow2(k))`. The TPU kernel copies all
      slots of a query into VMEM at once and ignores it.
    num_warps: Triton warps per program (GPU only).
    num_stages: Triton software-pipelining stages (GPU only).
  """

  block_q: int = 4
  block_slots: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_slots", "num_warps", "num_stages"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{name}={value!r} must be a positive int")
    for name in ("block_q", "block_slots"):
      if not is_pow2(getattr(self, name)):
        raise ValueError(
          f"BlockSizes.{name}={getattr(self, name)} must be a power of two (Triton tiles)"
        )


DEFAULT_BLOCK_SIZES = BlockSizes()


def default_variant() -> tuple[Variant, bool]:
  """`(variant, interpret)` for the default backend.

  GPU -> Triton kernel, TPU -> Mosaic kernel, anything else (CPU) -> the GPU
  kernel in Pallas interpret mode.
  """
  backend = jax.default_backend()
  if backend in ("gpu", "cuda", "rocm"):
    return "gpu", False
  if backend == "tpu":
    return "tpu", False
  return "gpu", True


def check_variant(variant: str) -> None:
  """Raises ValueError unless `variant` is one of `VARIANTS`."""
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r} must be one of {VARIANTS}")


def interpret_arg(variant: str, interpret: bool):
  """`pl.pallas_call(interpret=)` for a variant: False, True or TPU interpreter params."""
  if not interpret:
    return False
  if variant == "tpu":
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()
  return True


def device_tiles(size: int, variant: str) -> bool:
  """Whether a compiled block kernel tiles a block of `size` (Triton dot / Mosaic)."""
  return is_pow2(size) and size >= 16 if variant == "gpu" else size % 8 == 0


def block_sizes_supported(block_q: int, block_k: int, *, variant: str, interpret: bool) -> bool:
  """Whether the block kernel tiles `block_q x block_k` (any size in interpret mode)."""
  return interpret or (device_tiles(block_q, variant) and device_tiles(block_k, variant))


def check_block_sizes(block_q: int, block_k: int, *, variant: str, interpret: bool) -> None:
  """Raises ValueError naming the block size the compiled block kernel cannot tile."""
  for name, size in (("block_q", block_q), ("block_k", block_k)):
    if not (interpret or device_tiles(size, variant)):
      rule = "a power of two >= 16" if variant == "gpu" else "a multiple of 8"
      tiles = "Triton dot tiles" if variant == "gpu" else "TPU tiles"
      raise ValueError(
        f"{name}={size} must be {rule} for the {variant.upper()} kernel ({tiles}); "
        'use implementation="xla" for other block sizes'
      )


def resolve_backward(backward: str, *, interpret: bool) -> str:
  """The backward a kernel's custom VJP runs: "pallas" or "xla".

  "auto" is the Pallas backward where the forward compiles for a device and
  the XLA backward in interpret mode (CPU); "pallas" in interpret mode is for
  tests. Raises ValueError for anything else.
  """
  if backward not in BACKWARDS:
    raise ValueError(f"backward={backward!r} must be one of {BACKWARDS}")
  if backward == "auto":
    return "xla" if interpret else "pallas"
  return backward


class Ranges(NamedTuple):
  """Index-range side inputs of the block kernels (the `jax.nn` arguments).

  The kernel form of `gsparse._admissible.Admissible`: every field is given
  (an absent length is the full length, absent segment ids are zeros), so a
  kernel has one signature with ranges and one without.

  Attributes:
    lengths: `[B, 2]` int32 query and key lengths, in [0, T] and [0, S].
    q_seg: `[B, T]` int32 query segment ids.
    kv_seg: `[B, S]` int32 key segment ids.
  """

  lengths: jax.Array
  q_seg: jax.Array
  kv_seg: jax.Array


def range_mask(qpos, kpos, q_len, kv_len, q_seg, kv_seg, window):
  """`[bq, bk]` admissibility of one tile, the rule of `gsparse._admissible.admits`.

  Query `qpos` may attend key `kpos` iff `qpos < q_len`, `kpos < kv_len`,
  `qpos - left <= kpos <= qpos + right` (`window = (left, right)`, static, or
  None) and the segment ids agree. Shared by the Triton and Mosaic kernels.

  Args:
    qpos: `[bq, bk]` int32 query positions (an iota over the tile).
    kpos: `[bq, bk]` int32 key positions.
    q_len: scalar query length of this batch element.
    kv_len: scalar key length.
    q_seg: `[bq, 1]` segment ids of the tile's queries.
    kv_seg: `[1, bk]` segment ids of the tile's keys.
    window: static `(left, right)` or None.
  """
  ok = (qpos < q_len) & (kpos < kv_len) & (q_seg == kv_seg)
  if window is not None:
    left, right = window
    ok = ok & (kpos >= qpos - left) & (kpos <= qpos + right)
  return ok


def kernel_ranges(q_len, kv_len, segment_ids, window, *, batch: int, t: int, s: int):
  """Checks the kernels' index-range arguments: `(Ranges or None, window)`.

  Args:
    q_len: None or `[B]` integer query lengths (values are not checked: the
      public functions check them, `gsparse._admissible.build`).
    kv_len: None or `[B]` integer key lengths.
    segment_ids: None or a pair `(q [B, T], kv [B, S])` of integer ids.
    window: None or a static `(left, right)` pair of ints >= 0.
    batch: B.
    t: T (the default query length).
    s: S (the default key length).

  Raises:
    ValueError: naming the argument, for a wrong shape, dtype or window.
  """
  if window is not None:
    if not (
      isinstance(window, tuple)
      and len(window) == 2
      and all(isinstance(w, int) and not isinstance(w, bool) for w in window)
    ):
      raise ValueError(f"local_window_size={window!r} must be None or a pair (left, right) of ints")
    if min(window) < 0:
      raise ValueError(f"local_window_size={window!r} must be >= 0 (left and right)")
  q_seg = kv_seg = None
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids
  args = (
    ("query_seq_lengths", q_len, (batch,), t),
    ("key_value_seq_lengths", kv_len, (batch,), s),
    ("segment_ids (q)", q_seg, (batch, t), 0),
    ("segment_ids (kv)", kv_seg, (batch, s), 0),
  )
  if all(x is None for _, x, _, _ in args) and window is None:
    return None, None
  out = []
  for name, x, shape, full in args:
    if x is None:
      x = jnp.full(shape, full, jnp.int32)
    elif x.shape != shape or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array of shape {shape}, got {x.shape} {x.dtype}")
    out.append(x.astype(jnp.int32))
  q_len, kv_len, q_seg, kv_seg = out
  return Ranges(jnp.stack([q_len, kv_len], axis=-1), q_seg, kv_seg), window
