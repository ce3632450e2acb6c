"""The example plugins of the documentation work: each example's own tests (examples/*/tests),
written against the test kit as a third-party author writes them, pass.

Each runs in its own pytest process, in the example's folder (its pyproject.toml is the
configuration, so nothing of tampu's tests/ is around): the ``tampu_server`` fixture comes
from the installed ``tampu.testing`` entry point, the example package from its folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.name for p in (ROOT / "examples").iterdir() if (p / "tests").is_dir())


def test_every_example_has_tests():
    assert EXAMPLES == ["tampu-greylist", "tampu-webhook"]


@pytest.mark.parametrize("folder", EXAMPLES)
def test_example_imports_only_the_kit(folder):
    """An author has tampu and tampu.testing, not tampu's tests/ or its internals."""
    for path in (ROOT / "examples" / folder / "tests").glob("*.py"):
        text = path.read_text()
        imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", text, re.M)
        tampu = [m for m in imports if m.split(".")[0] in ("tampu", "tests")]
        assert all(m in ("tampu", "tampu.testing") for m in tampu), (path.name, tampu)


@pytest.mark.parametrize("folder", EXAMPLES)
def test_example_tests_pass(folder):
    example = ROOT / "examples" / folder
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(example)}
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                          "-p", "no:randomly", "-rfEs"], cwd=example, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    summary = out.strip().splitlines()[-1]
    assert re.search(r"\b\d+ passed\b", summary) and "skipped" not in summary, summary
    assert f"rootdir: {example}\nconfigfile: pyproject.toml" in out  # its own configuration
