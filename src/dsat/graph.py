"""Draw a topology as Graphviz DOT: satellites as clusters, fixed points and moving parts apart."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Final

from dsat.errors import DsatError
from dsat.topology import Role, Topology

_SHAPES: Final = {
    Role.ORCHESTER: 'shape=box, style="rounded,bold"',
    Role.SOURCE: "shape=cds",
    Role.QUEUE: 'shape=box, style="rounded"',  # a router: a fixed point that binds
    Role.ROUTER: 'shape=box, style="rounded"',
    Role.WORKER: 'shape=box3d, style="filled", fillcolor="#e8f0fe"',  # a pool: moving parts
    Role.SINK: "shape=cylinder",
    Role.TRACKER: 'shape=note, style="dashed"',
}


def _id(satellite: str, node: str) -> str:
    return json.dumps(f"{satellite}/{node}")


def to_dot(topology: Topology) -> str:
    """The topology as a DOT digraph: routers as rounded boxes, pools as stacked boxes."""
    lines = [
        "digraph dsat {",
        "  rankdir=LR;",
        '  node [fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    entries = [s.name for s in topology.steps.values() if s.entry]
    for satellite in topology.satellites:
        lines.append(f"  subgraph {json.dumps('cluster_' + satellite)} {{")
        lines.append(f"    label={json.dumps('satellite ' + satellite)};")
        for node in topology.nodes(satellite):
            if node.role is Role.ORCHESTER and not any(
                satellite in topology.steps[e].satellites for e in entries
            ):
                continue
            label = node.name
            if node.role is Role.WORKER:
                span = str(node.min) if node.min == node.max else f"{node.min}..{node.max}"
                label = f"{node.name}\\nworkers {span}"
            elif node.role is Role.QUEUE:
                label = f"{node.name}\\n(router)"
            elif node.role is Role.SOURCE:
                label = f"{node.name}\\nevery {topology.steps[node.step].every:g}s"
            lines.append(
                f'    {_id(satellite, node.name)} [label="{label}", {_SHAPES[node.role]}];'
            )
            if node.role is Role.WORKER:
                queue = _id(satellite, topology.inbox(node.step))
                lines.append(f"    {queue} -> {_id(satellite, node.name)} [style=bold];")
        lines.append("  }")
    for satellite in topology.satellites:
        for entry in entries:
            if satellite in topology.steps[entry].satellites:
                lines.append(
                    f"  {_id(satellite, 'orchester')} -> {_id(satellite, topology.inbox(entry))}"
                    ' [style=dashed, label="submit"];'
                )
    for link in topology.links:
        source = topology.steps[link.source]
        for here in source.satellites:
            for there in topology.steps[link.target].satellites:
                attributes = []
                if link.when:
                    attributes.append(f"label={json.dumps('when ' + link.when)}")
                if link.pattern.value == "pub":
                    attributes.append("arrowhead=veevee")
                if here != there:
                    attributes.append('color="#b06000"')
                sender = _id(here, link.source)
                inbox = _id(there, topology.inbox(link.target))
                suffix = f" [{', '.join(attributes)}]" if attributes else ""
                lines.append(f"  {sender} -> {inbox}{suffix};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_svg(dot: str, path: str) -> None:
    """Render DOT to an SVG file with Graphviz's ``dot`` command.

    Raises:
        DsatError: ``dot`` is not installed, or it failed.
    """
    program = shutil.which("dot")
    if program is None:
        raise DsatError(
            "--svg needs Graphviz's 'dot' command, which is not installed "
            "(apt-get install graphviz); the DOT text above can be rendered elsewhere"
        )
    try:
        subprocess.run(
            [program, "-Tsvg", "-o", path],
            input=dot.encode(),
            check=True,
            capture_output=True,
            timeout=60,
        )
    except subprocess.CalledProcessError as exc:
        raise DsatError(f"dot failed: {exc.stderr.decode(errors='replace').strip()}") from exc
    except subprocess.TimeoutExpired as exc:
        raise DsatError("dot took more than 60 s; giving up") from exc
