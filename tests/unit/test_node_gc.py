"""A node's garbage collector: thresholds set for a long-lived process, cycles still freed."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_a_node_collects_in_larger_sweeps_and_still_frees_cycles() -> None:
    # in a fresh interpreter: the test process's own collector is left alone
    script = textwrap.dedent(
        """
        import gc, weakref
        from dsat.node import GC_THRESHOLDS, tune_gc

        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS, gc.get_threshold()
        assert gc.get_freeze_count() > 0  # what start-up made is out of every sweep

        class Node:
            pass

        alive = []
        for _ in range(300_000):
            a, b = Node(), Node()
            a.other, b.other = b, a  # a cycle: reference counting alone never frees it
            alive.append(weakref.ref(a))
        left = sum(1 for ref in alive if ref() is not None)
        # freed by the collector on its own, without gc.collect()
        assert left < 150_000, left
        print("ok", left)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok"), run.stdout
