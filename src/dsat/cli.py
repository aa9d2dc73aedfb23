"""The ``dsat`` command: argparse in, library calls out, no logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from dsat import __version__
from dsat.errors import DsatError, TopologyError
from dsat.graph import to_dot, to_svg
from dsat.message import PROTOCOL
from dsat.topology import load_topology

DEFAULT_TOPOLOGY = "topology.toml"


def _check(args: argparse.Namespace) -> int:
    try:
        topology = load_topology(args.topology)
    except TopologyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        count = len(exc.problems)
        print(f"{count} problem{'s' if count != 1 else ''} found", file=sys.stderr)
        return 1
    kinds = Counter(str(step.kind) for step in topology.steps.values())
    summary = ", ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in sorted(kinds.items()))
    links = len(topology.links)
    satellites = ", ".join(topology.satellites)
    print(
        f"ok: {args.topology}: {len(topology.steps)} steps ({summary}), "
        f"{links} link{'s' if links != 1 else ''}, satellites: {satellites}"
    )
    return 0


def _graph(args: argparse.Namespace) -> int:
    topology = load_topology(args.topology, check_imports=False)
    dot = to_dot(topology)
    sys.stdout.write(dot)
    if args.svg:
        to_svg(dot, args.svg)
        print(f"wrote {args.svg}", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    from dsat.supervisor import Satellite

    logging.basicConfig(level=logging.INFO, format="dsat run: %(message)s")
    topology = load_topology(args.topology)
    satellite = Satellite(topology, args.satellite or next(iter(topology.satellites)))
    signal.signal(signal.SIGTERM, satellite.request_stop)
    signal.signal(signal.SIGINT, satellite.request_stop)
    print(f"dsat: starting satellite {satellite.name} of {topology.path}", flush=True)
    print(f"dsat: logs in {satellite.run_dir}", flush=True)
    try:
        satellite.start()
        nodes = len(topology.nodes(satellite.name))
        print(f"dsat: running ({nodes} process kinds); Ctrl-C or SIGTERM stops it", flush=True)
        satellite.wait(args.duration)
    finally:
        print("dsat: stopping (in order: nothing accepted is dropped)", flush=True)
        satellite.stop()
    print("dsat: stopped", flush=True)
    return 0


def _client(args: argparse.Namespace) -> Any:
    from dsat.client import connect

    return connect(
        args.topology,
        satellite=args.satellite or "",
        timeout=args.timeout,
        key=getattr(args, "key", None),
    )


def _submit(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise DsatError(f"payload is not JSON: {exc}") from exc
    with _client(args) as client:
        task_id = client.submit(args.step, payload, job_id=args.job)
        print(task_id)
        if args.wait:
            print(json.dumps(client.wait(task_id, timeout=args.wait), default=repr))
    return 0


def _status(args: argparse.Namespace) -> int:
    from dsat.state import ResultNotKeptError

    with _client(args) as client:
        state = client.state(args.task)
    try:
        result, not_kept = state.result, ""
    except ResultNotKeptError as exc:
        result, not_kept = None, str(exc)
    if args.json:
        data = _state_json(state)
        if not_kept:
            data["result_not_kept"] = not_kept
        print(json.dumps(data, indent=2, default=repr))
        return 0
    print(f"task     {state.task_id}  (job {state.job_id})")
    print(
        f"state    {state.state}"
        + (f" (last known: {state.last_known})" if state.last_known else "")
    )
    print(f"step     {state.step}  attempt {state.attempt}")
    if state.error:
        print(f"error    {state.error}")
    if state.traceback:
        print("traceback")
        for line in state.traceback.rstrip("\n").splitlines():
            print(f"  {line}")
    print(f"created  {_time(state.created)}   updated {_time(state.updated)}")
    if state.anomalies or state.duplicates:
        print(f"flags    {state.anomalies} anomalies, {state.duplicates} duplicates")
    if not_kept:
        print(f"result   not kept: {not_kept}")
    elif state.results:
        print(f"result   {json.dumps(result, default=repr)}")
    if len(state.branches) > 1:
        ended = sum(1 for b in state.branches if b.over)
        print(f"branches {len(state.branches)}, {ended} ended")
        for branch in state.branches:
            error = f"  {branch.error}" if branch.error else ""
            print(
                f"  branch {branch.branch:<20} {branch.state or '-':10} {branch.step or '-':12} "
                f"try {branch.attempt}{error}"
            )
    print("history (in the order things happened; # is the order the tracker got them)")
    for event in state.history:
        print("  " + _event_line(event))
    return 0


def _watch(args: argparse.Namespace) -> int:
    if args.pools == bool(args.task):
        raise DsatError("watch: give a task id, or --pools (not both)")
    with _client(args) as client:
        if args.pools:
            for decision in client.decisions(timeout=args.for_seconds):
                print(
                    f"{_time(decision.get('at'), precise=True)} autoscale "
                    f"{decision.get('satellite')}/{decision.get('pool')}: "
                    f"{decision.get('before')} -> {decision.get('after')} workers "
                    f"({decision.get('reason')})",
                    flush=True,
                )
            return 0
        for event in client.status_for(args.task, timeout=args.for_seconds):
            print(_event_line(event), flush=True)
    return 0


def _top(args: argparse.Namespace) -> int:
    if args.topology_file:  # the file given first, as before -t existed
        args.topology = args.topology_file
    with _client(args) as client:
        deadline = time.monotonic() + args.duration if args.duration else None
        while True:
            frame = _top_frame(client)
            if sys.stdout.isatty() and not args.once:
                sys.stdout.write("\x1b[H\x1b[2J")  # home, clear: a table that refreshes
            print(frame, flush=True)
            if args.once or (deadline and time.monotonic() >= deadline):
                return 0
            time.sleep(1.0)


def _top_frame(client: Any) -> str:
    pools = client.pools()
    loads = client.load()
    lines = [
        f"dsat top  {time.strftime('%H:%M:%S')}  satellite {client.satellite}",
        "",
        f"{'pool':24} {'workers min/now/max':>19} {'busy':>5} {'idle':>5} {'queued':>7} "
        f"{'done/s':>8} {'errors/s':>8} {'mean':>8} {'p95':>8}  last scaling",
    ]
    shown = set()
    here = client.satellite
    for name, pool in sorted(pools.items()):
        if pool["satellite"] != here:
            continue
        load = loads.get(f"{pool['satellite']}/{pool['pool']}.queue")
        shown.add(f"{pool['satellite']}/{pool['pool']}.queue")
        decisions = pool.get("decisions") or []
        last = decisions[-1] if decisions else None
        scaling = (
            f"{last['before']} -> {last['after']} at {_time(last['at'])[11:]}" if last else "-"
        )
        if load is None:
            lines.append(f"{name:24} {pool['min']:>7}/{'?':>3}/{pool['max']:<3}   (no report yet)")
            continue
        workers = f"{pool['min']}/{load.workers}/{pool['max']}"
        lines.append(
            f"{name:24} {workers:>19} {load.busy:>5} {load.idle:>5} {load.queued:>7} "
            f"{load.done_per_s:>8.1f} {load.errors_per_s:>8.2f} {_ms(load.mean):>8} "
            f"{_ms(load.p95):>8}  {scaling}"
        )
    peers = [load for name, load in loads.items() if load.role == "tracker"]
    others = [
        (name, load)
        for name, load in sorted(loads.items())
        if name not in shown and load.role != "tracker"
    ]
    if others:
        lines += [
            "",
            f"{'node':24} {'role':>10} {'queued':>7} {'held':>5} {'done/s':>8} "
            f"{'errors/s':>8} {'malformed':>9}",
        ]
        for name, load in others:
            lines.append(
                f"{name:24} {load.role:>10} {load.queued:>7} {load.held:>5} "
                f"{load.done_per_s:>8.1f} {load.errors_per_s:>8.2f} {load.malformed_total:>9}"
            )
    stats = client.stats()
    malformed = sum(load.malformed_total for load in loads.values()) + sum(
        stats.get("malformed", {}).values()
    )
    if peers:
        heard = ", ".join(
            f"{p.satellite} {p.age:.1f}s ago" for p in sorted(peers, key=lambda p: p.satellite)
        )
        lines += ["", f"peer satellites last heard: {heard}"]
    lines += [
        "",
        f"tracker: {stats.get('live', 0)} live tasks, {stats.get('applied', 0)} "
        f"events applied, {stats.get('anomalies', 0)} anomalies; "
        f"malformed messages: {malformed}",
    ]
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms" if seconds else "-"


def _tasks(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows = client.tasks(
            job_id=args.job, step=args.step, state=args.state, stuck=args.stuck, limit=args.limit
        )
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
        return 0
    print(f"{'task_id':24} {'state':10} {'step':12} {'try':>3}  {'updated':19}  error")
    for row in rows:
        print(
            f"{row.task_id:24} {row.state:10} {row.step:12} {row.attempt:>3}  "
            f"{_time(row.updated)}  {row.error[:60]}"
        )
    return 0


def _retry(args: argparse.Namespace) -> int:
    filters = args.job is not None or args.step is not None or args.state is not None
    if not args.tasks and not filters:
        raise DsatError(
            "retry: give task ids, or --state FAILURE, --job or --step to send again every "
            "dead letter that matches"
        )
    with _client(args) as client:
        sent = client.retry_many(args.tasks, job_id=args.job, step=args.step, limit=args.limit)
    for task_id in sent:
        print(f"{task_id}: sent again")
    print(f"{len(sent)} task{'s' if len(sent) != 1 else ''} sent again")
    return 0


def _time(stamp: float | None, *, precise: bool = False) -> str:
    if not stamp:
        return "-"
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
    return f"{text}.{int(stamp * 1000) % 1000:03d}" if precise else text


def _event_line(event: Any) -> str:
    where = f"{event.step or '-'}"
    flag = f"  [{event.flag}]" if event.flag else ""
    error = f"  {event.detail.get('error')}" if event.detail.get("error") else ""
    stamp = _time(event.at, precise=True)[11:]
    return (
        f"#{event.tseq:<4} {stamp} {event.event:10} {where:12} {event.where or '-':8} "
        f"branch {event.branch} try {event.attempt} seq {event.seq} {event.wid}{error}{flag}"
    )


def _state_json(state: Any) -> dict[str, Any]:
    data = dict(state.__dict__)
    data["over"] = state.over
    data["history"] = [dict(e.__dict__) for e in state.history]
    data["results"] = dict(state.results)
    data["branches"] = [{**b.__dict__, "over": b.over} for b in state.branches]
    return data


def _keys(args: argparse.Namespace) -> int:
    from dsat.curve import generate

    public_path, secret_path = generate(args.name, args.dir)
    with open(public_path) as file:
        public = file.read().strip()
    print(f"wrote {public_path} (public: share it) and {secret_path} (secret, mode 0600)")
    print("in the topology, for a satellite:")
    print(f"  [satellite.{args.name}]")
    print(f'  public_key = "{public}"')
    print(f'  secret_key_file = "{secret_path}"')
    print("or, for a client that connects over tcp:")
    print(f"  [client.{args.name}]")
    print(f'  public_key = "{public}"')
    return 0


def _version(args: argparse.Namespace) -> int:
    print(f"dsat {__version__}")
    print(f"protocol {PROTOCOL}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per user action."""
    parser = argparse.ArgumentParser(
        prog="dsat",
        description="Run a pipeline as a graph of long-lived processes over ZeroMQ, "
        "and see where every task is.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check",
        help="check a topology file and list every problem in it",
        description="Load a topology, check it whole (steps, links, functions, addresses) and "
        "print 'ok' with a summary, or every problem with its file, place and reason. "
        "Exits 1 when there are problems.",
    )
    check.add_argument("topology", help="the topology file (TOML, or JSON)")
    check.set_defaults(handler=_check)

    graph = commands.add_parser(
        "graph",
        help="print the topology as a Graphviz DOT graph",
        description="Print the graph as DOT on stdout: satellites as clusters, routers as "
        "rounded boxes, worker pools as stacked boxes, the implicit queue of each pool included.",
    )
    graph.add_argument("topology", help="the topology file")
    graph.add_argument("--svg", metavar="FILE", help="also render an SVG (needs Graphviz's dot)")
    graph.set_defaults(handler=_graph)

    run = commands.add_parser(
        "run",
        help="run a satellite: its routers, worker pools, tracker, under circus",
        description="Start one satellite of a topology under circus (one watcher per step, "
        "the tracker, the orchester) and keep it running until Ctrl-C or SIGTERM, which stop "
        "it in order: nothing accepted is dropped, queued tasks resume at the next run. "
        "Prints the run directory where each process logs.",
    )
    run.add_argument("topology", help="the topology file")
    run.add_argument("--satellite", help="which satellite (default: the first one)")
    run.add_argument(
        "--for",
        dest="duration",
        type=float,
        metavar="SECONDS",
        help="stop by itself after this many seconds",
    )
    run.set_defaults(handler=_run)

    def client_command(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text, description=description)
        command.add_argument(
            "-t",
            "--topology",
            default=os.environ.get("DSAT_TOPOLOGY", DEFAULT_TOPOLOGY),
            help="the topology file (default: $DSAT_TOPOLOGY or ./topology.toml)",
        )
        command.add_argument("--satellite", help="which satellite (default: the first one)")
        command.add_argument(
            "--timeout",
            type=float,
            default=10.0,
            help="seconds to wait for the satellite (default 10)",
        )
        command.add_argument(
            "--key",
            help="this client's secret key file, for a satellite reached over tcp "
            "(default: $DSAT_KEY)",
        )
        return command

    submit = client_command(
        "submit",
        "submit a task to a step and print its task id",
        "Submit one task whose payload is the JSON text given, to a step; print its task_id.",
    )
    submit.add_argument("step", help="the step to submit to")
    submit.add_argument("payload", help="the payload, as JSON (e.g. '{\"n\": 1}')")
    submit.add_argument("--job", help="the job_id to file it under")
    submit.add_argument(
        "--wait", type=float, metavar="SECONDS", help="also wait for its result and print it"
    )
    submit.set_defaults(handler=_submit)

    status = client_command(
        "status",
        "print a task's state and history",
        "Print a task's State: its state (UNKNOWN when its fate is not known), step, attempts, "
        "error and its traceback, result, each branch of a fanned-out task, and every event "
        "of its history in the order things happened. A task is over only when every branch "
        "has ended.",
    )
    status.add_argument("task", help="the task id")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_status)

    watch = client_command(
        "watch",
        "follow a task's events live until it ends (status_for)",
        "Print a task's events as they happen, from its first one, until it ends; or, with "
        "--pools, every autoscaling decision as it is made.",
    )
    watch.add_argument("task", nargs="?", help="the task id")
    watch.add_argument(
        "--pools",
        action="store_true",
        help="print the autoscaling decisions of every pool as they are made",
    )
    watch.add_argument(
        "--for",
        dest="for_seconds",
        type=float,
        metavar="SECONDS",
        help="give up after this many seconds",
    )
    watch.set_defaults(handler=_watch)

    top = client_command(
        "top",
        "the live load of every pool, refreshed every second",
        "Show each pool's workers (min/now/max), busy and idle workers, queue "
        "length, tasks done and errors per second, mean and p95 task time, and its last "
        "autoscaling decision; then the other nodes; refreshed every second until Ctrl-C.",
    )
    top.add_argument(
        "topology_file",
        nargs="?",
        metavar="topology",
        help="the topology file, as -t gives it (for scripts that give it first)",
    )
    top.add_argument("--once", action="store_true", help="print the table once and exit")
    top.add_argument(
        "--for", dest="duration", type=float, metavar="SECONDS", help="stop after this long"
    )
    top.set_defaults(handler=_top)

    tasks = client_command(
        "tasks",
        "list tasks by job, step or state",
        "List tasks, newest first, that match every filter given.",
    )
    tasks.add_argument("--job", help="only this job_id")
    tasks.add_argument("--step", help="only tasks whose latest event was at this step")
    tasks.add_argument("--state", help="only this state (HAPPY_END, FAILURE, START, UNKNOWN...)")
    tasks.add_argument(
        "--stuck",
        action="store_true",
        help="only tasks that made no progress for longer than their deadline",
    )
    tasks.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    tasks.add_argument("--json", action="store_true", help="print JSON")
    tasks.set_defaults(handler=_tasks)

    retry = client_command(
        "retry",
        "send failed tasks (dead letters) again: by id, or every one of a job or step",
        "Send tasks that ended in FAILURE again, each with its payload, from the step where it "
        "failed: the tasks named, or every dead letter that matches --job and --step (both "
        "when both are given; --state FAILURE alone: every dead letter). Prints each task "
        "sent again, then how many. A task named that is not a dead letter is an error, and "
        "then nothing is sent.",
    )
    retry.add_argument("tasks", nargs="*", metavar="task", help="task ids")
    retry.add_argument("--job", help="every dead letter of this job_id")
    retry.add_argument("--step", help="every dead letter that failed at this step")
    retry.add_argument(
        "--state",
        choices=["FAILURE"],
        help="every dead letter (the only state that can be sent again)",
    )
    retry.add_argument("--limit", type=int, help="at most this many (default: every one)")
    retry.set_defaults(handler=_retry)

    keys = commands.add_parser(
        "keys",
        help="CURVE key pairs for secure links between satellites",
        description="Manage CURVE key pairs. Links between satellites are encrypted, and only "
        "the public keys the topology names are let in.",
    )
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    generate = key_commands.add_parser(
        "generate",
        help="write NAME.key (public) and NAME.key_secret (secret, mode 0600)",
        description="Make a new CURVE key pair for a satellite or a client, and print the "
        "topology lines that use it.",
    )
    generate.add_argument("name", help="the satellite's (or client's) name")
    generate.add_argument("--dir", default="keys", help="where to write them (default: keys/)")
    generate.set_defaults(handler=_keys)

    version = commands.add_parser(
        "version",
        help="print the package and wire-protocol versions",
        description="Print dsat's version and the version of the wire protocol it speaks.",
    )
    version.set_defaults(handler=_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dsat`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except DsatError as exc:
        print(f"dsat {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
