"""Sharded top-k attention against the unsharded call, on 4 forced host CPU devices.

Run by `sharding_test` in a fresh process (the device count is fixed when JAX
starts); it can also be run by hand:

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multidevice_checks.py [train]

With `train`, it trains the tiny model of `train_test` for 3 steps on a
2 x 2 (data x heads) mesh and on a 4 x 1 mesh and compares the losses.

Each check compares the output, the selected indices and the gradients of a
sharded call with the same call on unsharded arrays, and prints one line; any
mismatch raises. Shapes: batch 2, 16 queries, 24 keys, 4 query heads over 2
key/value heads (grouped), head dim 8, k = 5. The `jax.jit` checks also read
the compiled program: it must not gather or all-to-all a tensor as large as
one device's block of logits (XLA partitions the top-k by rows instead of
gathering the logits onto every device).
"""

import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gsparse
from gsparse import _native, sharding

SELECTIONS = ("full", "exact", "block", "lsh")
JIT_SELECTIONS = ("auto", "full", "exact", "block", "lsh")
# `%x = f32[2,4,16,24]{...} all-gather(...)`: the result shape(s) of a collective.
_COLLECTIVE = re.compile(
  r"=\s*(\S.*?)\s+(all-gather|all-gather-start|all-to-all|all-reduce|all-reduce-start"
  r"|reduce-scatter|collective-permute|collective-permute-start)\("
)
# Sharded and unsharded calls run the same per-row arithmetic, but XLA may
# vectorise a batch of 1 and of 2 differently: float32 rounding only.
TOL = dict(rtol=2e-5, atol=2e-6)


def attention(sel):
  def f(q, k, v):
    return gsparse.topk_attention(
      q, k, v, k=5, selection=sel, selection_key=jax.random.key(7), return_stats=True
    )

  return f


def value_and_grads(f, w):
  """(output, indices, tail bound, dq, dk, dv) of f, with the loss sum(output * w).

  The certificate is an output so that its band pass (exact selections) is compiled and checked.
  """

  def loss(q, k, v):
    out, stats = f(q, k, v)
    return jnp.sum(out * w), (out, stats.indices, stats.tail_mass_bound)

  def run(q, k, v):
    (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return (*aux, *grads)

  return jax.jit(run)


def compare(name, got, want):
  labels = ("output", "indices", "tail_mass_bound", "dq", "dk", "dv")
  for label, a, b in zip(labels, got, want, strict=True):
    a, b = np.asarray(a), np.asarray(b)
    if label == "indices":
      np.testing.assert_array_equal(a, b, err_msg=f"{name}: {label}")
    else:
      np.testing.assert_allclose(a, b, err_msg=f"{name}: {label}", **TOL)
  print(f"ok {name}", flush=True)


def collectives(hlo, min_size):
  """The collectives in compiled `hlo` with a result of >= `min_size` elements."""
  big = []
  for m in _COLLECTIVE.finditer(hlo):
    for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1)):
      if math.prod(int(d) for d in dims.split(",") if d) >= min_size:
        big.append(m.group(0))
  return big


def check_jit(name, f, args, w, want, mesh, spec, block, native):
  """jit of value_and_grads on NamedSharding inputs: partitioned, and equal to `want`."""
  put = lambda x: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
  args = [put(x) for x in args]
  compiled = value_and_grads(f, put(w)).lower(*args).compile()
  hlo = compiled.as_text()
  used = "gsparse_topk_f32" in hlo
  assert used == native, f"{name}: native kernel available {native}, used {used}"
  big = collectives(hlo, block)
  assert not big, f"{name}: gathers a tensor of >= {block} elements (the logits): {big}"
  got = compiled(*args)
  assert not got[0].sharding.is_fully_replicated, got[0].sharding
  compare(name, got, want)


