"""Quantization tools for people, from the code the router uses: recommend, compare, calibrate, ladder.

Each is a Python function and a `quantrouter` subcommand (`tools.cli.add_tool_commands`). The math
(`recommend`, agreement) is pure; the rest reads the backend through the router's own inventory,
memory probe and calibration format.
"""

from quantrouter.tools.calibrate import CALIBRATION_PROMPTS, Calibration, calibrate_family, calibration_of
from quantrouter.tools.compare import Comparison, VariantResult, compare_runs, compare_variants, plot_comparison
from quantrouter.tools.errors import ToolError
from quantrouter.tools.ladder import (
    OLLAMA_QUANTIZE_TARGETS,
    LadderResult,
    Rung,
    build_embedded_ladder,
    build_ladder,
    check_source,
    target_tag,
)
from quantrouter.tools.live import BackendView, backend_listing, family_variants, read_backend, read_catalog
from quantrouter.tools.measure import Run, Step, greedy_agreement, run_greedy, top_k_agreement
from quantrouter.tools.recommend import (
    Candidate,
    Estimate,
    Recommendation,
    offline_candidates,
    recommend_variant,
    rule_of_thumb_bytes,
    variant_candidates,
)

__all__ = [
    "CALIBRATION_PROMPTS",
    "OLLAMA_QUANTIZE_TARGETS",
    "BackendView",
    "Calibration",
    "Candidate",
    "Comparison",
    "Estimate",
    "LadderResult",
    "Recommendation",
    "Run",
    "Rung",
    "Step",
    "ToolError",
    "VariantResult",
    "backend_listing",
    "build_embedded_ladder",
    "build_ladder",
    "calibrate_family",
    "calibration_of",
    "check_source",
    "compare_runs",
    "compare_variants",
    "family_variants",
    "greedy_agreement",
    "offline_candidates",
    "plot_comparison",
    "read_backend",
    "read_catalog",
    "recommend_variant",
    "rule_of_thumb_bytes",
    "run_greedy",
    "target_tag",
    "top_k_agreement",
    "variant_candidates",
]
