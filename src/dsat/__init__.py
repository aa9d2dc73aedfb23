"""dsat: distributed satellites.

Run a processing pipeline as a directed graph of long-lived processes on one or
many hosts, connected by ZeroMQ, supervised by circus, with every task's state
machine reported to a tracker and kept in a status store.
"""

from dsat.errors import DsatError, MessageError, Problem, TopologyError, VersionError
from dsat.fsm import Event
from dsat.message import Envelope, Vector, parse_event, send_vector
from dsat.topology import Topology, get_connection, load_topology
from dsat.version import Version, compatible

__version__ = "0.1.0"

__all__ = [
    "DsatError",
    "Envelope",
    "Event",
    "MessageError",
    "Problem",
    "Topology",
    "TopologyError",
    "Vector",
    "Version",
    "VersionError",
    "__version__",
    "compatible",
    "get_connection",
    "load_topology",
    "parse_event",
    "send_vector",
]