def main():
  assert jax.device_count() == 4, jax.devices()
  mesh = sharding.make_mesh(data=2, heads=2)
  spec = sharding.attention_spec(mesh)
  # Outputs [batch, T, N(, *)]: the first three axes of each spec cover them all.
  out_spec = P(*spec[:3])
  query_spec = P(None, (sharding.DATA_AXIS, sharding.HEADS_AXIS))
  q = jax.random.normal(jax.random.key(0), (2, 16, 4, 8))
  k, v = jax.random.normal(jax.random.key(1), (2, 2, 24, 2, 8))
  w = jax.random.normal(jax.random.key(2), q.shape)
  # One device's block of the logits [batch, heads, T, S] on the 2 x 2 mesh.
  block = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1] // 4
  native = _native.available()
  print(f"native top-k: {native}", flush=True)
  wants = {sel: value_and_grads(attention(sel), w)(q, k, v) for sel in JIT_SELECTIONS}
  for sel in JIT_SELECTIONS:
    # Plain jit, inputs committed to NamedShardings: XLA partitions the call.
    name = f"jit NamedSharding {sel}"
    check_jit(name, attention(sel), (q, k, v), w, wants[sel], mesh, spec, block, native)
  for sel in SELECTIONS:
    f = attention(sel)
    want = wants[sel]
    # Batch and heads over the 2 x 2 mesh; the gradient goes through shard_map.
    shmap = jax.shard_map(f, mesh=mesh, in_specs=(spec,) * 3, out_specs=out_spec)
    lowered = value_and_grads(shmap, w).lower(q, k, v)
    used = "gsparse_topk_f32" in lowered.as_text()
    assert used == native, f"{sel}: native kernel available {native}, used {used}"
    compare(f"shard_map batch+heads {sel}", lowered.compile()(q, k, v), want)
    if sel in ("block", "lsh"):
      continue  # their top-k calls are the same two routes as "full" and "exact"
    # Queries over all 4 devices, keys and values replicated (their gradients
    # are summed over the devices by shard_map's transpose).
    qmap = jax.shard_map(f, mesh=mesh, in_specs=(query_spec, P(), P()), out_specs=query_spec)
    compare(f"shard_map queries {sel}", value_and_grads(qmap, w)(q, k, v), want)
  if native:  # the XLA route (jax.lax.top_k behind its optimization barrier)
    _native._state["ok"] = False
    for sel in ("full", "exact"):
      shmap = jax.shard_map(attention(sel), mesh=mesh, in_specs=(spec,) * 3, out_specs=out_spec)
      lowered = value_and_grads(shmap, w).lower(q, k, v)
      assert "gsparse_topk_f32" not in lowered.as_text()
      compare(f"shard_map batch+heads {sel}, XLA top-k", lowered.compile()(q, k, v), wants[sel])
    for sel in JIT_SELECTIONS:
      name = f"jit NamedSharding {sel}, XLA top-k"
      check_jit(name, attention(sel), (q, k, v), w, wants[sel], mesh, spec, block, False)
    check_export(mesh, spec, (q, k, v), w, wants["exact"])
  print("done", flush=True)


def check_export(mesh, spec, args, w, want):
  """`jax.export` of a sharded jit (XLA top-k) works under `row_partitioning(False)`.

  The partitioning callback cannot be serialized; the opt-out traces the plain
  top-k, and the exported program still gives the unsharded call's values.
  """
  put = lambda x: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
  args = [put(x) for x in args]
  f = value_and_grads(attention("exact"), put(w))
  with sharding.row_partitioning(False):
    exported = jax.export.export(f, platforms=("cpu",))(*args)
  compare("export of jit NamedSharding exact, row_partitioning(False)", exported.call(*args), want)


def train():
  """Head parallel (2 x 2) against data parallel (4 x 1) training: same losses."""
  from gsparse.train import data as data_lib
  from gsparse.train.experiment import run_training
  from tests.train_test import tiny_config

  rng = np.random.default_rng(0)
  corpus = data_lib.ByteCorpus(
    train=rng.integers(0, 256, 20_000).astype(np.uint8),
    validation=rng.integers(0, 256, 4_000).astype(np.uint8),
    train_files=(),
    validation_files=(),
    root="",
  )
  losses = {}
  for heads in (1, 2):
    cfg = tiny_config("topk", steps=3, eval_every=3, log_every=3, mesh_heads=heads)
    log = run_training(cfg, corpus=corpus)
    losses[heads] = [r["loss"] for r in log["train"]] + [log["final"]["val_bpb"]]
  np.testing.assert_allclose(losses[2], losses[1], rtol=1e-5)
  print(f"ok training, mesh_heads=2 against 1: {losses}", flush=True)
  # The query projection of a 2-head layer is split by head over the mesh.
  mesh = sharding.make_mesh(data=2, heads=2)
  kernel = jax.ShapeDtypeStruct((32, 2, 16), jnp.float32)
  tree = {"params": {"attention": {"query": {"kernel": kernel}, "mlp": {"kernel": kernel}}}}
  shard = sharding.head_parallel_shardings(tree, mesh)["params"]["attention"]
  assert shard["query"]["kernel"].spec == P(None, "heads", None), shard
  assert shard["mlp"]["kernel"].spec == P(), shard
  print("done", flush=True)


if __name__ == "__main__":
  sys.exit(train() if sys.argv[1:] == ["train"] else main())
