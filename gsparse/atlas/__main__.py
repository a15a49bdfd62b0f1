"""`python -m gsparse.atlas --checkpoint WORKDIR --text FILE --out DIR` (`gsparse.atlas.cli`)."""

from absl import app, flags

from gsparse.atlas import cli


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(cli.main(flags.FLAGS))


def run():
  """Console entry point (`gsparse-atlas`)."""
  cli.define_flags()
  flags.adopt_module_key_flags(cli)
  app.run(main)


if __name__ == "__main__":
  run()
