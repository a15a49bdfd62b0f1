"""End-to-end benchmark of `gsparse.topk_attention` against dense attention.

Dense is `jax.nn.dot_product_attention`: cuDNN on a GPU for bfloat16 and
float16 where it compiles, XLA elsewhere. Top-k attention is timed end to end
(selection, gather and, for forward+backward, the gradient with respect to
q, k and v of `sum(out * cotangent)`) for each method:

* `default`: `topk_attention` without a `selection` argument (whatever the
  library's default is; the JSON records its name);
* `full`, `exact`, `block`, `lsh`: the named selections with their default
  configs;
* `certified`: `gsparse.flax.sparse_attention` with
  `CertifiedK(ks=(k // 4, k // 2, k), tol=0.05)` (the smallest candidate whose
  certified tail mass is at most 0.05).

Each (method, mode, causal, n, k) point is compiled first (compile time
recorded apart), then timed in interleaved pairs (dense, method, dense,
method, ...): the ratio is the median of the per-pair ratios, robust to the
slow load drifts of a shared machine. Memory: XLA's `memory_analysis()` of each
compiled program (arguments, outputs, temporaries; CPU and GPU), and on devices
that report it `memory_stats()["peak_bytes_in_use"]` after the point (the
process-wide peak so far: JAX cannot reset it between methods).

Results go to `docs/results/<date>-bench-attention-<device>/` (or `--out_dir`):
`bench_attention.json` (one record per point), `bench_attention.png` (log-log
time against n, one line per method, one panel per mode and causality) and
`table.md` (the ratio table, also printed).

  PYTHONPATH=. python scripts/bench_attention.py --preset=smoke
  PYTHONPATH=. python scripts/bench_attention.py --preset=cpu --methods=default,exact --k=64
  PYTHONPATH=. python scripts/bench_attention.py --preset=gpu --dry_run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from gsparse import benchmark as bm
from gsparse import topk as topk_lib

METHODS = ("default", "full", "exact", "block", "lsh", "certified")
MODES = ("fwd", "fwd+bwd")
CERTIFIED_TOL = 0.05


@dataclasses.dataclass(frozen=True)
class Preset:
  """A benchmark grid; `long_heads` heads are used from `n >= long_n` on."""

  ns: tuple[int, ...]
  ks: tuple[int, ...]
  heads: int
  head_dim: int
  dtype: str
  methods: tuple[str, ...]
  causal: tuple[bool, ...] = (False, True)
  modes: tuple[str, ...] = MODES
  pairs: int = 5
  long_n: int = 0
  long_heads: int = 0


PRESETS = {
  "cpu": Preset(
    ns=(2048, 4096, 8192, 16384),
    ks=(32, 64, 128, 256, 512),
    heads=4,
    head_dim=64,
    dtype="float32",
    methods=METHODS,
    long_n=8192,
    long_heads=1,
  ),
  "gpu": Preset(
    ns=(4096, 8192, 16384, 32768, 65536),
    ks=(32, 64, 128, 256, 512),
    heads=128,
    head_dim=64,
    dtype="bfloat16",
    methods=METHODS,
  ),
  "smoke": Preset(
    ns=(128, 256),
    ks=(16,),
    heads=2,
    head_dim=16,
    dtype="float32",
    methods=("default", "certified"),
    causal=(True,),
    pairs=3,
  ),
}


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(",") if x)


def _bools(text: str) -> tuple[bool, ...]:
  table = {"true": True, "1": True, "false": False, "0": False}
  try:
    return tuple(table[x.strip().lower()] for x in text.split(",") if x)
  except KeyError as e:
    raise ValueError(f"--causal={text!r} must list true/false values") from e


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  """The command line; grid flags left unset take the preset's values."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="gpu on a GPU, else cpu")
  p.add_argument("--methods", default=None, help=f"comma list from {METHODS}")
  p.add_argument("--modes", default=None, help="comma list from fwd,fwd+bwd")
  p.add_argument("--causal", default=None, help="comma list of true/false")
  p.add_argument("--n", default=None, help="sequence lengths (T = S = n)")
  p.add_argument("--k", default=None, help="keys kept per query")
  p.add_argument("--heads", type=int, default=None, help="heads H (query = key/value heads)")
  p.add_argument("--long_n", type=int, default=None, help="from this n on, use --long_heads")
  p.add_argument("--long_heads", type=int, default=None, help="heads for n >= --long_n")
  p.add_argument("--head_dim", type=int, default=None, help="head dimension d")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
  p.add_argument("--pairs", type=int, default=None, help="timed (dense, method) pairs per point")
  p.add_argument("--causal_only_from", type=int, default=0, help="n from which only causal runs")
  p.add_argument("--fwd_only_from", type=int, default=0, help="n from which only fwd runs")
  p.add_argument("--budget_s", type=float, default=0.0, help="start no point after this (0: none)")
  p.add_argument("--out_dir", default=None, help="default docs/results/<date>-bench-attention-*")
  p.add_argument("--no_figure", action="store_true", help="skip the figure")
  p.add_argument("--dry_run", action="store_true", help="print the grid, trace one point, exit")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def resolve_grid(args: argparse.Namespace) -> dict[str, Any]:
  """The grid: the preset's values overridden by the flags given; checks them."""
  preset = PRESETS[args.preset or ("gpu" if jax.default_backend() == "gpu" else "cpu")]
  pick = lambda flag, value, conv=None: value if flag is None else (conv(flag) if conv else flag)
  grid = {
    "preset": args.preset or ("gpu" if jax.default_backend() == "gpu" else "cpu"),
    "methods": pick(args.methods, preset.methods, lambda s: tuple(s.split(","))),
    "modes": pick(args.modes, preset.modes, lambda s: tuple(s.split(","))),
    "causal": pick(args.causal, preset.causal, _bools),
    "ns": pick(args.n, preset.ns, _ints),
    "ks": pick(args.k, preset.ks, _ints),
    "heads": pick(args.heads, preset.heads),
    "long_n": pick(args.long_n, preset.long_n),
    "long_heads": pick(args.long_heads, preset.long_heads),
    "head_dim": pick(args.head_dim, preset.head_dim),
    "dtype": pick(args.dtype, preset.dtype),
    "pairs": pick(args.pairs, preset.pairs),
    "causal_only_from": args.causal_only_from,
    "fwd_only_from": args.fwd_only_from,
  }
  for name, allowed in (("methods", METHODS), ("modes", MODES)):
    bad = [m for m in grid[name] if m not in allowed]
    if bad or not grid[name]:
      raise ValueError(f"--{name}={','.join(grid[name])!r}: each must be one of {allowed}")
  for name in ("ns", "ks"):
    if not grid[name] or min(grid[name]) < 1:
      raise ValueError(f"--{name[:-1]} must list positive ints, got {grid[name]}")
  for name in ("heads", "head_dim", "pairs"):
    if grid[name] < 1:
      raise ValueError(f"--{name}={grid[name]} must be >= 1")
  return grid


