"""Every Python example in the README and every tutorial runs, with small settings."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.py"))


def _readme_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _run(code_or_path, tmp_path, extra_env=None, timeout=600):
    env = {
        **os.environ,
        "DEFBOUND_TUTORIAL_SMALL": "1",
        "DEFBOUND_TUTORIAL_OUT": str(tmp_path),
        "MPLBACKEND": "Agg",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.update(extra_env or {})
    if isinstance(code_or_path, Path):
        cmd = [sys.executable, str(code_or_path)]
    else:
        cmd = [sys.executable, "-c", code_or_path]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_readme_has_python_examples():
    assert _readme_blocks()


@pytest.mark.parametrize("index", range(len(_readme_blocks())))
def test_readme_python_example_runs(index, tmp_path):
    code = _readme_blocks()[index].replace("max_sweeps=200", "max_sweeps=20")
    out = _run(code, tmp_path)
    assert out.strip()


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.name for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path):
    _run(path, tmp_path)
