"""Trains the byte-level LM on the Python stdlib with dense or top-k attention.

Examples:
  # dense baseline, default small CPU config
  PYTHONPATH=. python scripts/train.py --variant=dense --workdir=/tmp/lm_dense
  # fixed k, k = alpha n^C, certified k, and sparse only in weight-norm-picked layers
  PYTHONPATH=. python scripts/train.py --variant=topk --k=32
  PYTHONPATH=. python scripts/train.py --variant=power --alpha=2 --power=0.5
  PYTHONPATH=. python scripts/train.py --variant=certified --tolerance=0.05
  PYTHONPATH=. python scripts/train.py --variant=select --select_layers=2

Runs unchanged on CPU, GPU and TPU: the batch is sharded over all local
devices (data parallel), parameters are replicated. The run appends its
records to <workdir>/log.jsonl as it goes, checkpoints every
--checkpoint_every steps (<workdir>/checkpoints/<step>, the newest
--keep_checkpoints kept) and writes the complete log to <workdir>/log.json at
the end. Re-running with the same --workdir resumes from the newest
checkpoint, also after a kill; --restart starts over. See docs/training.md.
"""

from absl import app, flags

from gsparse.train import cli

FLAGS = flags.FLAGS
cli.define_flags()
flags.adopt_module_key_flags(cli)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.train_main(FLAGS)


if __name__ == "__main__":
  app.run(main)
