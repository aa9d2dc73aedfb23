"""The benchmark suite's smoke run: every part on a few hundred tasks, correctness only.

No figure is asserted (timings belong to ``python -m bench all``, not to tests);
what must hold is that every part runs and every result checks out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke_checks_every_result() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench", "smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "mismatches: 0 (ceiling 0, dsat 0, tracker 0)" in output, output
    for part in ("ceiling", "dsat", "tracker"):
        checked = next(line for line in output.splitlines() if line.startswith(part + " "))
        assert " 0 checked" not in checked, checked
    assert "FAILED" not in output, output


def test_bench_refuses_bad_arguments() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench", "dsat", "--runs", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 2
    assert "--runs" in run.stderr
