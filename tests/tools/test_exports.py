"""`quantrouter.tools.__all__` names exactly its public API, and each name is what it says."""

from __future__ import annotations

import inspect

import quantrouter.tools as tools


def test_all_matches_the_public_names() -> None:
    public = {name for name, value in vars(tools).items()
              if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"}
    assert set(tools.__all__) == public


def test_no_function_shadows_a_module_of_the_package() -> None:
    """`quantrouter.tools.compare` is the module; the function is `compare_variants`."""
    for name in ("calibrate", "compare", "errors", "ladder", "live", "measure", "recommend"):
        assert inspect.ismodule(getattr(tools, name)), name
