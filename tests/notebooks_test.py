"""The Colab notebooks run top to bottom on CPU with small parameters (GSPARSE_SMALL=1).

The kernel is the interpreter running the tests: a temporary kernel spec
points at `sys.executable`, so a venv whose installed `python3` spec says
`python` (resolved through PATH) cannot pick up another interpreter. Without
nbclient/ipykernel the code cells run in a plain Python subprocess instead.
"""

import json
import os
import pathlib
import subprocess
import sys

import nbformat
import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_NOTEBOOKS = sorted((_ROOT / "colab").glob("*.ipynb"))
_KERNEL = "gsparse-test-python"


def _env(tmp_path):
  env = {
    "GSPARSE_SMALL": "1",
    "MPLBACKEND": "Agg",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": str(_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    "JUPYTER_PATH": str(tmp_path / "jupyter") + os.pathsep + os.environ.get("JUPYTER_PATH", ""),
  }
  spec_dir = tmp_path / "jupyter" / "kernels" / _KERNEL
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "gsparse test kernel",
    "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  return env


def _run_with_subprocess(nb, tmp_path, env):
  code = "\n\n".join(c.source for c in nb.cells if c.cell_type == "code")
  script = tmp_path / "notebook.py"
  script.write_text(code)
  proc = subprocess.run(
    [sys.executable, str(script)],
    cwd=tmp_path,
    env={**os.environ, **env},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]


def test_notebooks_exist():
  names = [p.name for p in _NOTEBOOKS]
  assert names == [
    "01_sparsity_explorer.ipynb",
    "02_bounds_vs_monte_carlo.ipynb",
    "03_flax_sparse_attention.ipynb",
    "04_model_atlas.ipynb",
  ]


@pytest.mark.parametrize("path", _NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean_and_colab_ready(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, "outputs must be stripped"
  first = nb.cells[0].source
  assert (
    f"colab.research.google.com/github/gsparse-dev/gsparse/blob/main/colab/{path.name}" in first
  )
  install = nb.cells[1].source
  assert 'find_spec("gsparse") is None' in install and "git+https://github.com/" in install


@pytest.mark.parametrize("path", _NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
  nb = nbformat.read(path, as_version=4)
  env = _env(tmp_path)
  try:
    import ipykernel  # noqa: F401
    from nbclient import NotebookClient
  except ImportError:
    _run_with_subprocess(nb, tmp_path, env)
    return
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  nb.cells.append(
    nbformat.v4.new_code_cell("import sys, gsparse\nprint(sys.executable)\nprint(gsparse.__file__)")
  )
  client = NotebookClient(
    nb, kernel_name=_KERNEL, timeout=600, resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()
  errors = [
    o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
  ]
  assert not errors
  # The kernel really was this interpreter, and it imported this checkout.
  printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
  assert sys.executable in printed and str(_ROOT / "gsparse") in printed, printed
