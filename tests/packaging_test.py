"""Packaging: license, metadata of the built wheel, console commands, one repository URL."""

import email
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import nbformat
import pytest

tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_PYPROJECT = tomllib.loads((_ROOT / "pyproject.toml").read_text())
_PROJECT = _PYPROJECT["project"]
_REPOSITORY = _PROJECT["urls"]["Repository"]
_NOTEBOOKS = sorted((_ROOT / "colab").glob("*.ipynb"))


def test_license_is_apache_2():
  text = (_ROOT / "LICENSE").read_text()
  assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
  assert "END OF TERMS AND CONDITIONS" in text
  assert _PROJECT["license"] == "Apache-2.0" and _PROJECT["license-files"] == ["LICENSE"]


def test_core_dependencies_leave_out_test_and_figure_packages():
  names = {re.split(r"[<>=!~ \[]", d)[0] for d in _PROJECT["dependencies"]}
  assert not names & {"chex", "matplotlib", "ipywidgets", "pytest"}
  extras = _PROJECT["optional-dependencies"]
  assert any(d.startswith("matplotlib") for d in extras["report"])
  assert any(d.startswith("chex") for d in extras["test"])


def test_the_library_imports_chex_and_matplotlib_only_where_optional():
  """chex is test-only; matplotlib only in gsparse/figures.py and inside functions."""
  for path in (_ROOT / "gsparse").rglob("*.py"):
    src = path.read_text()
    assert not re.search(r"^\s*(import|from) chex", src, re.M), path
    top_level = re.findall(r"^(?:import|from) matplotlib", src, re.M)
    if path.name != "figures.py":
      assert not top_level, path


@pytest.mark.parametrize("path", _NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_use_the_repository_url_of_the_metadata(path):
  nb = nbformat.read(path, as_version=4)
  colab = _REPOSITORY.replace("https://github.com/", "https://colab.research.google.com/github/")
  assert f"]({colab}/blob/main/colab/{path.name})" in nb.cells[0].source
  install = nb.cells[1].source
  assert 'find_spec("gsparse") is None' in install
  urls = re.findall(r"git\+(\S+?)[\"' ]", install)
  assert urls == [_REPOSITORY], urls
  assert f'"{_PROJECT["name"]}[notebooks] @ git+{_REPOSITORY}"' in install
  # No other address of a repository anywhere in the notebook.
  text = path.read_text()
  assert set(re.findall(r"github\.com/[\w.-]+/[\w.-]+", text)) == {
    _REPOSITORY.removeprefix("https://")
  }


def test_the_library_hard_codes_no_repository_url():
  for path in (_ROOT / "gsparse").rglob("*.py"):
    assert "github.com/" not in path.read_text(), path


def test_wheel_metadata(tmp_path):
  """Builds the wheel with the build backend of pyproject.toml and reads what pip would see."""
  buildapi = pytest.importorskip("flit_core.buildapi", reason="flit_core (the test extra)")
  cwd = os.getcwd()
  os.chdir(_ROOT)
  try:
    name = buildapi.build_wheel(str(tmp_path))
  finally:
    os.chdir(cwd)
  with zipfile.ZipFile(tmp_path / name) as whl:
    files = whl.namelist()
    info = next(f for f in files if f.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
    meta = email.message_from_bytes(whl.read(f"{info}/METADATA"))
    entry_points = whl.read(f"{info}/entry_points.txt").decode()
    license_text = whl.read(f"{info}/licenses/LICENSE").decode()
  assert meta["Name"] == _PROJECT["name"]
  assert meta["License-Expression"] == "Apache-2.0"
  assert meta.get_all("License-File") == ["LICENSE"]
  assert license_text == (_ROOT / "LICENSE").read_text()
  assert f"Repository, {_REPOSITORY}" in meta.get_all("Project-URL")
  assert "Typing :: Typed" in meta.get_all("Classifier")
  assert "gsparse/py.typed" in files and "gsparse/_native/topk_cpu.cc" in files
  core = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
  assert not [r for r in core if r.startswith(("chex", "matplotlib"))], core
  for command, target in _PROJECT["scripts"].items():
    assert f"{command} = {target}" in entry_points or f"{command}={target}" in entry_points


@pytest.mark.parametrize("command", sorted(_PROJECT["scripts"]))
def test_console_command_runs_as_module_and_explains_its_flags(command, tmp_path):
  """`python -m <module> --help` of each console command, from outside the checkout."""
  module, func = _PROJECT["scripts"][command].split(":")
  assert func == "run"
  proc = subprocess.run(
    [sys.executable, "-m", module, "--help"],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "PYTHONPATH": str(_ROOT), "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode in (0, 1), proc.stderr  # absl's --help exits with status 1
  assert "Traceback" not in proc.stderr, proc.stderr
  out = proc.stdout
  assert command in out  # the module docstring shows the command
  flags = re.findall(r"^  --(?:\[no\])?(\w+):", out, re.M)
  assert len(flags) >= 5, out[:2000]


def test_cli_modules_import_together_without_defining_flags():
  """Flags are defined by `run()`, so a process may import every command (doctests do)."""
  code = (
    "import importlib, pkgutil\n"
    "from absl import app, flags, logging  # these define absl's own flags\n"
    "import orbax.checkpoint  # defines orbax's own flags (gsparse.train uses it)\n"
    "import gsparse.cli\n"
    "before = set(flags.FLAGS)\n"
    "names = [m.name for m in pkgutil.walk_packages(gsparse.cli.__path__, 'gsparse.cli.')]\n"
    "for name in names:\n"
    "  importlib.import_module(name)\n"
    "assert set(flags.FLAGS) == before, set(flags.FLAGS) - before\n"
    "print(sum(not n.rsplit('.', 1)[1].startswith('_') for n in names))\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "PYTHONPATH": str(_ROOT), "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr
  # every command, private helpers aside
  assert int(proc.stdout.strip()) == len(_PROJECT["scripts"])
