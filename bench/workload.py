"""The workload every part shares: payloads, the expected results, and the check.

Task ``i`` carries ``{"n": i, "s": TEXT}``; after ``s1`` (n + 1), ``s2`` (n * 2)
and ``s3`` (n - 3) its result must be ``{"n": (i + 1) * 2 - 3, "s": TEXT}``.
"""

from __future__ import annotations

from typing import Any, Final

from bench.stages import Payload

TEXT: Final = "".join(chr(ord("a") + (i * 7) % 26) for i in range(100))  # 100 characters


def payload(i: int) -> Payload:
    """The payload of task ``i``."""
    return {"n": i, "s": TEXT}


def expected_n(i: int) -> int:
    """What ``n`` becomes after the three stages."""
    return (i + 1) * 2 - 3


def is_right(i: int, result: Any) -> bool:
    """Is ``result`` the right result of task ``i``?"""
    return (
        isinstance(result, dict)
        and result.get("n") == expected_n(i)
        and result.get("s") == TEXT
        and len(result) == 2
    )


class Tally:
    """Results of tasks 0..count-1 that arrive in any order, each checked once.

    A wrong value, a result for no task, a task's second result and a task with
    no result at the end are all mismatches.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.seen = bytearray(count)
        self.received = 0
        self.wrong = 0

    def add(self, result: Any) -> None:
        """Check one result; the task it belongs to is worked out from its ``n``."""
        self.received += 1
        n = result.get("n") if isinstance(result, dict) else None
        if type(n) is not int or (n + 3) % 2:
            self.wrong += 1
            return
        i = (n + 3) // 2 - 1
        if not 0 <= i < self.count or self.seen[i] or not is_right(i, result):
            self.wrong += 1
            return
        self.seen[i] = 1

    @property
    def missing(self) -> int:
        return self.count - sum(self.seen)

    @property
    def mismatches(self) -> int:
        return self.wrong + self.missing
