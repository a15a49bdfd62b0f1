"""Row-wise index functions that XLA's SPMD partitioner splits along the leading axes.

A top-k over the last axis is independent per row, but XLA has no sharding
rule for its TopK op nor for a custom call (jax 0.10, Shardy and GSPMD, seen
in the compiled HLO): under `jax.jit` with sharded inputs it gathers the whole
operand (the logits of every batch element and head) onto each device, and
every device ranks every row. `rowwise(fn, x, k)` runs `fn(x, k)` behind
`jax.experimental.custom_partitioning` with the rule "leading axes keep the
operand's sharding, the last axis is whole": each device ranks its own rows.

On one device, inside a fully manual `jax.shard_map` and under `pmap`,
`custom_partitioning` inlines `fn` (no custom call, same program as before).
It has no `vmap` rule, so the call sits behind `jax.custom_batching.custom_vmap`:
a batch of rows is more rows, the same function on the stacked array.

The partitioning callback is a Python function: `jax.export` cannot serialize
a multi-device program that holds one, and jax puts its address into the
persistent compilation cache key. `row_partitioning(False)` (or the
environment variable `GSPARSE_ROWWISE=0`) traces `fn(x, k)` directly, as
before: what an export of a sharded program needs (docs/sharding.md).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

RowFn = Callable[[jax.Array, int], jax.Array]


def _whole_last_axis(mesh, shape) -> jax.sharding.Sharding:
  """The operand's sharding with the last axis unsplit.

  jax passes a `NamedSharding` when the computation has a mesh (inputs on
  `NamedSharding`s, or `with mesh`); otherwise, or for a sharding it cannot
  name, the operand is replicated: every device ranks every row, as XLA does
  with its own TopK.
  """
  ndim = len(shape.shape)
  s = shape.sharding
  if isinstance(s, NamedSharding) and not mesh.empty:
    spec = (tuple(s.spec) + (None,) * ndim)[: ndim - 1] + (None,)
    return NamedSharding(mesh, P(*spec))
  if s.is_fully_replicated:
    return s
  from jax._src.sharding_impls import GSPMDSharding  # noqa: PLC0415 - no public spelling

  return GSPMDSharding.get_replicated(s._device_assignment)  # noqa: SLF001


def _infer(fn, k, mesh, arg_shapes, result_shape):
  del fn, k, result_shape
  return _whole_last_axis(mesh, arg_shapes[0])


def _partition(fn, k, mesh, arg_shapes, result_shape):
  del result_shape
  s = _whole_last_axis(mesh, arg_shapes[0])
  return mesh, lambda x: fn(x, k), s, (s,)


def _call(fn: RowFn, k: int, x: jax.Array) -> jax.Array:
  return fn(x, k)


_partitioned = custom_partitioning(_call, static_argnums=(0, 1))
_partitioned.def_partition(
  partition=_partition,
  infer_sharding_from_operands=_infer,
  propagate_user_sharding=None,
  # Leading axes `...` pass through; `n` (the row) and `k` (its k slots) are
  # never split, whatever the operand's sharding says.
  sharding_rule="... n -> ... k",
  need_replication_factors=("n", "k"),
)


@functools.cache
def _batched(fn: RowFn, k: int):
  @jax.custom_batching.custom_vmap
  def call(x):
    return _partitioned(fn, k, x)

  @call.def_vmap
  def _(axis_size, in_batched, x):  # the batch axis is axis 0: more rows
    del axis_size, in_batched
    return call(x), True

  return call


_STATE = threading.local()


def _enabled() -> bool:
  on = getattr(_STATE, "enabled", None)
  if on is None:
    return os.environ.get("GSPARSE_ROWWISE", "1").strip().lower() not in ("0", "false", "no", "off")
  return on


@contextlib.contextmanager
def row_partitioning(enabled: bool) -> Iterator[None]:
  """Within the block, top-k calls traced (this thread) are partitioned by rows or not.

  `enabled=False` traces the plain top-k (XLA then gathers its operand under a
  sharded `jit`, as it does for `jax.lax.top_k`): for `jax.export` of a
  multi-device program, which cannot serialize the partitioning callback.
  It acts at trace time: wrap the `jit`/`export` call that traces. gsparse's
  inner jitted functions keep their traces in jax's caches, which do not see
  this switch, so entering and leaving the block clears them
  (`jax.clear_caches()`: later calls trace and compile again).
  """
  before = getattr(_STATE, "enabled", None)
  _STATE.enabled = bool(enabled)
  jax.clear_caches()
  try:
    yield
  finally:
    _STATE.enabled = before
    jax.clear_caches()


def rowwise(fn: RowFn, x: jax.Array, k: int) -> jax.Array:
  """`fn(x, k)`, an int32 `[..., k]` function of each row `x[..., :]` alone, partitioned by rows.

  Args:
    fn: a hashable function (module level) of `(x [..., n], k)` that treats
      every row alike and independently, e.g. the indices of its top k.
    x: `[..., n]` array, n >= 1 (at least one axis).
    k: static int, the last axis of the result.

  Returns:
    `fn(x, k)`; under `jax.jit` with sharded `x` each device computes its
    block of rows (leading axes sharded as `x`, last axis whole).
  """
  if not _enabled():
    return fn(x, k)
  return _batched(fn, k)(x)
