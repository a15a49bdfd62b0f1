"""The `>>>` examples in the docstrings of every gsparse module run and print what they say.

Every module under `gsparse/` is found by walking the package, so a new module's
examples are tested without touching this file. The core modules must carry
examples (`CORE`): a docstring example that is deleted, or a module that stops
being found, fails here.
"""

import doctest
import importlib
import pkgutil

import pytest

import gsparse

MODULES = sorted(m.name for m in pkgutil.walk_packages(gsparse.__path__, "gsparse."))

# Modules whose public functions carry examples; each must have some.
CORE = (
  "gsparse.attention",
  "gsparse.certificate",
  "gsparse.flax.attention",
  "gsparse.flax.policies",
  "gsparse.selection",
  "gsparse.sparsity",
  "gsparse.topk",
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=False)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


@pytest.mark.parametrize("name", CORE)
def test_core_modules_have_examples(name):
  module = importlib.import_module(name)
  finder = doctest.DocTestFinder()
  examples = sum(len(t.examples) for t in finder.find(module))
  assert examples > 0, f"{name} has no docstring examples"


def test_walk_finds_the_package():
  assert set(CORE) <= set(MODULES)
  assert "gsparse.train.model" in MODULES  # subpackages are walked too
