"""`quantrouter.tools.__all__` names exactly its public API, and each name is what it says."""

from __future__ import annotations

import inspect

import quantrouter.tools as tools


def test_all_matches_the_public_names() -> None:
    public = {name for name, value in vars(tools).items()
              if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"}
    assert set(tools.__all__) == public
