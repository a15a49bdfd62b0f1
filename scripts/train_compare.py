"""Trains every attention variant for several seeds and writes the comparison.

Same step count and sequence length for all variants. Results go to
<out_dir>/results.md and <out_dir>/results.json; each run's checkpoint and
JSON log to <out_dir>/<variant>_seed<seed>/. Re-running resumes unfinished
runs and reuses finished ones.

  PYTHONPATH=. python scripts/train_compare.py --out_dir=results/train_compare
"""

import json
import pathlib

from absl import app, flags

from gsparse.train import cli, compare
from gsparse.train.experiment import VARIANTS

FLAGS = flags.FLAGS
cli.define_flags(with_variant=False)
flags.adopt_module_key_flags(cli)
flags.DEFINE_list("variants", list(VARIANTS), "Variants to run (dense first: ratios are vs dense).")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds; the table reports means over them.")
flags.DEFINE_string("out_dir", "results/train_compare", "Output directory.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  base = cli.config_from_flags(FLAGS, variant="dense", seed=0)
  out = pathlib.Path(FLAGS.out_dir)
  logs = compare.run_all(base, FLAGS.variants, [int(s) for s in FLAGS.seeds], out)
  summary = compare.summarize(logs)
  summary["config"] = json.loads(json.dumps(base.to_dict()))
  md = compare.markdown(summary, measure_eps=FLAGS.measure_eps, measure_k=FLAGS.measure_k)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(summary, indent=1))
  (out / "results.md").write_text(md)
  print(md)
  print(f"wrote {out / 'results.md'} and {out / 'results.json'}")


if __name__ == "__main__":
  app.run(main)
