"""`python -m gsparse.atlas`: the atlas of a training-experiment checkpoint on a text file.

Writes `atlas.md`, `atlas.json` and the PNG figures to `--out`. The model is
the training experiment's byte-level `TransformerLM`, run with dense
attention; the text's bytes are cut into `--batch_size` windows of
`--seq_len` bytes for the atlas and `--validation_batch_size` further
windows for the validation of the recommended config.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shlex
import sys
import time

import numpy as np
from absl import flags

from gsparse.atlas.measure import Atlas, check_tolerances, measure_model
from gsparse.atlas.recommend import recommend, validate
from gsparse.atlas.record import linen_runner
from gsparse.atlas.report import markdown, write_figures


def define_flags() -> None:
  flags.DEFINE_string("checkpoint", None, "Training-experiment workdir (its orbax checkpoints/).")
  flags.DEFINE_string("text", None, "Text file whose bytes the model reads.")
  flags.DEFINE_string("out", "atlas", "Output directory of the report.")
  flags.DEFINE_list("tolerances", ["0.01", "0.05", "0.1"], "Tail-mass tolerances, each in (0, 1).")
  flags.DEFINE_float("tolerance", 0.05, "Tolerance of the tables, figures and recommendation.")
  flags.DEFINE_integer("seq_len", 0, "Bytes per window (0: the model's max_len).")
  flags.DEFINE_integer("batch_size", 4, "Windows measured by the atlas.")
  flags.DEFINE_integer("validation_batch_size", 4, "Held-aside windows of the validation.")
  flags.DEFINE_integer("chunk", 128, "Query rows per chunk of the recording.")
  flags.DEFINE_float("quantile", 0.99, "Fraction of rows the recommended k must serve.")
  flags.DEFINE_integer("repeats", 5, "Interleaved timed calls of the validation.")
  flags.mark_flags_as_required(["checkpoint", "text"])


def _load_training_checkpoint(path: str | os.PathLike):
  """`(TrainConfig, variables, steps)` of a training-experiment workdir's newest checkpoint."""
  from gsparse.train.experiment import checkpoint_log, load_params

  config, variables = load_params(path)
  train = checkpoint_log(path)["train"]
  return config, variables, (train[-1]["step"] + 1 if train else 0)


def text_windows(path: str, *, seq_len: int, num: int) -> np.ndarray:
  """`[num, seq_len]` int32 consecutive byte windows from the start of a file."""
  data = np.frombuffer(pathlib.Path(path).read_bytes(), np.uint8)
  if data.size < num * seq_len:
    raise ValueError(f"text={path!r} has {data.size} bytes, fewer than {num} x {seq_len}")
  return data[: num * seq_len].reshape(num, seq_len).astype(np.int32)


def atlas_json(atlas: Atlas, tol_index: int) -> dict:
  """Per layer and head summary numbers of an atlas (JSON-ready)."""
  layers = []
  for x in atlas.layers:
    fits = None if x.fits is None else [f._asdict() for f in x.fits[tol_index]]
    for f in fits or []:
      f["lengths"], f["k"] = f["lengths"].tolist(), f["k"].tolist()
    layers.append(
      {
        "path": x.path,
        "support": x.support().tolist(),
        "needed_k_q50": x.needed_quantile(tol_index, 0.5).tolist(),
        "needed_k_q99": x.needed_quantile(tol_index, 0.99).tolist(),
        "certified_gap": x.certified_gap(tol_index).tolist(),
        "predicted_weights": x.predicted_weights.tolist(),
        "fits": fits,
        "phases": x.phases(tol_index),
      }
    )
  return {
    "seq_len": atlas.seq_len,
    "tolerance": atlas.tolerances[tol_index],
    "layers": layers,
    "skipped": atlas.skipped,
    "spearman": atlas.spearman,
  }


def main(fl) -> str:
  """Runs the atlas of `fl.checkpoint` on `fl.text`; returns the report's path."""
  import jax

  from gsparse.train.experiment import cross_entropy
  from gsparse.train.model import AttentionSpec, TransformerLM, layer_specs

  tolerances = check_tolerances([float(t) for t in fl.tolerances])
  config, variables, steps = _load_training_checkpoint(fl.checkpoint)
  mc = config.model
  seq_len = fl.seq_len or mc.max_len
  if seq_len > mc.max_len:
    raise ValueError(f"seq_len={seq_len} is longer than the model's max_len={mc.max_len}")
  model = TransformerLM(mc, layer_specs(AttentionSpec("dense"), mc.num_layers, []))
  runner = linen_runner(model, variables, max_len=mc.max_len)
  tokens = text_windows(fl.text, seq_len=seq_len, num=fl.batch_size + fl.validation_batch_size)
  t0 = time.perf_counter()
  atlas = measure_model(runner, tokens[: fl.batch_size], tolerances=tolerances, chunk=fl.chunk)
  config_k = recommend(atlas, tolerance=fl.tolerance, quantile=fl.quantile)
  check = validate(
    runner,
    config_k,
    tokens[fl.batch_size :],
    loss_fn=lambda y, a: cross_entropy(y[:, :-1], a[0][:, 1:]),
    repeats=fl.repeats,
  )
  os.makedirs(fl.out, exist_ok=True)
  figures = write_figures(atlas, fl.out, tolerance=fl.tolerance)
  command = " ".join(shlex.quote(a) for a in ["python", "-m", "gsparse.atlas", *sys.argv[1:]])
  header = (
    f"Command: `{command}`"
    f"  \nDate: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; jax {jax.__version__}; "
    f"backend {jax.default_backend()}; machine: {platform.machine()} {platform.processor()} "
    f"({os.cpu_count()} CPUs); atlas wall time {time.perf_counter() - t0:.0f} s.  \n"
    f"Model: `TransformerLM` {mc}, checkpoint at step {steps} "
    f"of {config.steps} ({config.variant}); "
    f"text: `{fl.text}` ({fl.batch_size} windows of {seq_len} bytes measured, "
    f"{fl.validation_batch_size} held aside). Loss: next-byte cross entropy (nats)."
  )
  md = markdown(
    atlas, tolerance=fl.tolerance, config=config_k, validation=check, figures=figures, header=header
  )
  path = os.path.join(fl.out, "atlas.md")
  pathlib.Path(path).write_text(md)
  summary = atlas_json(atlas, atlas.tol_index(fl.tolerance))
  summary.update(config=config_k, validation={**check._asdict(), "speedup": check.speedup})
  pathlib.Path(fl.out, "atlas.json").write_text(json.dumps(summary, indent=1))
  return path
