"""`python -m gsparse.atlas`: the `gsparse-atlas` command (`gsparse.cli.atlas`)."""

from gsparse.cli.atlas import run

if __name__ == "__main__":
  run()
