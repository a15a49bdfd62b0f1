"""absl flags shared by scripts/train.py and scripts/train_compare.py."""

from __future__ import annotations

import json
import pathlib

from absl import flags

from gsparse.train.experiment import VARIANTS, TrainConfig, run_training
from gsparse.train.model import AttentionSpec, MeasureSpec, ModelConfig

# Flag values of each `--preset`; a flag given on the command line wins. A
# preset's flags that a script does not define (`interleave_every`,
# `variants` outside train_compare) are skipped.
PRESETS = {
  # Sequence length 2048, where top-k selection is cheaper than the dense
  # T x T softmax on CPU (docs/results/2026-11-30-training-cpu-T2048.md): a
  # 2-layer model, batch 2 and 40 steps, so the three variants x two seeds fit
  # in about 45 minutes on a loaded 2-core CPU; the runs take turns every 20
  # steps.
  "long": {
    "seq_len": 2048,
    "batch_size": 2,
    "num_layers": 2,
    "steps": 40,
    "warmup_steps": 5,
    "eval_every": 20,
    "eval_batches": 4,
    "checkpoint_every": 20,
    "log_every": 10,
    "variants": ["dense", "topk", "certified"],
    "interleave_every": 20,
  },
}


def apply_preset(fl) -> None:
  """Sets `--preset`'s values on the flags of `fl` not given on the command line."""
  if fl.preset == "none":
    return
  for name, value in PRESETS[fl.preset].items():
    if name in fl and not fl[name].present:
      fl[name].value = value


