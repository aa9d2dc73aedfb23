"""The Celery side of the comparison: the three stages as Celery tasks, Redis as broker and backend.

The worker is started by :mod:`bench.peers` as
``celery -A bench.celery_app worker --pool prefork --concurrency 2``; the Redis
URL comes from BENCH_REDIS_URL (the suite starts its own redis-server on a free
port). Results go to database 1 of the same server.
"""

from __future__ import annotations

import os
from typing import Final

from celery import Celery

from bench import stages
from bench.stages import Payload

REDIS_URL: Final = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")

app = Celery("bench", broker=f"{REDIS_URL}/0", backend=f"{REDIS_URL}/1")
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.s1")
def s1(payload: Payload) -> Payload:
    return stages.s1(payload)


@app.task(name="bench.s2")
def s2(payload: Payload) -> Payload:
    return stages.s2(payload)


@app.task(name="bench.s3")
def s3(payload: Payload) -> Payload:
    return stages.s3(payload)
