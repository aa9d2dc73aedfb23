"""The public names users import: pinned, so a change to them is a decision."""

from __future__ import annotations

import dsat


def test_the_public_names_are_pinned() -> None:
    assert dsat.__all__ == sorted(dsat.__all__)
    assert set(dsat.__all__) == {
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
    }
    for name in dsat.__all__:
        assert getattr(dsat, name) is not None
