"""Spreading batched work over several devices with `jax.sharding`.

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

BATCH_AXIS = "batch"


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
