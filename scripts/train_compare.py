# Runs `gsparse-train-compare` (gsparse/cli/train_compare.py) from this checkout, without installing
# it or setting PYTHONPATH: `python scripts/train_compare.py --help` shows its flags.
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from gsparse.cli.train_compare import run  # noqa: E402

if __name__ == "__main__":
  run()
