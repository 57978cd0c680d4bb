"""The client module is what callers import: its `__all__` names exactly its public API."""

from __future__ import annotations

import subprocess
import sys
import types

from quantrouter import client

# Imported helpers that are not part of the client's API.
NOT_EXPORTED = {"annotations", "dataclass", "field", "grpc", "pb", "pb_grpc", "rpc_status", "error_details_pb2",
                "Any", "Literal", "AsyncIterator", "Iterator", "Sequence", "TracebackType"}


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name, value in vars(client).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert set(client.__all__) == public - NOT_EXPORTED


def test_importing_the_client_loads_neither_the_router_nor_its_dependencies() -> None:
    """A caller of `quantrouter.client` pays for grpc and the generated stubs only (a fresh interpreter)."""
    probe = ("import sys, quantrouter.client\n"
             "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {'ollama', 'prometheus_client', "
             "'httpx'} or m in {'quantrouter.router', 'quantrouter.policy', 'quantrouter.server'})))\n")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert loaded.stdout.split() == []
