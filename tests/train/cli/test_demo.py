"""``python -m train demo`` exactly as shipped: it runs without a warning.

The demo reads its data from the cache the user's environment names (``CCLUSTER_CACHE``, else
``~/.cache/ccluster``), as the command itself does, so that a machine that ran ``make demo`` does not
generate its 200 MB again; this module therefore uses no private cache.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_the_default_demo_prints_no_warning(tmp_path):
    """No Q-fit warning ("stopped at cc.fit_max_iter"), no other guard's, printed or recorded: the demo's Q
    fits may stop at cc.fit_max_iter, but with gaps far below what matters (cc.guard_fit_gap "auto")."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "train", "demo", "--out", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    # the fits' passes and gaps, to read when this fails
    fits = "\n".join(line.split("\r")[-1] for line in done.stderr.splitlines() if "Q fit" in line)
    printed = done.stdout + done.stderr
    assert "warning" not in printed.lower() and "stopped at cc.fit_max_iter" not in printed, fits
    recorded = [row for path in sorted(out.rglob("metrics.jsonl")) for row in map(json.loads, open(path))
                if row["kind"] == "warning"]
    assert len(list(out.rglob("metrics.jsonl"))) == 3 and recorded == [], fits  # stage 1, control, method
    assert "cls*" not in printed  # cc.select is off: no cls* to print
