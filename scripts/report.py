# Runs `gsparse-report` (gsparse/cli/report.py) from this checkout, without installing
# it or setting PYTHONPATH: `python scripts/report.py --help` shows its flags.
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from gsparse.cli.report import run  # noqa: E402

if __name__ == "__main__":
  run()
