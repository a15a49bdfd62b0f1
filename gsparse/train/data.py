"""Byte-level text from the running interpreter's Python standard library.

Every machine that runs gsparse has a Python standard library, so it is a
real-text corpus available offline. Files are `*.py` under
`sysconfig.get_paths()["stdlib"]` (third-party `site-packages` /
`dist-packages` excluded). A file's split is decided by a hash of its path
relative to the stdlib root, so the split does not depend on which other
files exist; files are read in hash order until a byte cap is reached.

Batches are a pure function of `(seed, step)`: a run resumed from a
checkpoint at step s sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sysconfig

import numpy as np

VOCAB_SIZE = 256  # bytes
_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")
_SEPARATOR = b"\n\x00\n"  # marks file boundaries in the concatenated stream


@dataclasses.dataclass(frozen=True)
class ByteCorpus:
  """Train and validation byte streams.

  Attributes:
    train: `[n_train]` uint8 concatenation of the training files.
    validation: `[n_val]` uint8 concatenation of the validation files.
    train_files: relative paths of the training files, in stream order.
    validation_files: relative paths of the validation files.
    root: the stdlib directory read.
  """

  train: np.ndarray
  validation: np.ndarray
  train_files: tuple[str, ...]
  validation_files: tuple[str, ...]
  root: str


def _path_hash(rel: str) -> int:
  return int.from_bytes(hashlib.sha1(rel.encode("utf-8")).digest()[:8], "big")


def stdlib_python_files(root: str | None = None) -> list[tuple[str, pathlib.Path]]:
  """`(relative_path, path)` of the stdlib `*.py` files, sorted by relative path."""
  base = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
  out = []
  for p in base.rglob("*.py"):
    rel = p.relative_to(base).as_posix()
    if any(part in _EXCLUDED_DIRS for part in rel.split("/")):
      continue
    if p.is_file():
      out.append((rel, p))
  out.sort(key=lambda t: t[0])
  return out


def load_stdlib_corpus(
  *,
  max_train_bytes: int = 4_000_000,
  max_validation_bytes: int = 400_000,
  validation_fraction: float = 0.1,
  root: str | None = None,
) -> ByteCorpus:
  """Reads the stdlib sources into train / validation byte streams.

  A file is in validation when `sha1(relative_path) mod 1000 <
  1000 * validation_fraction`. Within a split, files are taken in order of
  their hash until the split's byte cap; the last file is truncated to fit.

  Args:
    max_train_bytes: cap on the training stream.
    max_validation_bytes: cap on the validation stream.
    validation_fraction: share of files (by hash) held out, in (0, 1).
    root: directory to read instead of the stdlib (tests).

  Returns:
    A `ByteCorpus`.
  """
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction={validation_fraction} must be in (0, 1)")
  for name, v in (
    ("max_train_bytes", max_train_bytes),
    ("max_validation_bytes", max_validation_bytes),
  ):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"{name}={v!r} must be a positive int")
  files = stdlib_python_files(root)
  if not files:
    raise ValueError(f"no *.py files found under root={root or sysconfig.get_paths()['stdlib']!r}")
  files.sort(key=lambda t: (_path_hash(t[0]), t[0]))
  threshold = int(round(1000 * validation_fraction))
  splits = {"train": ([], [], max_train_bytes), "validation": ([], [], max_validation_bytes)}
  for rel, path in files:
    name = "validation" if _path_hash(rel) % 1000 < threshold else "train"
    chunks, names, cap = splits[name]
    used = sum(len(c) for c in chunks)
    if used >= cap:
      continue
    data = path.read_bytes() + _SEPARATOR
    chunks.append(data[: cap - used])
    names.append(rel)
  arrays = {}
  for name, (chunks, _, _) in splits.items():
    arrays[name] = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    if arrays[name].size == 0:
      raise ValueError(f"the {name} split is empty; check validation_fraction and root")
  return ByteCorpus(
    train=arrays["train"],
    validation=arrays["validation"],
    train_files=tuple(splits["train"][1]),
    validation_files=tuple(splits["validation"][1]),
    root=str(root or sysconfig.get_paths()["stdlib"]),
  )


def train_batch(
  data: np.ndarray, *, seed: int, step: int, batch_size: int, seq_len: int
) -> np.ndarray:
  """Random windows of the training stream for one step.

  Args:
    data: `[n]` uint8 stream with `n > seq_len + 1`.
    seed: run seed.
    step: training step; the batch is a pure function of `(seed, step)`.
    batch_size: number of windows.
    seq_len: window length; each row holds `seq_len + 1` bytes (inputs and
      next-byte targets).

  Returns:
    `[batch_size, seq_len + 1]` int32.
  """
  n = data.shape[0] - (seq_len + 1)
  if n < 1:
    raise ValueError(f"seq_len={seq_len} is too long for a stream of {data.shape[0]} bytes")
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, n + 1, size=batch_size)
  idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
  return data[idx].astype(np.int32)


def validation_batches(
  data: np.ndarray, *, num_batches: int, batch_size: int, seq_len: int
) -> np.ndarray:
  """Fixed, evenly spaced windows of the validation stream.

  Returns:
    `[num_batches, batch_size, seq_len + 1]` int32; the same for every run.
  """
  count = num_batches * batch_size
  n = data.shape[0] - (seq_len + 1)
  if n < 1:
    raise ValueError(
      f"seq_len={seq_len} is too long for a validation stream of {data.shape[0]} bytes"
    )
  starts = np.linspace(0, n, count).astype(np.int64)
  idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
  return data[idx].astype(np.int32).reshape(num_batches, batch_size, seq_len + 1)
