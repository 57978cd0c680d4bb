"""The one error the tools raise for a person to read; a leaf module, so every tool can import it.

The CLI prints the message and exits 1. Backend failures keep their own tree (quantrouter.errors).
"""

from __future__ import annotations

__all__ = ["ToolError"]


class ToolError(RuntimeError):
    """Something the person can fix: an unknown family, a source that cannot be quantized, no memory figure."""
