"""`quantrouter generate`, `route` and `variants` are client commands: they do not load the server; `serve`
does not load the extras.

Each runs in a fresh interpreter against a port nobody listens on, so the command really parses its
arguments, dials and fails (UNAVAILABLE), and the modules it loaded on the way are what it costs.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.hardening.helpers import free_port

# What only serving needs: the server's assembly, the router, the metrics library.
SERVER_SIDE = ("quantrouter.server", "quantrouter.router", "quantrouter.service", "prometheus_client")

PROBE = (
    "import sys\n"
    "from quantrouter.cli import main\n"
    "code = main(sys.argv[1:])\n"
    f"print(' '.join(m for m in {SERVER_SIDE!r} if m in sys.modules))\n"
    "sys.exit(code)\n"
)



@pytest.mark.parametrize("command", [
    ("generate", "gemma3:270m", "Why is the sky blue?"),
    ("route", "gemma3:270m"),
    ("variants",),
])
def test_client_commands_do_not_import_the_server(command: tuple[str, ...]) -> None:
    target = f"127.0.0.1:{free_port()}"
    result = subprocess.run([sys.executable, "-c", PROBE, *command, "--target", target, *(
        ("--timeout", "5") if command[0] != "variants" else ())],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "UNAVAILABLE" in result.stderr
    assert result.stdout.split() == []


# What only the extras' commands need (embedded llama.cpp, tools, Kubernetes discovery, plots): never resident in
# a router process, where each would cost memory for nothing.
EXTRAS = ("numpy", "gguf", "llama_cpp", "matplotlib", "tqdm", "lightkube", "quantrouter.embedded",
          "quantrouter.tools")

SERVE_PROBE = (
    "import logging, os, sys\n"
    "from quantrouter.cli import main\n"
    "class Probe(logging.Handler):\n"
    "    def emit(self, record):\n"
    "        if record.getMessage().startswith('quantrouter serving on port'):\n"
    f"            print('serving', *(m for m in {EXTRAS!r} if m in sys.modules), flush=True)\n"
    "            os._exit(0)\n"
    "logging.getLogger('quantrouter.server').addHandler(Probe())\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_serve_does_not_import_the_extras() -> None:
    """A real router (its backend unreachable: it starts anyway, NOT_SERVING), asked once it serves; the probe
    then ends the process at once (it is a probe, not a shutdown test)."""
    result = subprocess.run([sys.executable, "-c", SERVE_PROBE, "serve", "--grpc-address", "127.0.0.1:0",
                             "--metrics-address", "127.0.0.1:0", "--ollama-host", f"127.0.0.1:{free_port()}",
                             "--memory-capacity", "8GiB"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["serving"]
