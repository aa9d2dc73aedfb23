"""A tracker built in the test's process on a real SQLite store, fed by a real DEALER over
ipc as a router feeds it (the unit tests of the tracker share it)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import zmq

from dsat.store import Batch, TaskRow, open_store
from dsat.topology import TRACKER, get_connection, load_topology
from dsat.tracker import Tracker

TOPOLOGY = """\
[satellite.local]
runtime_dir = "{runtime}"

[store]
url = "sqlite:///{store}"

[step.s1]
call = "math:sqrt"
entry = true
"""


def tracker_and_producer(
    tmp_path: Path,
    ipc_dir: Path,
    zctx: zmq.Context[zmq.Socket[bytes]],
    stored: Iterable[TaskRow] = (),
) -> tuple[Tracker, zmq.Socket[bytes]]:
    """A tracker on a store already holding ``stored``, and a producer socket connected to it.

    The caller closes both."""
    path = tmp_path / "topology.toml"
    path.write_text(TOPOLOGY.format(runtime=ipc_dir / "rt", store=tmp_path / "status.db"))
    topology = load_topology(path)
    (ipc_dir / "rt").mkdir(mode=0o700)  # dsat run makes it; here the test does
    url = topology.store_url("local")
    rows = {row.task_id: row for row in stored}
    if rows:
        store = open_store(url)
        store.write(Batch(tasks=dict(rows)))
        store.close()
    tracker = Tracker(topology, satellite="local", context=zctx, store=open_store(url))
    producer = zctx.socket(zmq.DEALER)
    producer.connect(
        get_connection(topology, TRACKER, satellite="local").socket("events").addresses[0]
    )
    return tracker, producer
