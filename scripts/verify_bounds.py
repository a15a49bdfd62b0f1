# Runs `gsparse-verify-bounds` (gsparse/cli/verify_bounds.py) from this checkout, without installing
# it or setting PYTHONPATH: `python scripts/verify_bounds.py --help` shows its flags.
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from gsparse.cli.verify_bounds import run  # noqa: E402

if __name__ == "__main__":
  run()
