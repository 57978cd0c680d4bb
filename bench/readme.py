"""The README's figures come from the benchmarks: each writes its reading between its own markers
(`<!-- NAME:start -->` … `<!-- NAME:end -->`), so no figure in the README is copied by hand."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def replace_block(name: str, text: str) -> None:
    """Put `text` between the README's `name` markers, replacing what a previous run wrote there."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    head, found_start, rest = README.read_text().partition(start)
    _, found_end, tail = rest.partition(end)
    if not found_start or not found_end:
        raise SystemExit(f"README.md has no {start} … {end} block to update")
    README.write_text(f"{head}{start}\n  {text}\n  {end}{tail}")
