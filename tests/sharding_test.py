"""Sharding over 8 (forced host) devices: same numbers as one device, arrays really sharded.

The checks run in a separate Python process, because the device count is fixed
when JAX starts (`XLA_FLAGS=--xla_force_host_platform_device_count=8`).
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from gsparse import sharding

_ROOT = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent(
  """
  import json
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec
  import gsparse
  from gsparse import sharding, sweep

  assert jax.device_count() == 8, jax.devices()
  out = {}
  key = jax.random.key(11)
  pts = sweep.grid(n=[24], d=[4], sigma=[0.7, 1.5, 3.0], k=[3], eps=[0.05, 0.1])  # 6 points
  mesh8 = sharding.batch_mesh()
  t8 = sweep.run_sweep(pts, key=key, trials=2, progress=False)  # mesh="auto": all 8 devices
  t1 = sweep.run_sweep(pts, key=key, trials=2, mesh=None, progress=False)
  out["sweep_max_rel_diff"] = max(
    float(np.max(np.abs(t8[c] - t1[c]) / np.maximum(np.abs(t1[c]), 1e-30)))
    for c in sweep.measured_columns())
  c8 = sweep.run_sweep(pts, key=key, trials=2, common_random_numbers=True, progress=False)
  c1 = sweep.run_sweep(pts, key=key, trials=2, common_random_numbers=True, mesh=None,
                       progress=False)
  out["crn_max_rel_diff"] = max(
    float(np.max(np.abs(c8[c] - c1[c]) / np.maximum(np.abs(c1[c]), 1e-30)))
    for c in sweep.measured_columns())
  # The core of the sweep returns arrays split over the 8 devices (same static
  # shapes as the sweep above, so no new compile).
  res = sweep.measure_points(key, np.arange(8), np.full(8, 1.0), np.full(8, 0.5),
                             np.full(8, 3), np.full(8, 0.05), n=24, d=4, trials=2, mesh=mesh8)
  s = res["tail_mean"].sharding
  out["sweep_sharding"] = [isinstance(s, NamedSharding), str(s.spec),
                           len(s.device_set), s.is_fully_replicated,
                           len(res["tail_mean"].addressable_shards),
                           res["tail_mean"].addressable_shards[0].data.shape[0]]
  # Batched attention spread over the devices.
  q, k, v = jax.random.normal(jax.random.key(2), (3, 8, 16, 2, 8))
  attn = jax.jit(lambda q, k, v: gsparse.topk_attention(q, k, v, k=4))
  ref = attn(q, k, v)
  qs, ks, vs = sharding.shard_batch((q, k, v), mesh8)
  got = attn(qs, ks, vs)
  out["attn_max_abs_diff"] = float(np.max(np.abs(np.asarray(got) - np.asarray(ref))))
  out["attn_in_devices"] = len(qs.sharding.device_set)
  out["attn_out_sharding"] = [str(got.sharding.spec), len(got.sharding.device_set),
                              got.sharding.is_fully_replicated]
  print("RESULT " + json.dumps(out))
  """
)


def test_eight_devices_match_one_and_are_sharded():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
    [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300, cwd=_ROOT
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT ") :])
  # Same per-point computation on each device; XLA may vectorise a batch of 1
  # and a batch of 8 differently, so allow float32 rounding.
  assert out["sweep_max_rel_diff"] < 1e-5, out
  assert out["crn_max_rel_diff"] < 1e-5, out  # common random numbers, sharded the same way
  is_named, spec, ndev, replicated, nshards, local = out["sweep_sharding"]
  assert is_named and "batch" in spec and ndev == 8 and not replicated, out
  assert nshards == 8 and local == 1, out  # 8 points over 8 devices: one point each
  assert out["attn_max_abs_diff"] < 1e-5, out
  assert out["attn_in_devices"] == 8
  spec, ndev, replicated = out["attn_out_sharding"]
  assert "batch" in spec and ndev == 8 and not replicated, out


def _run_checks(*args):
  """Runs tests/multidevice_checks.py on 4 forced host devices; returns its stdout lines."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  script = str(_ROOT / "tests" / "multidevice_checks.py")
  proc = subprocess.run(
    [sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=900, cwd=_ROOT
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  lines = proc.stdout.splitlines()
  assert lines[-1] == "done", proc.stdout
  return lines


@pytest.mark.slow  # a second process, 4 devices, every selection; docs/sharding.md runs shard_map on 4 devices by default
def test_topk_attention_sharded_matches_unsharded():
  """shard_map (batch+heads, queries) and jit on NamedShardings, 4 devices: see multidevice_checks."""
  lines = _run_checks()
  # 5 selections under jit (no logits gathered), 4 under shard_map, "full"
  # and "exact" also query-sharded; with the native kernel also the jit ones
  # and shard_map "full" and "exact" on XLA's top-k.
  n_ok = sum(ln.startswith("ok ") for ln in lines)
  assert n_ok >= 11 and any(ln.startswith("ok jit NamedSharding lsh") for ln in lines), lines


@pytest.mark.slow
def test_head_parallel_training_matches_data_parallel():
  """The training script on a 2 x 2 (data x heads) mesh: same losses as 4 x 1."""
  lines = _run_checks("train")
  assert any(ln.startswith("ok training") for ln in lines), lines


def test_make_mesh_and_head_checks():
  n = jax.device_count()
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data", "heads") and mesh.devices.shape == (n, 1)
  assert sharding.attention_spec(mesh) == PartitionSpec("data", None, "heads", None)
  sharding.check_heads(mesh, 3)  # a heads axis of 1 divides anything
  with pytest.raises(ValueError, match="must equal the number of devices"):
    sharding.make_mesh(data=n + 1, heads=1)
  with pytest.raises(ValueError, match="heads=2 must divide the number of devices"):
    sharding.make_mesh(heads=2, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="heads must be >= 1"):
    sharding.make_mesh(heads=0)
  with pytest.raises(TypeError, match="data must be an int"):
    sharding.make_mesh(data=1.5)
  with pytest.raises(ValueError, match="must have axes"):
    sharding.attention_spec(sharding.batch_mesh())
  # A 1 x 2 mesh is only a shape here: nothing is placed on it.
  two = Mesh(np.asarray(jax.devices()[:1] * 2).reshape(1, 2), ("data", "heads"))
  with pytest.raises(ValueError, match=r"mesh_heads=2 \(the mesh's 'heads' axis\) must divide"):
    sharding.check_heads(two, 3, name="mesh_heads")
  sharding.check_heads(two, 4, name="mesh_heads")
  with pytest.raises(ValueError, match=r"mesh_heads=3 \(the mesh's 'heads' axis\) must divide"):
    sharding.check_heads(3, 4, name="mesh_heads")


def test_training_rejects_mesh_heads_not_dividing_heads():
  from gsparse.train import data as data_lib
  from gsparse.train.experiment import run_training
  from tests.train_test import tiny_config

  tiny = np.zeros(4096, np.uint8)
  corpus = data_lib.ByteCorpus(
    train=tiny, validation=tiny, train_files=(), validation_files=(), root=""
  )
  with pytest.raises(
    ValueError, match="mesh_heads=3 .* must divide the number of attention heads, 2"
  ):
    run_training(tiny_config("dense", mesh_heads=3), corpus=corpus)
  with pytest.raises(ValueError, match="mesh_heads=0 must be an int >= 1"):
    tiny_config("dense", mesh_heads=0)


def test_shard_batch_checks_divisibility():
  mesh = sharding.batch_mesh()
  n = mesh.devices.size
  x = np.zeros((n * 2, 3), np.float32)
  y = sharding.shard_batch(x, mesh)
  np.testing.assert_array_equal(np.asarray(y), x)
  if n > 1:
    with pytest.raises(ValueError, match="multiple of the"):
      sharding.shard_batch(np.zeros((n + 1, 3)), mesh)
  with pytest.raises(ValueError, match="cannot shard a scalar"):
    sharding.shard_batch(np.float32(1.0), mesh)
  with pytest.raises(ValueError, match="at least one device"):
    sharding.batch_mesh([])
  assert jax.device_count() >= 1
