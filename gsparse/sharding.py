"""Spreading batched work over several devices with `jax.sharding`.

Two meshes: `batch_mesh` (1-D, for sweeps and batched attention) and
`make_mesh` (2-D, "data" x "heads", for training: data parallel plus head
parallel). `attention_spec` is the `PartitionSpec` of `[batch, seq, heads,
dim]` activations on the 2-D mesh; `topk_attention` runs under `jax.shard_map`
with it, and under `jax.jit` with `NamedSharding(mesh, attention_spec(mesh))`
inputs, where its top-k is partitioned by rows; `row_partitioning(False)` turns
that off for `jax.export` of a multi-device program (docs/sharding.md).

gsparse's batched computations (a parameter sweep, attention over a batch) are
independent along one leading axis. Placing that axis on a 1-D device mesh
with a `NamedSharding` lets `jax.jit` partition the computation with no code
change: on one device nothing changes, on a TPU slice or several GPUs every
device takes its share of the batch.

Example:
  >>> import jax, gsparse
  >>> from gsparse import sharding
  >>> mesh = sharding.batch_mesh()
  >>> q, k, v = jax.random.normal(jax.random.key(0), (3, len(mesh.devices), 16, 2, 8))
  >>> q, k, v = sharding.shard_batch((q, k, v), mesh)
  >>> out = jax.jit(lambda q, k, v: gsparse.topk_attention(q, k, v, k=4))(q, k, v)
  >>> out.shape
  (1, 16, 2, 8)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gsparse._rowwise import row_partitioning

__all__ = [
  "BATCH_AXIS",
  "DATA_AXIS",
  "HEADS_AXIS",
  "attention_spec",
  "batch_mesh",
  "batch_sharding",
  "check_heads",
  "head_parallel_shardings",
  "make_mesh",
  "row_partitioning",
  "shard_batch",
]

BATCH_AXIS = "batch"
DATA_AXIS = "data"
HEADS_AXIS = "heads"


def batch_mesh(devices: Sequence[jax.Device] | None = None, *, axis_name: str = BATCH_AXIS) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of the default backend).

  Args:
    devices: the devices to use, in order; at least one.
    axis_name: name of the mesh axis.

  Returns:
    A `jax.sharding.Mesh` with one axis of `len(devices)` devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("devices must contain at least one device, got an empty sequence")
  if not isinstance(axis_name, str) or not axis_name:
    raise TypeError(f"axis_name must be a non-empty str, got {axis_name!r}")
  return Mesh(np.asarray(devices), (axis_name,))


def batch_sharding(mesh: Mesh, ndim: int, *, axis: int = 0) -> NamedSharding:
  """`NamedSharding` that splits dimension `axis` of an `ndim`-array over the mesh axis."""
  if len(mesh.axis_names) != 1:
    raise ValueError(f"mesh must be 1-D, got axis names {mesh.axis_names}")
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis={axis} is out of range for an array with ndim={ndim}")
  spec = [None] * ndim
  spec[axis % ndim] = mesh.axis_names[0]
  return NamedSharding(mesh, PartitionSpec(*spec))


def shard_batch(tree: Any, mesh: Mesh | None = None, *, axis: int = 0) -> Any:
  """Places every array leaf of `tree` with dimension `axis` split over `mesh`.

  Args:
    tree: a pytree of arrays that share the size of dimension `axis`.
    mesh: a 1-D mesh (default: `batch_mesh()` over all devices).
    axis: the batch dimension.

  Returns:
    The same pytree with leaves committed to their `NamedSharding`.

  Raises:
    ValueError: if a leaf's batch size is not a multiple of the number of
      devices (pad the batch first).
  """
  mesh = batch_mesh() if mesh is None else mesh
  size = mesh.devices.size

  def put(x):
    x = jax.numpy.asarray(x)
    if x.ndim == 0:
      raise ValueError(f"cannot shard a scalar along axis={axis}; got shape {x.shape}")
    if x.shape[axis] % size:
      raise ValueError(
        f"batch dimension {axis} of shape {x.shape} must be a multiple of the "
        f"{size} devices of the mesh"
      )
    return jax.device_put(x, batch_sharding(mesh, x.ndim, axis=axis))

  return jax.tree.map(put, tree)


def _positive_int(value: Any, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r}")
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}")
  return int(value)


def make_mesh(
  *,
  data: int | None = None,
  heads: int = 1,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """A 2-D `("data", "heads")` mesh: data parallel times head parallel.

  On a TPU pod slice `make_mesh(heads=4)` puts 4 chips on the heads axis and
  the rest on the data axis. The axes are `Auto` (jit's partitioner places
  the work; `jax.shard_map` makes them manual inside its body).

  Args:
    data: size of the data axis (default: `len(devices) // heads`).
    heads: size of the heads axis; must divide the number of attention heads
      (and key/value heads) of whatever runs on the mesh (`check_heads`).
    devices: the devices (default: all devices of the default backend);
      exactly `data * heads` of them.

  Returns:
    A `jax.sharding.Mesh` with axes `("data", "heads")`.
  """
  devices = list(jax.devices() if devices is None else devices)
  heads = _positive_int(heads, "heads")
  if data is None:
    if len(devices) % heads:
      raise ValueError(f"heads={heads} must divide the number of devices, {len(devices)}")
    data = len(devices) // heads
  data = _positive_int(data, "data")
  if data * heads != len(devices):
    raise ValueError(
      f"data * heads = {data} * {heads} must equal the number of devices, {len(devices)}"
    )
  shape, names = (data, heads), (DATA_AXIS, HEADS_AXIS)
  axis_type = getattr(jax.sharding, "AxisType", None)
  try:  # jax's own device order follows the physical topology (TPU torus)
    if axis_type is not None:
      return jax.make_mesh(shape, names, axis_types=(axis_type.Auto,) * 2, devices=devices)
    return jax.make_mesh(shape, names, devices=devices)
  except (TypeError, ValueError, AttributeError):  # older jax: plain row-major order
    return Mesh(np.asarray(devices).reshape(shape), names)


def attention_spec(mesh: Mesh | None = None) -> PartitionSpec:
  """`PartitionSpec` of `[batch, seq, heads, dim]` arrays on a `make_mesh` mesh.

  Batch over "data", heads over "heads", sequence and feature whole: every
  device holds all keys of its heads, which is what top-k selection needs.
  """
  if mesh is not None and not {DATA_AXIS, HEADS_AXIS} <= set(mesh.axis_names):
    raise ValueError(
      f"mesh must have axes {(DATA_AXIS, HEADS_AXIS)} (see make_mesh), got {mesh.axis_names}"
    )
  return PartitionSpec(DATA_AXIS, None, HEADS_AXIS, None)


def check_heads(mesh: Mesh | int, num_heads: int, *, name: str = "heads") -> None:
  """Raises ValueError naming `name` if the heads axis does not divide `num_heads`.

  Args:
    mesh: a `make_mesh` mesh, or the size of its heads axis.
    num_heads: the number of attention heads (check key/value heads too).
    name: the argument the heads axis size came from, for the message.
  """
  if isinstance(mesh, Mesh):
    mesh = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True)).get(HEADS_AXIS, 1)
  if num_heads % mesh:
    raise ValueError(
      f"{name}={mesh} (the mesh's '{HEADS_AXIS}' axis) must divide the number of "
      f"attention heads, {num_heads}"
    )


# Flax linen `MultiHeadDotProductAttention` parameters and the axis of each
# that indexes heads: query/key/value kernels [features, heads, head_dim] and
# biases [heads, head_dim]; the output kernel [heads, head_dim, features].
_HEAD_AXIS = {
  ("query", "kernel"): 1,
  ("key", "kernel"): 1,
  ("value", "kernel"): 1,
  ("query", "bias"): 0,
  ("key", "bias"): 0,
  ("value", "bias"): 0,
  ("out", "kernel"): 0,
}


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def head_parallel_shardings(tree: Any, mesh: Mesh) -> Any:
  """`NamedSharding`s that split the attention parameters of `tree` by head.

  Head parallelism (Megatron style) for flax linen
  `MultiHeadDotProductAttention`: the query/key/value projections and the
  output projection are split along their heads axis over the mesh's "heads"
  axis, every other leaf is replicated. Given parameters placed so, `jax.jit`
  computes each device's heads only (queries, keys and values come out split
  by head, so does top-k attention) and sums the output projection over the
  heads axis. Optimizer states that mirror the parameter tree (Adam's moments)
  match the same paths and are split the same way.

  Args:
    tree: a pytree of arrays or `jax.ShapeDtypeStruct`s (parameters, a
      training state).
    mesh: a `make_mesh` mesh.

  Returns:
    A pytree of `NamedSharding`s with the structure of `tree`.
  """
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
  heads = sizes.get(HEADS_AXIS, 1)

  def spec(path, leaf):
    names = _path_names(path)
    axis = _HEAD_AXIS.get(names[-2:]) if len(names) >= 2 else None
    ndim = len(getattr(leaf, "shape", ()))
    if heads == 1 or axis is None or axis >= ndim:
      return NamedSharding(mesh, PartitionSpec())
    if leaf.shape[axis] % heads:
      raise ValueError(
        f"mesh heads axis of size {heads} must divide the {leaf.shape[axis]} heads of "
        f"parameter {'/'.join(names)} (shape {leaf.shape})"
      )
    parts = [None] * ndim
    parts[axis] = HEADS_AXIS
    return NamedSharding(mesh, PartitionSpec(*parts))

  return jax.tree_util.tree_map_with_path(spec, tree)
