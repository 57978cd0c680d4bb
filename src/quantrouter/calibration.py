"""Calibration files: measured speeds per variant, written by `quantrouter calibrate`, read at start.

With one, the first real requests are routed on measurements rather than priors. JSON, versioned:
`{"version": 1, "created_at": ..., "variants": {tag: {decode_tps, prompt_tps, load_seconds, samples,
agreement}}}`; `agreement` is the greedy-token agreement with the highest-precision variant.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from quantrouter.config import PolicySettings
from quantrouter.throughput import ThroughputTable, bandwidth_for

__all__ = ["CalibrationError", "VariantCalibration", "load_calibration", "read_calibration", "starting_speeds",
           "write_calibration"]

FORMAT_VERSION = 1


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class VariantCalibration:
    decode_tps: float
    prompt_tps: float
    load_seconds: float
    samples: int
    agreement: float | None = None


def write_calibration(path: Path, variants: Mapping[str, VariantCalibration], created_at: str) -> None:
    body = {"version": FORMAT_VERSION, "created_at": created_at,
            "variants": {tag: asdict(c) for tag, c in sorted(variants.items())}}
    path.write_text(json.dumps(body, indent=2) + "\n")


def read_calibration(path: Path) -> dict[str, VariantCalibration]:
    try:
        body = json.loads(path.read_text())
        if body.get("version") != FORMAT_VERSION:
            raise CalibrationError(f"{path}: version {body.get('version')!r}, expected {FORMAT_VERSION}")
        return {tag: VariantCalibration(**fields) for tag, fields in body["variants"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        if isinstance(error, CalibrationError):
            raise
        raise CalibrationError(f"{path}: not a quantrouter calibration file ({error}); "
                               "make one with `quantrouter calibrate FAMILY`") from None


def load_calibration(path: Path, table: ThroughputTable) -> int:
    """Seed `table` from the file; returns how many variants it held."""
    variants = read_calibration(path)
    for tag, c in variants.items():
        table.seed(tag, c.decode_tps, c.prompt_tps, c.load_seconds, c.samples)
    return len(variants)


def starting_speeds(policy: PolicySettings, gpu_names: Iterable[str]) -> ThroughputTable:
    """The speed table a router starts from: priors for these GPUs, then the calibration file's figures."""
    table = ThroughputTable(policy.ewma_alpha, bandwidth_for(gpu_names, policy.gpu_bandwidth))
    if policy.calibration_file is not None:
        load_calibration(policy.calibration_file, table)
    return table
