"""The ``dsat`` command: argparse in, library calls out, no logic of its own."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence

from dsat import __version__
from dsat.errors import DsatError, TopologyError
from dsat.graph import to_dot, to_svg
from dsat.message import PROTOCOL
from dsat.topology import load_topology


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
