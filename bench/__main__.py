"""`python -m bench [NAME ...]`: run every benchmark module in bench/ that defines `main() -> None`.

Convention: each `bench/<name>.py` that is a benchmark exposes `main()`, takes no arguments from us, and writes
its own results under bench/results/. The decision benchmark and the simulator run first (they need nothing but
this repository); the others follow in name order. A failing benchmark is reported and the rest still run.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback
from pathlib import Path

FIRST = ("decision", "simulate")


def discover() -> list[str]:
    """Module names under bench/ (not packages) that define a callable `main`, FIRST ones first."""
    names = [m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
             if not m.ispkg and not m.name.startswith("_")]
    runnable = [n for n in names if callable(getattr(importlib.import_module(f"bench.{n}"), "main", None))]
    return [n for n in FIRST if n in runnable] + sorted(n for n in runnable if n not in FIRST)


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(f"usage: python -m bench [NAME ...]\n\nRuns every benchmark, or the NAMEs: {' '.join(discover())}.\n"
              "Each writes its results under bench/results/; `python -m bench.NAME --help` explains one.")
        return 0
    selected = argv or discover()
    failed = []
    for name in selected:
        module = importlib.import_module(f"bench.{name}")
        print(f"== bench.{name}", flush=True)
        started = time.perf_counter()
        saved, sys.argv = sys.argv, [f"bench.{name}"]
        try:
            module.main()
        except Exception:
            traceback.print_exc()
            failed.append(name)
        finally:
            sys.argv = saved
        print(f"== bench.{name}: {time.perf_counter() - started:.0f} s{' (failed)' if name in failed else ''}",
              flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
