"""Sparsity atlas of a trained LM: which attention layers can go top-k, with which k.

  gsparse-atlas --checkpoint WORKDIR --text FILE --out DIR

(or `python -m gsparse.atlas`). WORKDIR is a `gsparse-train` workdir; the
report (`atlas.md`, `atlas.json`, PNG figures) goes to DIR. See docs/atlas.md.
"""

from absl import app, flags

from gsparse.cli import _common

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from gsparse.atlas import cli

  print(cli.main(FLAGS))


def run() -> None:
  """Console entry point `gsparse-atlas` (also `python -m gsparse.atlas`)."""
  from gsparse.atlas import cli

  cli.define_flags()
  flags.adopt_module_key_flags(cli)
  _common.run_app(main, __name__)


if __name__ == "__main__":
  run()
