"""A three-stage pipeline through `dsat run`: every task ends, every result is right."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from conftest import RunningSatellite

THREE_STAGES = """
[satellite.local]
runtime_dir = "RUNTIME"

[store]
url = "sqlite:///status.db"

[step.s1]
call = "stages:add1"
entry = true
workers = 2

[step.s2]
call = "stages:mul2"
workers = 2

[step.s3]
call = "stages:sub3"

[[link]]
from = "s1"
to = "s2"

[[link]]
from = "s2"
to = "s3"
"""

STAGES = """
def add1(p):
    return {"n": p["n"] + 1, "text": p["text"]}

def mul2(p):
    return {"n": p["n"] * 2, "text": p["text"]}

def sub3(p):
    return {"n": p["n"] - 3, "text": p["text"]}
"""


def test_a_thousand_tasks_all_end_happily_with_the_right_results(
    satellite: Callable[..., RunningSatellite],
) -> None:
    running = satellite(THREE_STAGES, {"stages": STAGES})
    text = "x" * 100
    with running.client() as client:
        started = time.monotonic()
        task_ids = client.submit_many("s1", [{"n": n, "text": text} for n in range(1000)])
        results = [client.wait(task_id, timeout=60) for task_id in task_ids]
        elapsed = time.monotonic() - started
    print(f"1000 tasks through 3 stages in {elapsed:.2f}s")

    assert [r["n"] for r in results] == [(n + 1) * 2 - 3 for n in range(1000)]
    assert all(r["text"] == text for r in results)
    assert running.stop() == 0
    db = sqlite3.connect(running.directory / "status.db")
    states = dict(db.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall())
    assert states == {"HAPPY_END": 1000}
    assert db.execute("SELECT sum(anomalies), sum(duplicates) FROM tasks").fetchone() == (0, 0)
    assert db.execute("SELECT count(*) FROM results").fetchone() == (1000,)
    per_task = db.execute(
        "SELECT min(events), max(events) FROM tasks"
    ).fetchone()  # INIT, SEND, then ACK START END SEND per stage, HAPPY_END
    assert per_task == (14, 14)
    assert running.survivors() == []
