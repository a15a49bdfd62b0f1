# Runs the end-to-end attention benchmark (gsparse/attention_bench.py) from this
# checkout: `python scripts/bench_attention.py --help` shows its flags.
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from gsparse.attention_bench import main  # noqa: E402

if __name__ == "__main__":
  main()
