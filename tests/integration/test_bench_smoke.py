"""The benchmark suite's smoke run: every part on a few hundred tasks, correctness only.

No figure is asserted (timings belong to ``python -m bench all``, not to tests);
what must hold is that every part runs and every result checks out.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m bench ARGS`` from the repository root, as the docs say to run it."""
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_bench_smoke_checks_every_result() -> None:
    run = bench("smoke", timeout=240)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "mismatches: 0 (ceiling 0, dsat 0, sinks 0, tracker 0)" in output, output
    for part in ("ceiling", "dsat", "sinks", "tracker"):
        checked = next(line for line in output.splitlines() if line.startswith(part + " "))
        assert " 0 checked" not in checked, checked
    assert "FAILED" not in output, output
    # where the time goes: CPU per task of each role (the clock ticks every 10 ms, so a
    # role's share of a few hundred tasks may read 0; their sum may not)
    spent = re.search(
        r"CPU per task \(us\): tracker ([\d,.]+), orchester ([\d,.]+), "
        r"queues ([\d,.]+), workers ([\d,.]+), total ([\d,.]+)",
        output,
    )
    assert spent is not None, output
    roles = [float(value.replace(",", "")) for value in spent.groups()]
    assert roles[-1] > 0, spent.group(0)
    assert abs(sum(roles[:-1]) - roles[-1]) <= 2, spent.group(0)  # rounded to 1 us each
    assert re.search(r"ceiling: .* CPU per task [\d,.]+ us", output), output
    # and with one task in flight (what the latency run costs each role)
    assert re.search(r"dsat latency: p50 .* CPU per task \(us\): tracker [\d,.]+", output), output
    # the same pipeline with sink steps: the routers run the functions, no workers
    assert re.search(
        r"dsat sinks: .* CPU per task \(us\): tracker [\d,.]+, orchester [\d,.]+, "
        r"sinks [\d,.]+, total [\d,.]+$",
        output,
        re.MULTILINE,
    ), output
    assert re.search(r"dsat sinks latency: p50 .* sinks [\d,.]+, total", output), output


def test_bench_refuses_bad_arguments() -> None:
    run = bench("dsat", "--runs", "0", timeout=60)
    assert run.returncode == 2
    assert "--runs" in run.stderr
