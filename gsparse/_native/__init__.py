"""Native CPU kernels, compiled on first use and called through XLA's FFI.

XLA:CPU's TopK runs one comparator `std::partial_sort` per row on a single
thread; at the shapes of top-k attention it costs more than the matmul that
made the logits (figures in docs/selection.md). `topk_cpu.cc` is an exact
replacement (same indices, same tie order, same NaN order) that filters each
row with vector compares and spreads rows over XLA's intra-op thread pool.

The source is compiled with the system C++ compiler against the FFI headers
that ship with jaxlib (`jax.ffi.include_dir()`), the first time a CPU
computation asks for it, into a cache directory keyed by a hash of the source,
the headers' location, the compiler and the flags (`$GSPARSE_CACHE_DIR`, else
`$XDG_CACHE_HOME/gsparse`, else `~/.cache/gsparse`). If anything is missing
(no compiler, no headers, a read-only cache, a non-CPU backend) the kernel is
reported unavailable and callers use `jax.lax.top_k`, with the same result.
`GSPARSE_NATIVE=0` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

import jax
import numpy as np

_log = logging.getLogger("gsparse")
_SOURCE = pathlib.Path(__file__).with_name("topk_cpu.cc")
_TARGET = "gsparse_topk_f32"
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> pathlib.Path:
  if os.environ.get("GSPARSE_CACHE_DIR"):
    return pathlib.Path(os.environ["GSPARSE_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "gsparse"


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _build() -> pathlib.Path:
  """Compiles the kernel (or finds it in the cache); raises with the reason on failure."""
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX)")
  include = jax.ffi.include_dir()
  if not os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
    raise RuntimeError(f"jaxlib ships no FFI headers under {include}")
  tag = hashlib.sha256()
  for part in (_SOURCE.read_bytes(), include.encode(), cxx.encode(), " ".join(_FLAGS).encode()):
    tag.update(part)
    tag.update(b"\0")
  tag.update(f"{sys.platform}-{os.uname().machine}".encode())
  out = _cache_dir() / f"topk_cpu-{tag.hexdigest()[:16]}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  # Build into a private file and rename it into place: concurrent processes
  # (pytest-xdist workers, say) may race, and each rename is atomic.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  try:
    cmd = [cxx, *_FLAGS, f"-I{include}", "-o", tmp, str(_SOURCE)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


def disabled() -> bool:
  """Whether `GSPARSE_NATIVE` turns the kernel off (0, false, no, off)."""
  return os.environ.get("GSPARSE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def _load() -> None:
  if disabled():
    raise RuntimeError("disabled by GSPARSE_NATIVE")
  path = _build()
  lib = ctypes.cdll.LoadLibrary(str(path))
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.GsparseTopKF32), platform="cpu")
  _state["path"] = path


def available() -> bool:
  """Whether the native CPU top-k is built and registered (builds it on the first call)."""
  with _lock:
    if "ok" not in _state:
      try:
        _load()
        _state["ok"] = True
        _log.info("gsparse: native CPU top-k loaded from %s", _state["path"])
      except Exception as e:  # noqa: BLE001 - any failure means "use the XLA fallback"
        _state["ok"] = False
        _state["why"] = f"{type(e).__name__}: {e}"
        _log.info("gsparse: native CPU top-k unavailable (%s); using jax.lax.top_k", e)
    return bool(_state["ok"])


def unavailable_reason() -> str | None:
  """Why `available()` is False, or None when it is True."""
  return None if available() else str(_state.get("why"))


def _varying_axes(x: jax.Array) -> tuple[str, ...]:
  """The manual mesh axes (`jax.shard_map`) over which `x` varies, sorted; () outside them."""
  typeof = getattr(jax, "typeof", None)
  if typeof is None:
    return ()
  aval = typeof(x)
  vma = getattr(aval, "vma", None)  # jax 0.6-0.9
  if vma is None:  # jax >= 0.10: the manual axis type's `varying` set
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
  return tuple(sorted(vma))


def _mark_varying(y: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  pcast = getattr(jax.lax, "pcast", None)
  if pcast is not None:
    return pcast(y, axes, to="varying")
  return jax.lax.pvary(y, axes)  # jax 0.6-0.7 spelling


def usable_for(x: jax.Array) -> bool:
  """Whether `topk_indices(x, k)` can be traced here.

  Inside `jax.shard_map` a value's type records the manual mesh axes it
  varies over; a custom call's result records none, so the result is marked
  varying like its input. A jax that cannot mark it (neither `lax.pcast` nor
  `lax.pvary`) leaves such calls to `jax.lax.top_k`.
  """
  return not _varying_axes(x) or hasattr(jax.lax, "pcast") or hasattr(jax.lax, "pvary")


def topk_indices(x: jax.Array, k: int) -> jax.Array:
  """Indices `[..., k]` of the native top-k of float32 `x` along its last axis.

  Only for a CPU computation, after `available()` and `usable_for(x)`
  returned True; the caller checks `1 <= k <= x.shape[-1]`. Under
  `jax.shard_map` the kernel runs on each device's block of rows, which is
  right because rows are independent; the last axis must not be split over
  the mesh (`topk_attention` never splits it: it is the key axis, and keys
  are whole on every device).
  """
  out = jax.ShapeDtypeStruct(x.shape[:-1] + (k,), jax.numpy.int32)
  # Rows are independent, so a vmapped call is the same kernel on more rows.
  call = jax.ffi.ffi_call(_TARGET, out, vmap_method="broadcast_all")
  idx = call(x, k=np.int64(k))
  # Some jax versions type the result like its input already, others not.
  missing = tuple(a for a in _varying_axes(x) if a not in _varying_axes(idx))
  return _mark_varying(idx, missing) if missing else idx
