"""dsat: distributed satellites.

Run a processing pipeline as a directed graph of long-lived processes on one or
many hosts, connected by ZeroMQ, supervised by circus, with every task's state
machine reported to a tracker and kept in a status store.
"""

from dsat.client import (
    Client,
    PayloadTooLargeError,
    SaturatedError,
    SubmitError,
    UnreachableError,
    WaitTimeoutError,
    connect,
)
from dsat.errors import DsatError, MessageError, Problem, TopologyError, VersionError
from dsat.fsm import Event
from dsat.message import Envelope, Vector, parse_event, send_vector
from dsat.state import BranchState, EventInfo, ResultNotKeptError, State, TaskFailedError
from dsat.store import StoreError
from dsat.topology import Topology, get_connection, load_topology
from dsat.version import Version, compatible
from dsat.worker import Task, state_wrapper, step

__version__ = "0.1.0"

__all__ = [
    "BranchState",
    "Client",
    "DsatError",
    "Envelope",
    "Event",
    "EventInfo",
    "MessageError",
    "PayloadTooLargeError",
    "Problem",
    "ResultNotKeptError",
    "SaturatedError",
    "State",
    "StoreError",
    "SubmitError",
    "Task",
    "TaskFailedError",
    "Topology",
    "TopologyError",
    "UnreachableError",
    "Vector",
    "Version",
    "VersionError",
    "WaitTimeoutError",
    "__version__",
    "compatible",
    "connect",
    "get_connection",
    "load_topology",
    "parse_event",
    "send_vector",
    "state_wrapper",
    "step",
]
