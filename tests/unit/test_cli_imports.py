"""`quantrouter generate`, `route` and `variants` are client commands: they do not load the server.

Each runs in a fresh interpreter against a port nobody listens on, so the command really parses its
arguments, dials and fails (UNAVAILABLE), and the modules it loaded on the way are what it costs.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

# What only serving needs: the server's assembly, the router, the metrics library.
SERVER_SIDE = ("quantrouter.server", "quantrouter.router", "quantrouter.service", "prometheus_client")

PROBE = (
    "import sys\n"
    "from quantrouter.cli import main\n"
    "code = main(sys.argv[1:])\n"
    f"print(' '.join(m for m in {SERVER_SIDE!r} if m in sys.modules))\n"
    "sys.exit(code)\n"
)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("command", [
    ("generate", "gemma3:270m", "Why is the sky blue?"),
    ("route", "gemma3:270m"),
    ("variants",),
])
def test_client_commands_do_not_import_the_server(command: tuple[str, ...]) -> None:
    target = f"127.0.0.1:{_closed_port()}"
    result = subprocess.run([sys.executable, "-c", PROBE, *command, "--target", target, *(
        ("--timeout", "5") if command[0] != "variants" else ())],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "UNAVAILABLE" in result.stderr
    assert result.stdout.split() == []
