"""The README and the docs pages: every ```python block runs, every relative link resolves.

Each page's ```python blocks run in order in one fresh namespace, in a temporary
working directory (a block may write files), as a reader pasting them would.
A block that deliberately cannot run uses the fence info string `python notest`
and starts with a `# Not run:` comment that says why; there may be at most
`MAX_NOTEST` of them in all.

Links: every relative `[text](target)` of README.md and of the pages under
docs/ must name an existing file, and an anchor into a Markdown page must
name one of its headings (GitHub's slug rule).
"""

import contextlib
import importlib.util
import io
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
MAX_NOTEST = 2

# Pages whose blocks compile the bound functions of gsparse.bounds (tens of
# seconds of compilation on a 2-core CPU): marked slow, still run by CI.
# docs/kernels.md: its blocks run the Pallas kernels in the interpreter (about a
# minute of compiles on 2 cores); kernels_test.py covers them by default.
# docs/results/2026-12-01-certified-prepass-cpu.md: its block is the paired
# benchmark as it was run (about two minutes on 2 cores);
# tests/certified_prepass_test.py checks what it compares by default.
SLOW_PAGES = {
  "docs/bounds.md",
  "docs/kernels.md",
  "docs/results/2026-12-01-certified-prepass-cpu.md",
}

# Pages whose blocks need several devices: run in a subprocess with this many
# forced host CPU devices (XLA reads the flag when it starts).
MULTI_DEVICE_PAGES = {"docs/sharding.md": 4}

_FENCE = re.compile(r"^(\s*)(```+|~~~+)(.*)$")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _rel(page: pathlib.Path) -> str:
  return page.relative_to(ROOT).as_posix()


def _blocks(text: str):
  """(info string, first line number, source) of each fenced block, and the prose lines."""
  blocks, prose, fence, info, start, body, indent = [], [], None, "", 0, [], ""
  for number, line in enumerate(text.splitlines(), start=1):
    m = _FENCE.match(line)
    if fence is None and m:
      fence, info, start, body, indent = m.group(2), m.group(3).strip(), number + 1, [], m.group(1)
    elif fence is not None and m and m.group(2).startswith(fence) and not m.group(3).strip():
      blocks.append((info, start, "\n".join(body) + "\n"))
      fence = None
    elif fence is not None:  # a block inside a list item is indented as its fence is
      body.append(line[len(indent) :] if line.startswith(indent) else line)
    else:
      prose.append((number, line))
  assert fence is None, "unclosed code fence"
  return blocks, prose


def _python_blocks(page: pathlib.Path):
  blocks, _ = _blocks(page.read_text(encoding="utf-8"))
  return [(line, src) for info, line, src in blocks if info == "python"]


def _page_params():
  params = []
  for page in PAGES:
    if not _python_blocks(page):
      continue
    marks = [pytest.mark.slow] if _rel(page) in SLOW_PAGES else []
    params.append(pytest.param(page, id=_rel(page), marks=marks))
  return params


def _run_in_subprocess(page: pathlib.Path, devices: int, tmp_path: pathlib.Path) -> None:
  script = "\n\n".join(src for _, src in _python_blocks(page))
  env = {
    **os.environ,
    # Keeps the test options of conftest.py (compile-time savings).
    "XLA_FLAGS": (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip(),
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
  }
  proc = subprocess.run(
    [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
  )
  assert proc.returncode == 0, f"{_rel(page)}: {proc.stderr[-4000:]}"


@pytest.mark.parametrize("page", _page_params())
def test_python_blocks_run(page, tmp_path, monkeypatch):
  if _rel(page) in MULTI_DEVICE_PAGES:
    _run_in_subprocess(page, MULTI_DEVICE_PAGES[_rel(page)], tmp_path)
    return
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__main__"}
  for line, src in _python_blocks(page):
    code = compile(src, f"{_rel(page)}:{line}", "exec")
    with contextlib.redirect_stdout(io.StringIO()):
      exec(code, namespace)  # noqa: S102 -- running the documented example is the test


def test_notest_blocks_are_rare_and_justified():
  notest = []
  for page in PAGES:
    blocks, _ = _blocks(page.read_text(encoding="utf-8"))
    for info, line, src in blocks:
      if info.startswith("python") and info != "python":
        assert info == "python notest", f"{_rel(page)}:{line}: unknown fence info {info!r}"
        assert src.startswith("# Not run:"), f"{_rel(page)}:{line}: say why with '# Not run:'"
        notest.append(f"{_rel(page)}:{line}")
  assert len(notest) <= MAX_NOTEST, notest


def test_readme_and_docs_have_python_blocks():
  assert len(_python_blocks(ROOT / "README.md")) >= 3
  assert len(_page_params()) >= 5


def _slug(heading: str) -> str:
  """GitHub's anchor for a Markdown heading."""
  text = heading.strip().lower().replace("`", "")
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
  _, prose = _blocks(page.read_text(encoding="utf-8"))
  return {_slug(line.lstrip("#")) for _, line in prose if re.match(r"^#{1,6} ", line)}


def _links(page: pathlib.Path):
  _, prose = _blocks(page.read_text(encoding="utf-8"))
  for number, line in prose:
    for m in _LINK.finditer(re.sub(r"`[^`]*`", "", line)):
      yield number, m.group(1)


def test_slug_rule():
  assert _slug("The sort trap of `jax.lax.top_k` on XLA:CPU") == (
    "the-sort-trap-of-jaxlaxtop_k-on-xlacpu"
  )
  assert _slug("What ran where") == "what-ran-where"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
  broken = []
  for number, target in _links(page):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    where = f"{_rel(page)}:{number}: {target}"
    if not dest.exists():
      broken.append(f"{where} (no such file)")
    elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
      broken.append(f"{where} (no heading with that anchor)")
  assert not broken, "\n".join(broken)


def test_link_check_sees_links():
  assert sum(1 for _ in _links(ROOT / "README.md")) >= 5


def _sync_readme():
  spec = importlib.util.spec_from_file_location("sync_readme", ROOT / "scripts" / "sync_readme.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_readme_includes_match_their_source():
  """Measured figures in the README are copies of one dated file each."""
  sync = _sync_readme()
  text = (ROOT / "README.md").read_text()
  blocks = sync.INCLUDE.findall(text)
  assert blocks, "the README has no include blocks (the timing and benchmark figures)"
  for _, path, _, _ in blocks:
    assert path.startswith("docs/results/"), f"{path}: includes come from dated results"
  assert sync.synced(text) == text, "stale README block: run python scripts/sync_readme.py"


def test_readme_include_check_sees_a_stale_block(tmp_path):
  sync = _sync_readme()
  (tmp_path / "fig.md").write_text("| a | 1.0x |\n")
  stale = "x\n<!-- include: fig.md -->\n| a | 2.0x |\n<!-- /include -->\ny\n"
  assert (
    sync.synced(stale, tmp_path)
    == "x\n<!-- include: fig.md -->\n| a | 1.0x |\n<!-- /include -->\ny\n"
  )
