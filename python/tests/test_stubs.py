"""The .pyi stubs (python/sdstream/__init__.pyi for the package, _sdstream.pyi for the native
module) agree with the installed module: mypy's stubtest imports the package and compares every
public name, signature, default and `__all__` with the stubs, and type-checks the package's own
Python (issue #19 item 3). No allowlist: every difference it reports is a stub to fix."""

import subprocess
import sys


def test_stubs_match_the_module(tmp_path):
    # Run outside the repository: with the virtualenv inside it (target/py-venv), mypy would
    # otherwise find the installed stubs twice, by a relative and an absolute path.
    done = subprocess.run([sys.executable, "-m", "mypy.stubtest", "sdstream"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    print(done.stdout, done.stderr)
    assert done.returncode == 0, f"stubtest found differences:\n{done.stdout}\n{done.stderr}"
    assert "Success: no issues found in 4 modules" in done.stdout
