"""The import graph of the gsparse package has no cycle.

Every `import` / `from ... import` statement of gsparse/**/*.py, at module
level or inside a function, gives an edge from the importing module to the
gsparse module it names (`from gsparse.kernels import nonfinite` names the
module `gsparse.kernels.nonfinite`; `from gsparse.gather import gather_kv`
names `gsparse.gather`). The implicit import of a module's parent packages is
not an edge: Python runs a package's `__init__` before its submodules, so a
submodule that names a sibling through the package is not a cycle. The graph
is built from the source text with `ast` (no import is executed), so the test
also sees imports that only run inside a function.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gsparse"

# Cycles that other work in progress removes (issue #17: the selection/topk
# split). A cycle among these modules only is tolerated here; any other cycle
# fails. Delete entries as they go.
KNOWN_CYCLE_MODULES: frozenset[str] = frozenset()


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _absolute(name: str, module: str, level: int, is_package: bool) -> str:
  """The absolute name of a (possibly relative) `from` import's base."""
  if level == 0:
    return name
  base = module.split(".") if is_package else module.split(".")[:-1]
  base = base[: len(base) - (level - 1)]
  return ".".join(base + ([name] if name else []))


def _targets(node: ast.AST, module: str, is_package: bool, modules) -> set[str]:
  """The gsparse modules one import statement names."""
  if isinstance(node, ast.Import):
    return {alias.name for alias in node.names if alias.name in modules}
  base = _absolute(node.module or "", module, node.level, is_package)
  if base.split(".")[0] != "gsparse":
    return set()
  out = set()
  for alias in node.names:
    sub = f"{base}.{alias.name}"
    if sub in modules:
      out.add(sub)
    elif base in modules:
      out.add(base)
  return out


def import_graph() -> dict[str, set[str]]:
  """`{module: {gsparse modules it imports}}` over every gsparse module."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    is_package = path.name == "__init__.py"
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import | ast.ImportFrom):
        edges |= _targets(node, name, is_package, modules)
    graph[name] = edges - {name}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_finds_a_cycle_it_is_given():
  """The detector itself: a two-module and a three-module cycle, and a DAG."""
  graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
  assert sorted(cycles(graph)) == [["a", "b"], ["c", "d", "e"]]
  assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_graph_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
  """An import inside a function, and a relative one, are edges."""
  pkg = tmp_path / "gsparse"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("def f():\n  from gsparse import b\n")
  (pkg / "b.py").write_text("from .sub import c\n")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "sub" / "c.py").write_text("from ..a import f\n")
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
  graph = import_graph()
  assert graph["gsparse.a"] == {"gsparse.b"}
  assert graph["gsparse.b"] == {"gsparse.sub.c"}
  assert graph["gsparse.sub.c"] == {"gsparse.a"}
  assert cycles(graph) == [["gsparse.a", "gsparse.b", "gsparse.sub.c"]]


def test_kernels_depend_only_on_jax_and_leaves():
  """gsparse.kernels imports no gsparse module outside itself but leaves (issue #17).

  The leaves are `_layout` and `_numerics` (the NaN-first sortable keys that
  every top-k shares), which itself imports only `_native` and `_rowwise`
  (the top-k's partitioning rule, which imports no gsparse module).
  """
  graph = import_graph()
  allowed = {"gsparse._layout", "gsparse._numerics", "gsparse._native", "gsparse._rowwise"}
  for name, edges in graph.items():
    if name.startswith("gsparse.kernels"):
      outside = {e for e in edges if not e.startswith("gsparse.kernels")} - allowed
      assert not outside, f"{name} imports {sorted(outside)}"
  assert graph["gsparse._layout"] == set()
  assert graph["gsparse._numerics"] <= {"gsparse._native", "gsparse._rowwise"}
  assert graph["gsparse._rowwise"] == set()


def test_gsparse_import_graph_is_acyclic():
  found = [c for c in cycles(import_graph()) if not set(c) <= KNOWN_CYCLE_MODULES]
  if found:
    pytest.fail(f"import cycles in gsparse: {found}")
