"""The burst benchmark's instrument inside the router process: who holds its memory.

`python -m bench.memory_probe <quantrouter arguments>` runs this checkout's `quantrouter` CLI unchanged, after
one addition: on SIGUSR1 the process appends a JSON line of its memory figures to the file that
$QUANTROUTER_BENCH_PROBE names. It only reads (no collection, no trim), so a reading does not change what it
reads. The figures: resident memory; the bytes glibc's malloc has in use; and CPython's small-object allocator
(pymalloc: objects of up to 512 bytes live in 1 MiB arenas, and an arena goes back to the system only once
every block in it is free), from `sys._debugmallocstats`: its arenas, the bytes allocated in them and the free
space inside them, and the blocks allocated.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from quantrouter import cli
from quantrouter.allocator import malloc_in_use
from quantrouter.units import MiB

__all__ = ["PROBE_FILE_VARIABLE", "MemoryFigures", "read_figures"]

PROBE_FILE_VARIABLE = "QUANTROUTER_BENCH_PROBE"
_ARENAS = re.compile(r"^(\d+) arenas \* (\d+) bytes/arena", re.M)
_LIVE = re.compile(r"^# bytes in allocated blocks\s*=\s*([\d,]+)", re.M)
_AVAILABLE = re.compile(r"^# bytes in available blocks\s*=\s*([\d,]+)", re.M)
_UNUSED_POOLS = re.compile(r"^\d+ unused pools \* \d+ bytes\s*=\s*([\d,]+)", re.M)


@dataclass(frozen=True, slots=True)
class MemoryFigures:
    """One reading (MiB); `malloc_in_use_mib` is None where the C library cannot tell (not glibc ≥ 2.33)."""

    malloc_in_use_mib: float | None
    arenas: int
    arenas_mib: float
    arenas_live_mib: float
    arenas_free_mib: float
    blocks: int


def _number(pattern: re.Pattern[str], text: str) -> int:
    match = pattern.search(text)
    return int(match.group(1).replace(",", "")) if match else 0


def _pymalloc_stats() -> str:
    """`sys._debugmallocstats()`'s report, which it writes to file descriptor 2, caught in a file."""
    sys.stderr.flush()
    with tempfile.TemporaryFile("w+") as caught:
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        return caught.read()


def _figures() -> MemoryFigures:
    stats = _pymalloc_stats()
    arenas = _ARENAS.search(stats)
    count, size = (int(arenas.group(1)), int(arenas.group(2))) if arenas else (0, 0)
    in_use = malloc_in_use()
    return MemoryFigures(
        malloc_in_use_mib=None if in_use is None else round(in_use / MiB, 2),
        arenas=count, arenas_mib=round(count * size / MiB, 2),
        arenas_live_mib=round(_number(_LIVE, stats) / MiB, 2),
        arenas_free_mib=round((_number(_AVAILABLE, stats) + _number(_UNUSED_POOLS, stats)) / MiB, 2),
        blocks=sys.getallocatedblocks())


def read_figures(path: Path) -> list[MemoryFigures]:
    """The readings written so far, oldest first."""
    with contextlib.suppress(FileNotFoundError):
        return [MemoryFigures(**json.loads(line)) for line in path.read_text().splitlines()]
    return []


def main() -> int:
    path = Path(os.environ[PROBE_FILE_VARIABLE])

    def write(signum: int, frame: FrameType | None) -> None:
        with path.open("a") as out:
            out.write(json.dumps(asdict(_figures())) + "\n")

    signal.signal(signal.SIGUSR1, write)
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
