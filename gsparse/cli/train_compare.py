"""Trains every attention variant for several seeds and writes the comparison.

Same step count and sequence length for all variants. Results go to
<out_dir>/results.md and <out_dir>/results.json; each run's checkpoint and
JSON logs to <out_dir>/<variant>_seed<seed>/. Re-running resumes unfinished
runs and reuses finished ones; --restart starts every run over.

  gsparse-train-compare --out_dir=results/train_compare
  # sequence length 2048 (where top-k pays on CPU): dense, topk, certified
  gsparse-train-compare --preset=long --out_dir=results/train_compare_T2048
"""

import json
import pathlib

from absl import app, flags

from gsparse.cli import _common
from gsparse.train import cli, compare
from gsparse.train.experiment import VARIANTS

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines the flags (in `run()`, so that importing this module defines none)."""
  cli.define_flags(with_variant=False)
  flags.adopt_module_key_flags(cli)
  flags.DEFINE_list(
    "variants", list(VARIANTS), "Variants to run (dense first: ratios are vs dense)."
  )
  flags.DEFINE_list("seeds", ["0", "1"], "Seeds; the table reports means over them.")
  flags.DEFINE_integer(
    "interleave_every",
    0,
    "Steps each run trains before the next takes its turn (0: one run after the other). "
    "Spreads a changing machine load evenly over the variants and seeds.",
  )
  flags.DEFINE_string("out_dir", "results/train_compare", "Output directory.")
  flags.DEFINE_bool(
    "summarize_only",
    False,
    "Train nothing: tabulate the runs already under --out_dir (finished or not, read from "
    "their logs and checkpoints) at the step given by --at_step.",
  )
  flags.DEFINE_integer(
    "at_step",
    -1,
    "With --summarize_only: the step to compare (-1: the last step all runs evaluated).",
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.apply_preset(FLAGS)
  base = cli.config_from_flags(FLAGS, variant="dense", seed=0)
  out = pathlib.Path(FLAGS.out_dir)
  if FLAGS.summarize_only:
    _, logs = compare.logs_at_step(out, None if FLAGS.at_step < 0 else FLAGS.at_step)
  else:
    logs = compare.run_all(
      base,
      FLAGS.variants,
      [int(s) for s in FLAGS.seeds],
      out,
      restart=FLAGS.restart,
      keep_checkpoints=FLAGS.keep_checkpoints,
      tensorboard=FLAGS.tensorboard,
      interleave_every=FLAGS.interleave_every,
    )
  summary = compare.summarize(logs)
  summary["config"] = json.loads(json.dumps(base.to_dict()))
  md = compare.markdown(summary, measure_eps=FLAGS.measure_eps, measure_k=FLAGS.measure_k)
  out.mkdir(parents=True, exist_ok=True)
  stem = "results" if not FLAGS.summarize_only else f"results_step{summary_step(logs)}"
  (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
  (out / f"{stem}.md").write_text(md)
  print(md)
  print(f"wrote {out / (stem + '.md')} and {out / (stem + '.json')}")


def summary_step(logs) -> int:
  return next(iter(logs.values()))[0]["final"]["step"]


def run() -> None:
  """Console entry point `gsparse-train-compare` (also `python -m gsparse.cli.train_compare`)."""
  _define_flags()
  _common.run_app(main, __name__)


if __name__ == "__main__":
  run()
