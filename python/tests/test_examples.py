"""The Python examples run: the script, and the notebook executed headless."""

import subprocess
import sys

import nbformat
from nbclient import NotebookClient

from conftest import ROOT

EXAMPLES = ROOT / "examples" / "python"


def test_quickstart_script(tmp_path):
    out = tmp_path / "out.png"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"),
         str(ROOT / "tests/fixtures/tiny-sd-turbo"), str(ROOT / "tests/fixtures/tiny-taesd"), str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "rejected: invalid parameter `t_index_list[1]`" in done.stdout
    assert "prompt change: hot" in done.stdout and "size change: reload" in done.stdout
    assert "after reload: (96, 96, 3)" in done.stdout
    assert out.stat().st_size > 0


def test_quickstart_notebook():
    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    outputs = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    )
    assert "rejected: invalid parameter `t_index_list[1]`" in outputs
    assert "(64, 64, 3) uint8" in outputs and "reload" in outputs
    assert "True (64, 64, 3)" in outputs
