"""Installing: a build without ninja stops at once and says what to do (pip hides a slow build's output,
so a serial compile would look like a hang)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _copy(tmp_path) -> Path:
    """setup.py and the C++ sources, where a build may write what it likes."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "setup.py", src)
    shutil.copytree(ROOT / "csrc", src / "csrc")
    return src


@pytest.mark.slow
def test_a_build_without_ninja_stops_and_says_what_to_do(tmp_path):
    src = _copy(tmp_path)
    empty = tmp_path / "no-tools"  # a PATH on which there is no ninja
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    env.pop("CCLUSTER_NO_NINJA", None)
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                          "--build-temp", str(tmp_path / "tmp")], cwd=src, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0
    assert "ccluster: ninja is not installed (or not on PATH)" in out.stderr
    assert "pip install ninja" in out.stderr and "CCLUSTER_NO_NINJA=1" in out.stderr
    assert not (tmp_path / "tmp").exists() and not (tmp_path / "lib").exists()  # stopped before compiling
    # commands that do not compile still work without ninja
    version = subprocess.run([sys.executable, "setup.py", "--version"], cwd=src, env=env, capture_output=True,
                             text=True, timeout=300)
    assert version.returncode == 0 and version.stdout.strip().splitlines()[-1] == "0.1.0", version.stderr
