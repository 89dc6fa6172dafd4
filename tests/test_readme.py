"""The README's first snippet, saved to a file and run as written (no main guard), trains."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_the_readme_quick_start_snippet_runs_as_a_script(tmp_path):
    snippet = python_snippets()[0]
    assert 'backend="processes"' in snippet and "__main__" not in snippet  # the case this test is for
    (tmp_path / "quick_start.py").write_text(snippet)
    done = subprocess.run([sys.executable, "quick_start.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = float(re.search(r"final validation accuracy ([\d.]+)%", done.stdout).group(1))
    assert accuracy >= 95.0
    assert "Traceback" not in done.stderr
    tensors = load_file(tmp_path / "digits.safetensors")
    assert {tuple(t.shape) for t in tensors.values()} == {(64, 64), (64,), (10, 64), (10,)}
