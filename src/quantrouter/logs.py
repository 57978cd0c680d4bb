"""Logging for the command line and every router process: one format, and httpx kept quiet.

Its own module so that client commands configure logging without importing the server.
"""

from __future__ import annotations

import logging

__all__ = ["configure_logging"]


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "debug":  # one line per backend call would bury everything else
        logging.getLogger("httpx").setLevel(logging.WARNING)