def heads_at(grid: dict[str, Any], n: int) -> int:
  if grid["long_n"] and grid["long_heads"] and n >= grid["long_n"]:
    return grid["long_heads"]
  return grid["heads"]


def points(grid: dict[str, Any]) -> list[dict[str, Any]]:
  """Every (n, causal, mode, method, k) point of the grid, in run order."""
  out = []
  for n in grid["ns"]:
    causals = grid["causal"]
    if grid["causal_only_from"] and n >= grid["causal_only_from"]:
      causals = tuple(c for c in causals if c) or causals
    for causal in causals:
      modes = grid["modes"]
      if grid["fwd_only_from"] and n >= grid["fwd_only_from"]:
        modes = tuple(m for m in modes if m == "fwd") or modes
      for mode in modes:
        for method in grid["methods"]:
          for k in grid["ks"]:
            out.append(
              {"n": n, "causal": causal, "mode": mode, "method": method, "k": k,
               "heads": heads_at(grid, n)}
            )  # fmt: skip
  return out


def method_fn(method: str, *, k: int, causal: bool, seed: int = 0):
  """`(q, k, v) -> out` for a method name of `METHODS` or "dense" (XLA)."""
  if method == "dense":
    return lambda q, kk, v: jax.nn.dot_product_attention(q, kk, v, is_causal=causal)
  if method == "certified":
    from gsparse.flax import CertifiedK, sparse_attention

    policy = CertifiedK(ks=(max(1, k // 4), max(1, k // 2), k), tol=CERTIFIED_TOL)
    return lambda q, kk, v: sparse_attention(q, kk, v, policy=policy, is_causal=causal)
  kwargs: dict[str, Any] = {} if method == "default" else {"selection": method}
  if method == "lsh":
    kwargs["selection_key"] = jax.random.key(seed)
  return lambda q, kk, v: topk_lib.topk_attention(q, kk, v, k=k, is_causal=causal, **kwargs)


def with_grad(fn):
  """`(q, k, v, ct) -> (dq, dk, dv)`: the gradient of `sum(fn(q, k, v) * ct)`."""

  def loss(q, kk, v, ct):
    return jnp.sum(fn(q, kk, v).astype(jnp.float32) * ct)

  return jax.grad(loss, argnums=(0, 1, 2))


def as_mode(fn, mode: str):
  """`fn` taking `(q, k, v, ct)` in both modes (forward ignores `ct`)."""
  return with_grad(fn) if mode == "fwd+bwd" else (lambda q, kk, v, ct: fn(q, kk, v))


def dense_fn(causal: bool, dtype: str, example):
  """(`fn`, implementation name): cuDNN on GPU for 16-bit dtypes where it compiles, else XLA."""
  if jax.default_backend() == "gpu" and dtype in ("bfloat16", "float16"):

    def cudnn(q, kk, v):
      return jax.nn.dot_product_attention(q, kk, v, is_causal=causal, implementation="cudnn")

    try:
      jax.jit(cudnn).lower(*example).compile()
      return cudnn, "cudnn"
    except Exception as e:  # noqa: BLE001 -- cuDNN may reject the shape: XLA instead
      print(f"# cuDNN attention unavailable ({type(e).__name__}); dense = XLA", file=sys.stderr)
  return method_fn("dense", k=1, causal=causal), "xla"


def make_inputs(seed: int, n: int, heads: int, d: int, dtype: str):
  """q, k, v `[1, n, heads, d]` standard normal and a float32 cotangent of the same shape."""
  kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
  shape = (1, n, heads, d)
  q, kk_, v = (jax.random.normal(x, shape, jnp.dtype(dtype)) for x in (kq, kk, kv))
  return q, kk_, v, jax.random.normal(kc, shape, jnp.float32)


def _compile(fn, args):
  """(compiled, seconds to lower and compile, error string or None)."""
  t0 = time.perf_counter()
  try:
    compiled = jax.jit(fn).lower(*args).compile()
  except Exception as e:  # noqa: BLE001 -- record why a point could not run (e.g. OOM)
    return None, time.perf_counter() - t0, _err(e)
  return compiled, time.perf_counter() - t0, None


def _err(e: Exception) -> str:
  first = (str(e).splitlines() or [""])[0]
  return f"{type(e).__name__}: {first[:160]}"


def _peak_device_bytes() -> int | None:
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 -- CPU devices do not report it
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


def _dense_for(cache: dict, pt: dict, grid: dict, args: tuple) -> dict:
  """Compiles dense attention once per (causal, mode) at the current inputs."""
  key = (pt["causal"], pt["mode"])
  if key not in cache:
    fn, impl = dense_fn(pt["causal"], grid["dtype"], args[:3])
    compiled, secs, err = _compile(as_mode(fn, pt["mode"]), args)
    mem = None if compiled is None else bm.xla_memory(compiled)
    cache[key] = {"compiled": compiled, "impl": impl, "compile_s": secs, "mem": mem, "error": err}
  return cache[key]


def run_point(pt: dict, grid: dict, args: tuple, dense: dict, seed: int) -> dict[str, Any]:
  """Compiles and times one point against dense in interleaved pairs; one JSON record."""
  fn = method_fn(pt["method"], k=pt["k"], causal=pt["causal"], seed=seed)
  compiled, secs, err = _compile(as_mode(fn, pt["mode"]), args)
  rec = pt | {
    "head_dim": grid["head_dim"],
    "dtype": grid["dtype"],
    "batch": 1,
    "dense_implementation": dense["impl"],
    "compile_s": {"dense": dense["compile_s"], "method": secs},
    "xla_memory": {
      "dense": dense["mem"],
      "method": None if compiled is None else bm.xla_memory(compiled),
    },
    "pairs": grid["pairs"],
    "dense_s": None,
    "method_s": None,
    "dense_median_s": None,
    "method_median_s": None,
    "ratio": None,
    "error": dense["error"] and f"dense: {dense['error']}" or err,
  }
  if pt["method"] == "default":
    rec["default_selection"] = getattr(topk_lib, "DEFAULT_SELECTION", None)
  if rec["error"] is None:
    try:
      res = bm.interleaved_pairs(dense["compiled"], compiled, args, grid["pairs"])
    except Exception as e:  # noqa: BLE001 -- e.g. out of memory at run time
      rec["error"] = _err(e)
    else:
      rec |= {
        "dense_s": res["first_s"],
        "method_s": res["second_s"],
        "dense_median_s": res["first_median_s"],
        "method_median_s": res["second_median_s"],
        "ratio": res["ratio"],
      }
  rec["device_peak_bytes_in_use"] = _peak_device_bytes()
  return rec


def run(grid: dict, *, seed: int = 0, budget_s: float = 0.0, on_record=None) -> list[dict]:
  """Runs every point of the grid; `on_record(records)` after each (to save progress)."""
  records: list[dict] = []
  t0 = time.perf_counter()
  current, args, dense_cache = None, None, {}
  for pt in points(grid):
    if budget_s and time.perf_counter() - t0 > budget_s:
      print(f"# budget of {budget_s:.0f} s spent: the remaining points are not run")
      break
    if current != (pt["n"], pt["heads"]):
      current, args, dense_cache = (pt["n"], pt["heads"]), None, {}  # free the last inputs first
      args = make_inputs(seed, pt["n"], pt["heads"], grid["head_dim"], grid["dtype"])
    dense = _dense_for(dense_cache, pt, grid, args)
    rec = run_point(pt, grid, args, dense, seed)
    records.append(rec)
    print(_line(rec), flush=True)
    if on_record is not None:
      on_record(records)
  return records


def _ms(x):
  return "-" if x is None else f"{x * 1e3:.2f}"


def _line(rec: dict) -> str:
  ratio = "-" if rec["ratio"] is None else f"{rec['ratio']:.2f}x"
  return (
    f"n={rec['n']:>6} H={rec['heads']:>3} k={rec['k']:>4} causal={rec['causal']!s:5} "
    f"{rec['mode']:7} {rec['method']:9} dense={_ms(rec['dense_median_s']):>9} ms "
    f"method={_ms(rec['method_median_s']):>9} ms ratio={ratio:>7} "
    f"compile={rec['compile_s']['method']:.1f} s {rec['error'] or ''}"
  )


def ratio_table(records: list[dict]) -> str:
  """Markdown: one row per (method, mode, causal, k), one column per n; cells `ratio x`."""
  ns = sorted({r["n"] for r in records})
  heads = {r["n"]: r["heads"] for r in records}
  rows: dict[tuple, dict[int, str]] = {}
  for r in records:
    key = (r["method"], r["mode"], "yes" if r["causal"] else "no", r["k"])
    rows.setdefault(key, {})[r["n"]] = "error" if r["ratio"] is None else f"{r['ratio']:.2f}x"
  head = "| method | mode | causal | k | " + " | ".join(f"n={n} (H={heads[n]})" for n in ns) + " |"
  lines = [head, "|" + "---|" * (4 + len(ns))]
  for key, cells in rows.items():
    lines.append("| " + " | ".join(map(str, key)) + " | ")
    lines[-1] += " | ".join(cells.get(n, "") for n in ns) + " |"
  return "\n".join(lines)


def device_slug() -> str:
  """ "cpu", or the device kind in lower case with dashes (e.g. "nvidia-h200")."""
  if jax.default_backend() == "cpu":
    return "cpu"
  return re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-")


def header(grid: dict, argv: list[str] | None) -> dict[str, Any]:
  """What every result file states: date, versions, device and command line."""
  import jaxlib

  dev = jax.devices()[0]
  return {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "jax_version": jax.__version__,
    "jaxlib_version": jaxlib.__version__,
    "backend": jax.default_backend(),
    "device_kind": dev.device_kind,
    "device_count": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "command_line": " ".join(sys.argv[:1] + list(sys.argv[1:] if argv is None else argv)),
    "grid": grid,
    "timing": "interleaved pairs (dense, method); ratio = median of per-pair method/dense",
    "device_peak_note": "peak_bytes_in_use is the process-wide peak up to the point (no reset)",
  }


def figure(records: list[dict], path: str) -> None:
  """Log-log time against n: one panel per (mode, causal), one line per method (and k)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = sorted({(r["mode"], r["causal"]) for r in records}, key=lambda p: (p[1], p[0]))
  ks = {r["k"] for r in records}
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
  for ax, (mode, causal) in zip(axes[0], panels, strict=True):
    sub = [r for r in records if (r["mode"], r["causal"]) == (mode, causal) and r["ratio"]]
    lines: dict[str, dict[int, list[float]]] = {}
    for r in sub:
      label = r["method"] if len(ks) == 1 else f"{r['method']} k={r['k']}"
      lines.setdefault(label, {}).setdefault(r["n"], []).append(r["method_median_s"])
      impl = r["dense_implementation"]
      lines.setdefault(f"dense ({impl})", {}).setdefault(r["n"], []).append(r["dense_median_s"])
    for label, by_n in sorted(lines.items()):
      ns = sorted(by_n)
      ts = [statistics.median(by_n[n]) for n in ns]  # dense: median over its records
      style = {"color": "black", "linewidth": 2} if label.startswith("dense") else {}
      ax.loglog(ns, ts, marker="o", label=label, **style)
    heads = {r["n"]: r["heads"] for r in sub}  # H changes with n under --long_n: say so
    ax.set_xticks(sorted(heads), [f"{n}\nH={h}" for n, h in sorted(heads.items())])
    ax.set_xticks([], minor=True)
    ax.set_title(f"{mode}, {'causal' if causal else 'not causal'}")
    ax.set_xlabel("n (T = S)")
    ax.set_ylabel("median time per call, all H heads (s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def dry_run(grid: dict, seed: int) -> None:
  """Prints the grid and traces every method once at the smallest n (shapes only, no run)."""
  pts = points(grid)
  print(f"# {len(pts)} points; grid: {json.dumps(grid)}")
  for pt in pts:
    print(f"  n={pt['n']} H={pt['heads']} causal={pt['causal']} {pt['mode']} {pt['method']} "
          f"k={pt['k']}")  # fmt: skip
  n = min(grid["ns"])
  shape = (1, n, heads_at(grid, n), grid["head_dim"])
  spec = [jax.ShapeDtypeStruct(shape, jnp.dtype(grid["dtype"]))] * 3
  spec.append(jax.ShapeDtypeStruct(shape, jnp.float32))
  for method in ("dense", *grid["methods"]):
    for mode in grid["modes"]:
      k = min(grid["ks"])
      out = jax.eval_shape(as_mode(method_fn(method, k=k, causal=True, seed=seed), mode), *spec)
      print(f"# traced {method} {mode} at n={n}: {jax.tree.map(lambda x: x.shape, out)}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark from command-line flags; returns what it wrote to the JSON file."""
  args = parse_args(argv)
  grid = resolve_grid(args)
  if args.dry_run:
    dry_run(grid, args.seed)
    return {"grid": grid, "points": points(grid)}
  result = header(grid, argv)
  date = result["date"][:10]
  out_dir = args.out_dir or os.path.join(
    "docs", "results", f"{date}-bench-attention-{device_slug()}"
  )
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, "bench_attention.json")
  print(f"# {result['device_kind']} ({result['backend']}), jax {result['jax_version']}; {out_dir}")

  def save(records):
    with open(json_path, "w") as f:
      json.dump(result | {"records": records}, f, indent=1)

  records = run(grid, seed=args.seed, budget_s=args.budget_s, on_record=save)
  save(records)
  table = ratio_table(records)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(table + "\n")
  if not args.no_figure and records:
    figure(records, os.path.join(out_dir, "bench_attention.png"))
  print("\nratio = median over pairs of (method time / dense time):\n")
  print(table)
  return result | {"records": records, "out_dir": out_dir}
