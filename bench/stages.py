"""The three stages of the benchmark pipeline: plain functions over a {"n", "s"} payload.

The same functions run everywhere: in the raw pyzmq chain (imported), in dsat's
workers (this file is copied next to the topology as ``stages.py``) and in
Celery's worker (wrapped as tasks in :mod:`bench.celery_app`).
"""

from __future__ import annotations

from typing import Any

Payload = dict[str, Any]


def s1(payload: Payload) -> Payload:
    """n + 1."""
    return {"n": payload["n"] + 1, "s": payload["s"]}


def s2(payload: Payload) -> Payload:
    """n * 2."""
    return {"n": payload["n"] * 2, "s": payload["s"]}


def s3(payload: Payload) -> Payload:
    """n - 3."""
    return {"n": payload["n"] - 3, "s": payload["s"]}
