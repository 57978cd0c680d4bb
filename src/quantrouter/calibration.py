"""Calibration files: measured speeds and quality per variant, written by `quantrouter calibrate`, read at start.

With one, the first real requests are routed on measurements rather than priors. JSON, versioned:
`{"version": 2, "created_at": ..., "reference": tag, "quality_text": {provenance} | null,
"variants": {tag: {decode_tps, prompt_tps, load_seconds, samples, agreement, quality}}}`; `agreement`
is the greedy-token agreement with the highest-precision variant, `quality` (or null) what
`calibrate --quality` measured against it (quantrouter.tools.quality). Version 1 files (no quality)
still load. The file is written to a temporary sibling and renamed, so an interrupted run leaves the
previous file whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quantrouter.catalog import VariantInfo
from quantrouter.config import PolicySettings
from quantrouter.throughput import ThroughputTable, bandwidth_for

__all__ = [
    "CalibrationError",
    "CalibrationFile",
    "MeasuredQuality",
    "VariantCalibration",
    "load_calibration",
    "measured_qualities",
    "quality_of",
    "read_calibration",
    "read_calibration_file",
    "starting_speeds",
    "write_calibration",
]

FORMAT_VERSION = 2
_READABLE_VERSIONS = {1, FORMAT_VERSION}


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class MeasuredQuality:
    """A variant against the family's highest-precision variant, with standard errors over `positions`.

    `top1` (llama.cpp's "same top p") is the router's quality figure: the same measure as the priors in
    quantrouter.quant, so measured and prior values share one scale.
    """

    method: str
    positions: int
    top1: float
    top1_stderr: float
    kl_mean: float
    kl_stderr: float
    ppl_ratio: float
    ppl_ratio_stderr: float


@dataclass(frozen=True, slots=True)
class VariantCalibration:
    decode_tps: float
    prompt_tps: float
    load_seconds: float
    samples: int
    agreement: float | None = None
    quality: MeasuredQuality | None = None


@dataclass(frozen=True, slots=True)
class CalibrationFile:
    """A whole file: when, against which reference, on which text, and each variant's figures."""

    created_at: str
    variants: dict[str, VariantCalibration]
    reference: str = ""
    quality_text: Mapping[str, Any] | None = None


def write_calibration(path: Path, calibration: CalibrationFile) -> None:
    """Write atomically: a temporary file in the same directory, then a rename over `path`."""
    body = {"version": FORMAT_VERSION, "created_at": calibration.created_at, "reference": calibration.reference,
            "quality_text": calibration.quality_text,
            "variants": {tag: asdict(c) for tag, c in sorted(calibration.variants.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(json.dumps(body, indent=2) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _variant(fields: dict[str, Any]) -> VariantCalibration:
    quality = fields.pop("quality", None)
    return VariantCalibration(**fields, quality=MeasuredQuality(**quality) if quality is not None else None)


def read_calibration_file(path: Path) -> CalibrationFile:
    try:
        body = json.loads(path.read_text())
        if body.get("version") not in _READABLE_VERSIONS:
            raise CalibrationError(f"{path}: version {body.get('version')!r}, expected {FORMAT_VERSION}")
        return CalibrationFile(body["created_at"], {tag: _variant(dict(f)) for tag, f in body["variants"].items()},
                               body.get("reference", ""), body.get("quality_text"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        if isinstance(error, CalibrationError):
            raise
        raise CalibrationError(f"{path}: not a quantrouter calibration file ({error}); "
                               "make one with `quantrouter calibrate FAMILY`") from None


def read_calibration(path: Path) -> dict[str, VariantCalibration]:
    return read_calibration_file(path).variants


def load_calibration(path: Path, table: ThroughputTable) -> int:
    """Seed `table` from the file; returns how many variants it held."""
    variants = read_calibration(path)
    for tag, c in variants.items():
        table.seed(tag, c.decode_tps, c.prompt_tps, c.load_seconds, c.samples)
    return len(variants)


def measured_qualities(path: Path | None) -> dict[str, MeasuredQuality]:
    """Tag → measured quality for the variants the file has one for (none without a file)."""
    if path is None:
        return {}
    return {tag: c.quality for tag, c in read_calibration(path).items() if c.quality is not None}


def quality_of(variant: VariantInfo, measured: Mapping[str, MeasuredQuality]) -> tuple[float, bool]:
    """The quality the router ranks `variant` by, and whether it was measured (else the quant's prior)."""
    figure = measured.get(variant.tag)
    return (figure.top1, True) if figure is not None else (variant.quant.quality, False)


def starting_speeds(policy: PolicySettings, gpu_names: Iterable[str]) -> ThroughputTable:
    """The speed table a router starts from: priors for these GPUs, then the calibration file's figures."""
    table = ThroughputTable(policy.ewma_alpha, bandwidth_for(gpu_names, policy.gpu_bandwidth))
    if policy.calibration_file is not None:
        load_calibration(policy.calibration_file, table)
    return table