# Long on purpose: a flat list of absl flag definitions, one per setting; splitting scatters them.
def define_flags(*, with_variant: bool = True, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the training flags (`--variant` only when `with_variant`) in `flag_values`."""
  fv = flag_values
  flags.DEFINE_enum(
    "preset",
    "none",
    ["none", *PRESETS],
    "Named flag values (a flag given explicitly wins): long = sequence length 2048, "
    "2 layers, batch 2, 40 steps (train_compare: dense, topk, certified, taking turns "
    "every 20 steps).",
    flag_values=fv,
  )
  if with_variant:
    flags.DEFINE_enum(
      "variant",
      "dense",
      VARIANTS,
      (
        "Attention variant: dense; topk (fixed --k in every layer); power (k = --alpha * "
        "n^--power, n = sequence length); certified (per query the smallest k in "
        "--candidate_ks whose certified dropped softmax mass is <= --tolerance); select "
        "(dense until --select_step, then top-k with --k in the --select_layers layers of "
        "largest ||scale W_Q W_K^T||_F)."
      ),
      flag_values=fv,
    )
    flags.DEFINE_integer("seed", 0, "Seed of initialisation and data order.", flag_values=fv)
    flags.DEFINE_string(
      "workdir",
      None,
      (
        "Checkpoint/log directory; a run in an existing one resumes from its newest "
        "checkpoint (--restart starts over). Default: no checkpoints, log printed only."
      ),
      flag_values=fv,
    )
  flags.DEFINE_integer(
    "seq_len", 512, "Bytes per training sequence (attention length n).", flag_values=fv
  )
  flags.DEFINE_integer(
    "batch_size",
    4,
    "Global batch size; must divide by the number of local devices.",
    flag_values=fv,
  )
  flags.DEFINE_integer("steps", 300, "Optimizer steps.", flag_values=fv)
  flags.DEFINE_bool(
    "pack",
    False,
    "Packed documents: attend only within a file of the byte stream (segment ids).",
    flag_values=fv,
  )
  flags.DEFINE_integer("d_model", 128, "Residual width.", flag_values=fv)
  flags.DEFINE_integer("num_layers", 4, "Transformer blocks.", flag_values=fv)
  flags.DEFINE_integer("num_heads", 4, "Attention heads per block.", flag_values=fv)
  flags.DEFINE_float(
    "learning_rate",
    3e-3,
    "Peak AdamW learning rate (linear warmup, cosine decay to 0).",
    flag_values=fv,
  )
  flags.DEFINE_integer("warmup_steps", 20, "Learning-rate warmup steps.", flag_values=fv)
  flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay.", flag_values=fv)
  flags.DEFINE_integer(
    "k", 32, "Kept keys per query for --variant=topk and select.", flag_values=fv
  )
  flags.DEFINE_float("alpha", 2.0, "Prefactor of k = alpha n^C (--variant=power).", flag_values=fv)
  flags.DEFINE_float(
    "power", 0.5, "Exponent C in (0, 1) of k = alpha n^C (--variant=power).", flag_values=fv
  )
  flags.DEFINE_float(
    "tolerance", 0.05, "Certified tail-mass tolerance (--variant=certified).", flag_values=fv
  )
  flags.DEFINE_list(
    "candidate_ks",
    ["8", "16", "32", "64", "128"],
    "Candidate k values of --variant=certified.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "select_layers", 2, "How many layers --variant=select makes sparse.", flag_values=fv
  )
  flags.DEFINE_integer(
    "select_step",
    -1,
    "Step at which --variant=select ranks layers by weight norm (-1: steps // 4).",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "measure_eps",
    0.01,
    "eps of the measured (eps, k)-sparsity: entries of a dense attention row above eps.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "measure_k",
    32,
    "k at which the exact tail mass and its certificate are measured in every variant.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "eval_every", 50, "Steps between validation evaluations (and the last step).", flag_values=fv
  )
  flags.DEFINE_integer(
    "eval_batches", 4, "Validation batches (of --batch_size) per evaluation.", flag_values=fv
  )
  flags.DEFINE_integer(
    "checkpoint_every", 50, "Steps between checkpoints (0: at the end only).", flag_values=fv
  )
  flags.DEFINE_integer("log_every", 10, "Steps between progress lines.", flag_values=fv)
  flags.DEFINE_integer(
    "keep_checkpoints",
    3,
    "How many of the newest checkpoints each run keeps (>= 1).",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "restart",
    False,
    (
      "Delete the run files (checkpoints/, log.jsonl, log.json, tensorboard/) of the workdir "
      "and start over. Without it a run resumes from its newest checkpoint, and a missing or "
      "unreadable checkpoint is an error."
    ),
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "tensorboard",
    True,
    "Also write TensorBoard scalars to <workdir>/tensorboard when tensorboardX or TensorFlow "
    "is installed (the JSON logs are always written).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "max_train_bytes", 4_000_000, "Cap on training bytes read from the stdlib.", flag_values=fv
  )
  flags.DEFINE_integer(
    "mesh_heads",
    1,
    "Devices on the mesh's heads axis (head parallelism; the rest split the batch). "
    "Must divide the local device count and --num_heads.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "max_validation_bytes", 400_000, "Cap on validation bytes read from the stdlib.", flag_values=fv
  )


def config_from_flags(fl, *, variant: str | None = None, seed: int | None = None) -> TrainConfig:
  """A `TrainConfig` from parsed flags (variant/seed overridable)."""
  return TrainConfig(
    variant=variant if variant is not None else fl.variant,
    model=ModelConfig(
      d_model=fl.d_model,
      num_layers=fl.num_layers,
      num_heads=fl.num_heads,
      max_len=fl.seq_len,
      pack=fl.pack,
    ),
    sparse=AttentionSpec(
      "topk",
      k=fl.k,
      alpha=fl.alpha,
      power=fl.power,
      tolerance=fl.tolerance,
      candidate_ks=tuple(int(x) for x in fl.candidate_ks),
    ),
    measure=MeasureSpec(eps=fl.measure_eps, k=fl.measure_k),
    seq_len=fl.seq_len,
    batch_size=fl.batch_size,
    steps=fl.steps,
    learning_rate=fl.learning_rate,
    warmup_steps=fl.warmup_steps,
    weight_decay=fl.weight_decay,
    seed=seed if seed is not None else fl.seed,
    select_layers=fl.select_layers,
    select_step=fl.select_step,
    eval_every=fl.eval_every,
    eval_batches=fl.eval_batches,
    checkpoint_every=fl.checkpoint_every,
    log_every=fl.log_every,
    max_train_bytes=fl.max_train_bytes,
    max_validation_bytes=fl.max_validation_bytes,
    mesh_heads=fl.mesh_heads,
  )


def train_main(fl) -> dict:
  apply_preset(fl)
  config = config_from_flags(fl)
  log = run_training(
    config,
    workdir=fl.workdir,
    restart=fl.restart,
    keep_checkpoints=fl.keep_checkpoints,
    tensorboard=fl.tensorboard,
  )
  fin = log.get("final")
  if fin is not None:
    summary = {k: v for k, v in fin.items() if k not in ("sparsity", "weight_norms")}
    print(json.dumps(summary, indent=1))
    if fl.workdir:
      print(f"log: {pathlib.Path(fl.workdir) / 'log.json'}")
  return log
