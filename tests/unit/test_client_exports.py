"""The client module is what callers import: its `__all__` names exactly its public API."""

from __future__ import annotations

import types

from quantrouter import client

# Imported helpers that are not part of the client's API.
NOT_EXPORTED = {"annotations", "dataclass", "field", "grpc", "pb", "pb_grpc", "rpc_status", "error_details_pb2",
                "Any", "Literal", "AsyncIterator", "Iterator", "Sequence", "TracebackType"}


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name, value in vars(client).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert set(client.__all__) == public - NOT_EXPORTED
