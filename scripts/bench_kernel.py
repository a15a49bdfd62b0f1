"""Benchmark: Pallas sparse-gather kernel vs XLA gather vs dense attention.

For every (n, k) it times, on the default backend, with T = S = n:

* `pallas`: `gsparse.sparse_gather_attention(..., implementation="pallas")`
  (Triton on GPU, Mosaic on TPU, the Pallas *interpreter* on CPU);
* `xla`: the same call with `implementation="xla"` (gathers `[n, k, H]` copies);
* `dense`: `jax.nn.dot_product_attention` over all n keys (cuDNN flash
  attention on GPU when it accepts the shapes, XLA otherwise);

optionally also forward+backward (`--grad`). It reports the median time of
`--repeats` runs (each run times enough back-to-back calls to last about
20 ms, so launch overhead is amortised), the achieved gather bandwidth (bytes
of the K and V rows the gather reads, `B*n*N*k*(H+Hv)*itemsize`, per second),
the ratio to dense, and XLA's estimate of the temporary memory of each compiled
function. On CPU the kernel runs in interpret mode: its times say nothing about
kernel speed, and the table says so.

`--block` adds the block-level kernel (`block_sparse_gather_attention`, blocks
of `--block_size` queries and keys, `k / block_size` key blocks per query
block, so every query reads k keys as in the token rows). `--tune` times the
token kernel's `BlockSizes` candidates at the first n and the k closest to
128 (forward).

  PYTHONPATH=. python scripts/bench_kernel.py                      # CPU defaults
  PYTHONPATH=. python scripts/bench_kernel.py --n=4096,16384,65536 --k=32,128,512 --grad
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

import gsparse
from gsparse import kernels

_N = flags.DEFINE_list(
  "n", None, "sequence lengths (default: 4096..65536 on GPU/TPU, 256,512 on CPU)"
)
_K = flags.DEFINE_list("k", None, "keys per query (default: 32..512 on GPU/TPU, 16,32 on CPU)")
_BATCH = flags.DEFINE_integer("batch", 1, "batch size")
_HEADS = flags.DEFINE_integer("heads", 8, "query heads")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "key/value heads")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "head dimension (default 32 on CPU)")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "dtype")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed runs per point (median reported)")
_GRAD = flags.DEFINE_bool("grad", False, "also time forward+backward")
_DENSE = flags.DEFINE_bool("dense", True, "also time jax.nn.dot_product_attention")
_OUT = flags.DEFINE_string("out", "bench_kernel.json", "JSON output path")
_BLOCK = flags.DEFINE_bool("block", False, "also time the block-level kernel")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 64, "query and key block size for --block")
_TUNE = flags.DEFINE_bool("tune", False, "time BlockSizes candidates of the token kernel")

# (block_q, block_slots, num_warps) candidates for --tune.
_TUNE_CANDIDATES = (
  (4, 64, 4),
  (1, 64, 4),
  (2, 64, 4),
  (8, 64, 4),
  (16, 64, 4),
  (4, 32, 4),
  (4, 128, 4),
  (4, 64, 2),
  (4, 64, 8),
)
_TARGET_SECONDS = 0.02  # one timed run lasts about this long


def _time(fn, args, repeats):
  """Compiles, then returns (median seconds, temp bytes or None, error or None)."""
  try:
    compiled = jax.jit(fn).lower(*args).compile()
  except Exception as e:  # noqa: BLE001 - record why a point could not run (e.g. OOM)
    return None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
  temp = None
  try:
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # noqa: BLE001 - not every backend reports it
    pass
  try:
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))  # warm-up
    first = time.perf_counter() - t0
    calls = max(1, min(100, int(_TARGET_SECONDS / max(first, 1e-6))))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      out = None
      for _ in range(calls):
        out = compiled(*args)
      jax.block_until_ready(out)
      times.append((time.perf_counter() - t0) / calls)
  except Exception as e:  # noqa: BLE001
    return None, temp, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
  return statistics.median(times), temp, None


def _dense_fn(backend, q):
  """`jax.nn.dot_product_attention`: cuDNN on GPU where it compiles, else XLA."""
  if backend == "gpu":
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    try:
      jax.jit(cudnn).lower(q, q, q).compile()
      return cudnn, "cudnn"
    except Exception as e:  # noqa: BLE001 - cuDNN may reject the shape: XLA instead
      print(f"# cuDNN attention unavailable ({type(e).__name__}); dense = XLA")
  return jax.nn.dot_product_attention, "xla"


def main(argv):
  del argv
  backend = jax.default_backend()
  on_cpu = backend not in ("gpu", "tpu")
  ns = [int(x) for x in (_N.value or (["256", "512"] if on_cpu else ["4096", "16384", "65536"]))]
  ks = [int(x) for x in (_K.value or (["16", "32"] if on_cpu else ["32", "128", "512"]))]
  head_dim = _HEAD_DIM.value if (_HEAD_DIM.present or not on_cpu) else 32
  dtype = jnp.dtype(_DTYPE.value)
  b, nh, kvh = _BATCH.value, _HEADS.value, _KV_HEADS.value
  device = jax.devices()[0]
  note = (
    "CPU: the Pallas kernel runs in INTERPRET mode; its times are NOT a speed claim"
    if on_cpu
    else f"{backend}: compiled kernel"
  )
  print(f"# device: {device.device_kind} ({backend}); {note}")
  print(f"# batch={b} heads={nh} kv_heads={kvh} head_dim={head_dim} dtype={dtype.name}")
  print("# machine may be shared: timings taken under load are noisy")
  header = (
    f"{'n':>6} {'k':>4} {'impl':>7} {'pass':>8} {'median_ms':>10} {'GB/s':>8} "
    f"{'vs_dense':>8} {'temp_MiB':>9}  note"
  )
  print(header)
  rows = []
  dense, dense_impl = _dense_fn(backend, jnp.zeros((b, 128, nh, head_dim), dtype))
  print(f"# dense = jax.nn.dot_product_attention, implementation {dense_impl}")
  passes = ("fwd", "fwd+bwd") if _GRAD.value else ("fwd",)

  result = {
    "device": device.device_kind,
    "backend": backend,
    "interpret_mode": on_cpu,
    "note": note,
    "batch": b,
    "heads": nh,
    "kv_heads": kvh,
    "head_dim": head_dim,
    "dtype": dtype.name,
    "repeats": _REPEATS.value,
    "dense_implementation": dense_impl,
    "jax": jax.__version__,
    "rows": rows,
  }

  def dump():
    """Writes the rows so far (after every n, so a run cut short keeps them)."""
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)

  def timed(n, k, impl, fn, args, gathered, dense_ms):
    """Times fn (and its gradient) and prints one row per pass."""
    for name in passes:
      sec, temp, err = _time(fn if name == "fwd" else _grad_of(fn), args, _REPEATS.value)
      ratio = None
      if sec is not None and dense_ms.get(name):
        ratio = sec * 1e3 / dense_ms[name]
      rows.append(_row(n, k, impl, name, sec, gathered, ratio, temp, err))
      _print_row(rows[-1], on_cpu)
      if impl == "dense":
        dense_ms[name] = None if sec is None else sec * 1e3

  def gathered_bytes(rows, width):  # K and V rows of `width` keys read `rows` times
    return rows * width * (2 * head_dim) * dtype.itemsize

  for n in ns:
    key = jax.random.key(n)
    kq, kk, kv, ki = jax.random.split(key, 4)
    q = jax.random.normal(kq, (b, n, nh, head_dim), dtype)
    k = jax.random.normal(kk, (b, n, kvh, head_dim), dtype)
    v = jax.random.normal(kv, (b, n, kvh, head_dim), dtype)
    dense_ms = {}
    if _DENSE.value:
      timed(n, None, "dense", dense, (q, k, v), None, dense_ms)
    for kk_ in ks:
      idx = jax.random.randint(ki, (b, n, nh, kk_), 0, n, jnp.int32)
      gathered = gathered_bytes(b * n * nh, kk_)
      for impl in ("pallas", "xla"):
        timed(n, kk_, impl, _gather_fn(impl), (q, k, v, idx), gathered, dense_ms)
      nb = kk_ // _BLOCK_SIZE.value
      if _BLOCK.value and nb >= 1:
        bs = _BLOCK_SIZE.value
        tb = -(-n // bs)
        bidx = jax.random.randint(ki, (b, tb, nh, nb), 0, tb, jnp.int32)  # T = S: tb key blocks
        block_bytes = gathered_bytes(b * tb * nh, nb * bs)  # once per query block
        for impl in ("pallas", "xla"):
          fn = _block_fn(bs, impl)
          timed(n, kk_, f"{impl}-blk", fn, (q, k, v, bidx), block_bytes, dense_ms)
    if _TUNE.value and n == ns[0]:
      tune_k = min(ks, key=lambda x: abs(x - 128))
      idx = jax.random.randint(ki, (b, n, nh, tune_k), 0, n, jnp.int32)
      gathered = gathered_bytes(b * n * nh, tune_k)
      for bq, slots, warps in _TUNE_CANDIDATES:
        sizes = kernels.BlockSizes(block_q=bq, block_slots=slots, num_warps=warps)
        sec, temp, err = _time(_gather_fn("pallas", sizes), (q, k, v, idx), _REPEATS.value)
        rows.append(
          _row(n, tune_k, "pallas", "fwd", sec, gathered, None, temp, err)
          | {"block_sizes": dataclasses.asdict(sizes)}
        )
        _print_row(rows[-1], on_cpu, note=f"tune block_q={bq} block_slots={slots} warps={warps}")
    dump()
  print(f"# wrote {_OUT.value}")


# Indices are arguments, not closure constants: XLA would constant-fold index
# arithmetic on constants, which a real top-k selection never is.
def _gather_fn(impl, block_sizes=None):
  def fn(q, k, v, idx):
    return gsparse.sparse_gather_attention(
      q, k, v, idx, assume_unique=True, implementation=impl, block_sizes=block_sizes
    )

  return fn


def _block_fn(block_size, impl):
  def fn(q, k, v, bidx):
    return gsparse.block_sparse_gather_attention(
      q, k, v, bidx, block_q=block_size, block_k=block_size, assume_unique=True, implementation=impl
    )

  return fn


def _grad_of(fn):
  def loss(q, k, v, *indices):
    return jnp.sum(fn(q, k, v, *indices).astype(jnp.float32))

  return jax.grad(loss, argnums=(0, 1, 2))


def _row(n, k, impl, name, sec, gathered, ratio, temp, err):
  return {
    "n": n,
    "k": k,
    "impl": impl,
    "pass": name,
    "median_ms": None if sec is None else sec * 1e3,
    "gather_GBps": None
    if (sec is None or gathered is None or name != "fwd")
    else gathered / sec / 1e9,
    "ratio_to_dense": ratio,
    "temp_bytes": temp,
    "error": err,
  }


def _print_row(r, on_cpu, note=""):
  fmt = lambda x, spec: "-" if x is None else format(x, spec)
  interp = on_cpu and r["impl"].startswith("pallas")
  note = r["error"] or " ".join(x for x in (note, "interpret mode" if interp else "") if x)
  temp = None if r["temp_bytes"] is None else r["temp_bytes"] / 2**20
  print(
    f"{r['n']:>6} {fmt(r['k'], 'd'):>4} {r['impl']:>7} {r['pass']:>8} "
    f"{fmt(r['median_ms'], '.3f'):>10} {fmt(r['gather_GBps'], '.3g'):>8} "
    f"{fmt(r['ratio_to_dense'], '.2f'):>8} {fmt(temp, '.1f'):>9}  {note}"
  )


if __name__ == "__main__":
  app.run(main)
