"""Copy dated measurements into the README, so each figure is typed once.

A README block between `<!-- include: PATH -->` and `<!-- /include -->` is
replaced by the contents of PATH (relative to the repository root).
`tests/docs_test.py::test_readme_includes_match_their_source` fails when a
block and its file differ, so a new measurement reaches the README only
through its dated file under docs/results/:

  python scripts/sync_readme.py          # rewrite the blocks
  python scripts/sync_readme.py --check  # exit 1 if a block is stale
"""

from __future__ import annotations

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
INCLUDE = re.compile(r"(<!-- include: (\S+) -->\n)(.*?)(<!-- /include -->)", re.S)


def synced(text: str, root: pathlib.Path = ROOT) -> str:
  """`text` with every include block replaced by its source file."""

  def fill(m: re.Match) -> str:
    body = (root / m.group(2)).read_text()
    return m.group(1) + body + ("" if body.endswith("\n") else "\n") + m.group(4)

  return INCLUDE.sub(fill, text)


def main(argv: list[str]) -> int:
  readme = ROOT / "README.md"
  text = readme.read_text()
  new = synced(text)
  if "--check" in argv:
    return int(new != text)
  readme.write_text(new)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
