"""Run one node of a satellite: the process circus starts for a router, a worker, a tracker...

``python -m dsat.node --topology PATH --satellite NAME --node NODE [--wid WID]``

The process dies with its supervisor (Linux ``PR_SET_PDEATHSIG``), so killing
``dsat run`` or its arbiter, even with SIGKILL, leaves no orphan. SIGTERM asks
it to stop gracefully: a worker finishes the task at hand, a router refuses new
tasks and hands on what it holds, the tracker writes what it has read.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, Final, Protocol

import zmq

from dsat.errors import DsatError
from dsat.runlock import join_run
from dsat.topology import ORCHESTER, QUEUE_SUFFIX, TRACKER, Kind, load_topology

log = logging.getLogger("dsat.node")

PR_SET_PDEATHSIG: Final = 1
SUPERVISOR_ENV: Final = "DSAT_SUPERVISOR_PID"
RUN_ENV: Final = "DSAT_RUN_ID"  # the run of the satellite a node belongs to (see dsat.runlock)
CANNOT_START: Final = "cannot start: "  # what a node logs when it cannot (dsat run reads it)
NO_ROOM_RETRY: Final = 0.5  # seconds between two starts on a full disk
NO_ROOM_LOG_EVERY: Final = 10.0
# Collect young objects every 100,000 allocations instead of 700, and the old ones
# far less often: a node allocates a few containers per message, nearly all freed
# by reference counting, and each collection walks the tracker's live tasks again.
# Measured on the benchmark pipeline: the tracker's CPU per task fell by about 20%.
GC_THRESHOLDS: Final = (100_000, 50, 1_000)


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` when our parent dies; exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: nothing to ask for
        return
    if parent and os.getppid() != parent:
        os._exit(1)  # the parent died before prctl: we are already an orphan


class Runnable(Protocol):
    def run(self) -> None: ...

    def stop(self) -> None: ...


def build(
    args: argparse.Namespace, context: zmq.Context[zmq.Socket[bytes]], run: str = ""
) -> Runnable:
    """The object that plays this node's part (``run``: the run it belongs to)."""
    topology = load_topology(args.topology, check_imports=False)
    satellite = args.satellite
    journal_dir = os.path.join(topology.state_dir(satellite), "journal")
    node = args.node

    def guard() -> Any:
        from dsat.curve import guard_for

        return guard_for(topology, satellite, context)

    if node == ORCHESTER:
        from dsat.orchester import Orchester

        return Orchester(
            topology,
            satellite=satellite,
            context=context,
            journal_dir=journal_dir,
            guard=guard(),
            run=run,
        )
    if node == TRACKER:
        from dsat.store import open_store
        from dsat.tracker import Tracker

        store = open_store(topology.store_url(satellite))
        return Tracker(
            topology, satellite=satellite, context=context, store=store, guard=guard(), run=run
        )
    step = topology.steps[node.removesuffix(QUEUE_SUFFIX)]
    if step.kind is Kind.SOURCE:
        from dsat.orchester import Source

        return Source(topology, step.name, satellite=satellite, context=context)
    if step.kind is Kind.POOL and not node.endswith(QUEUE_SUFFIX):
        from dsat.worker import Worker

        return Worker(
            topology, step.name, satellite=satellite, wid=args.wid or node, context=context, run=run
        )
    from dsat.router import make_router

    return make_router(
        topology,
        node,
        satellite=satellite,
        context=context,
        journal_dir=journal_dir,
        guard=guard(),
        run=run,
    )


def _no_room(exc: DsatError) -> bool:
    """Did it fail for want of room on a disk (a journal, or the store)?"""
    from dsat.journal import JournalError

    if isinstance(exc, JournalError):
        return exc.disk_full
    text = str(exc)
    return "database or disk is full" in text or "No space left on device" in text


def tune_gc() -> None:
    """Set up the cyclic garbage collector for a long-lived node (see GC_THRESHOLDS).

    What was made at start (modules, the topology) is frozen out of every collection;
    cycles made later are still collected, only in larger and rarer sweeps.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dsat.node", description="Run one node of a satellite (circus does)."
    )
    parser.add_argument("--topology", required=True)
    parser.add_argument("--satellite", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--wid", default="")
    args = parser.parse_args(argv)
    die_with_parent(int(os.environ.get(SUPERVISOR_ENV, "0") or 0))
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format=f"%(asctime)s {args.node}[{os.getpid()}] %(levelname)s %(message)s",
    )
    faulthandler.enable()  # a crash in C code still leaves every thread's stack in the log
    run = os.environ.get(RUN_ENV, "")
    if run:  # started by dsat run: belong to its run, for as long as this process lives
        try:
            topology = load_topology(args.topology, check_imports=False)
            join_run(topology.runtime_dir(args.satellite))  # its fd stays open while we live
        except DsatError as exc:
            log.error("%s%s", CANNOT_START, exc)
            return 2
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    runnable: Runnable | None = None
    stop_asked = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop_asked
        log.info("stopping (signal %d)", signum)
        stop_asked = True
        if runnable is not None:
            runnable.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    waiting_since = logged = 0.0
    while runnable is None:
        try:
            runnable = build(args, context, run)
        except DsatError as exc:
            if not _no_room(exc):
                log.error("%s%s", CANNOT_START, exc)
                context.destroy(linger=0)
                return 2
            # a full disk frees up by itself: wait here rather than fail (circus would
            # start the node again and again, and dsat run give up)
            now = time.monotonic()
            if not waiting_since or now - logged >= NO_ROOM_LOG_EVERY:
                log.error("waiting for room on the disk to start: %s", exc)
                logged = now
            waiting_since = waiting_since or now
            if stop_asked:
                context.destroy(linger=0)
                return 0
            time.sleep(NO_ROOM_RETRY)
    if waiting_since:
        log.warning("started after %.0fs waiting for room", time.monotonic() - waiting_since)
    if stop_asked:
        runnable.stop()

    tune_gc()
    try:
        runnable.run()
    except DsatError as exc:
        log.error("stopped: %s", exc)
        return 1
    finally:
        context.destroy(linger=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
