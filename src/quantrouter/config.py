"""Settings, from one place: command-line flags, then `QUANTROUTER_*` environment, then a TOML file.

Everything downstream takes a frozen `Settings` (or the values it needs) as arguments; nothing else
reads the environment. `load_settings` takes the environment as a mapping so tests pass a dict.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantrouter.quant import KV_CACHE_TYPES, UnknownQuantizationError, parse_quantization
from quantrouter.units import GiB, MiB

__all__ = [
    "ConfigError",
    "Settings",
    "default_cache_dir",
    "load_settings",
    "parse_bytes",
    "parse_duration",
]


# Ollama's own default address (ollama-python `_parse_host`).
DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"
# OpenTelemetry's Prometheus exporter port; it keeps clear of a Prometheus server's 9090.
DEFAULT_METRICS_PORT = 9464
DEFAULT_GRPC_PORT = 50051
# Ollama's per-GPU minimum reserve on CUDA (`ml/device.go` MinimumMemory, reference/quant.md §3).
OLLAMA_GPU_MINIMUM_MEMORY = 457 * MiB


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the key and says what is expected."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the router and the embedded backend, with defaults that work on a laptop."""

    # Where the router listens and where Ollama is.
    grpc_address: str = f"0.0.0.0:{DEFAULT_GRPC_PORT}"
    metrics_address: str = f"0.0.0.0:{DEFAULT_METRICS_PORT}"
    # Router processes sharing the gRPC port (SO_REUSEPORT): one event loop relays on one core. Worker i
    # serves its metrics on the metrics port + i; limits and measured speeds are per process.
    workers: int = 1
    # "uvloop" (libuv, where installed) or "asyncio" (the standard loop).
    event_loop: str = "uvloop"
    ollama_host: str = DEFAULT_OLLAMA_HOST
    # Start the embedded llama.cpp backend in-process and route to it instead of Ollama.
    embedded: bool = False
    embedded_memory_budget: int = 2 * GiB
    cache_dir: Path = field(default_factory=lambda: default_cache_dir({}))
    # Memory: NVML when available, else this static capacity (0 = the embedded budget, or unknown).
    memory_capacity: int = 0
    memory_reserve: int = OLLAMA_GPU_MINIMUM_MEMORY
    nvml_poll_interval: float = 0.25
    # Catalog refresh: /api/tags and /api/show are slow-changing, /api/ps follows loads and unloads.
    tags_refresh_interval: float = 30.0
    ps_refresh_interval: float = 1.5
    # Requests: one num_ctx per variant so Ollama never reloads a model over a context change.
    num_ctx: int = 4096
    num_predict_default: int = 256
    keep_alive: str = "5m"
    backend_connect_timeout: float = 5.0
    backend_read_timeout: float = 300.0
    # Routing.
    ewma_alpha: float = 0.3
    # A quality floor for requests that set none (callers may still set a lower one). The policy
    # simulator found Q4_K_M worth it on GPU ladders: below ~4 bpw decode is no faster
    # (bench/results/simulation.md), so cheaper variants only cost quality.
    default_min_quantization: str = ""
    # Ollama loads beside other models only within 80 % of free memory (reference/ollama.md §3).
    load_fraction: float = 0.8
    # What the backend was started with, mirrored: the requests one runner serves at once (a further one
    # queues), and the KV cache element size, so that the memory estimate is what a runner will hold.
    ollama_num_parallel: int = 1
    ollama_kv_cache_type: str = ""
    balanced_quality_weight: float = 0.5
    upgrade_hysteresis: float = 0.15
    gpu_bandwidth: float = 0.0
    # Limits.
    max_in_flight: int = 256
    max_in_flight_per_family: int = 64
    max_prompt_bytes: int = 1 * MiB
    max_message_bytes: int = 8 * MiB
    grace_period: float = 30.0
    breaker_failures: int = 3
    breaker_cooldown: float = 30.0
    # Security.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None
    auth_token: str = ""
    # Model families: alias → family, for custom models built FROM a base with a Modelfile.
    aliases: Mapping[str, str] = field(default_factory=dict)
    calibration_file: Path | None = None
    log_level: str = "info"
    # Fleet: route across these node routers (name → host:port) instead of one backend, or across the
    # endpoints of a headless Service (k8s://NAMESPACE/SERVICE[:PORT]).
    nodes: Mapping[str, str] = field(default_factory=dict)
    discover: str = ""
    node_report_interval: float = 1.0
    node_stale_after: float = 5.0
    # The bearer token the fleet presents to node routers that require one (their auth_token).
    node_auth_token: str = ""
    # Endpoint Picker (`quantrouter epp`): each node's model server (name → host:port) for Envoy to send
    # requests to; a node not listed is reached on its node router's host at `endpoint_port` (Ollama's).
    endpoints: Mapping[str, str] = field(default_factory=dict)
    endpoint_port: int = 11434
    # Nodes after the picked one that the proxy may try, in order, for the same variant. Envoy's ORIGINAL_DST
    # cluster takes one address only, so the default sends one; its override_host policy takes a list.
    fallbacks: int = 0


# Settings that fall back to Ollama's own variable, so a router started with Ollama's environment agrees with it.
_OLLAMA_MIRRORS = {"ollama_host": "OLLAMA_HOST", "ollama_num_parallel": "OLLAMA_NUM_PARALLEL",
                   "ollama_kv_cache_type": "OLLAMA_KV_CACHE_TYPE"}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_BYTE_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
               "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30, "TI": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """'1GiB', '512MiB', '8GB', '1073741824' → bytes (binary units for Ki/Mi/Gi, decimal for K/M/G)."""
    if isinstance(text, int):
        return text
    match = _BYTES.match(text)
    if not match:
        raise ConfigError(f"{text!r} is not a size; write e.g. 512MiB, 8GiB or a number of bytes")
    unit = (match.group(2) or "").upper().removesuffix("B")
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


def parse_duration(text: str | float) -> float:
    """'250ms', '30s', '5m', '1.5' → seconds."""
    if isinstance(text, int | float):
        return float(text)
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"{text!r} is not a duration; write e.g. 250ms, 30s or 5m")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """The XDG cache directory for built model ladders, overridable with QUANTROUTER_CACHE_DIR."""
    if environ.get("QUANTROUTER_CACHE_DIR"):
        return Path(environ["QUANTROUTER_CACHE_DIR"])
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", str(Path.home()))) / ".cache")
    return Path(base) / "quantrouter"


_BYTE_FIELDS = {"embedded_memory_budget", "memory_capacity", "memory_reserve", "max_prompt_bytes",
                "max_message_bytes"}
_DURATION_FIELDS = {"nvml_poll_interval", "tags_refresh_interval", "ps_refresh_interval",
                    "backend_connect_timeout", "backend_read_timeout", "grace_period", "breaker_cooldown",
                    "node_report_interval", "node_stale_after"}


def _convert(name: str, value: Any, default: Any) -> Any:
    """Cast a raw flag, environment or TOML value to the type of the field's default."""
    try:
        if name in _BYTE_FIELDS:
            return parse_bytes(value)
        if name in _DURATION_FIELDS:
            return parse_duration(value)
        if name in ("aliases", "nodes", "endpoints"):
            if isinstance(value, str):
                value = [item for item in value.split(",") if item.strip()]
            if isinstance(value, list | tuple):
                pairs = [item.split("=", 1) for item in value]
                if any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
                    raise ValueError(f"expected NAME=VALUE items, got {value!r}")
                return {key.strip(): target.strip() for key, target in pairs}
            return dict(value)
        if name in {"tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "calibration_file",
                    "cache_dir"}:
            return Path(value) if value not in (None, "") else None
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError("expected true or false")
            return lowered in {"1", "true", "yes", "on"}
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (ValueError, TypeError, ConfigError) as error:
        raise ConfigError(f"setting {name}: {error}") from None


def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    toml_path: Path | None = None,
) -> Settings:
    """Flags win over `QUANTROUTER_<NAME>` variables, which win over the TOML file, then defaults.

    `OLLAMA_HOST`, `OLLAMA_NUM_PARALLEL` and `OLLAMA_KV_CACHE_TYPE` are honoured below their `QUANTROUTER_OLLAMA_*`
    variables.
    """
    flags = flags or {}
    environ = environ or {}
    file_values: dict[str, Any] = {}
    if toml_path is not None:
        try:
            file_values = tomllib.loads(toml_path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"config file {toml_path}: {error}") from None
    known = {f.name: f for f in dataclasses.fields(Settings)}
    unknown = sorted(set(file_values) - set(known))
    if unknown:
        raise ConfigError(f"config file {toml_path}: unknown settings {', '.join(unknown)}")

    defaults = Settings(cache_dir=default_cache_dir(environ))
    values: dict[str, Any] = {}
    for name in known:
        default = getattr(defaults, name)
        env_value = environ.get(f"QUANTROUTER_{name.upper()}")
        if name in _OLLAMA_MIRRORS and env_value is None:
            env_value = environ.get(_OLLAMA_MIRRORS[name])
        for raw in (flags.get(name), env_value, file_values.get(name)):
            if raw is not None:
                values[name] = _convert(name, raw, default)
                break
    settings = dataclasses.replace(defaults, **values)
    _validate(settings)
    return settings


def _validate(settings: Settings) -> None:
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("tls_cert and tls_key go together: set both or neither")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
    if settings.max_prompt_bytes >= settings.max_message_bytes:
        raise ConfigError(f"setting max_prompt_bytes ({settings.max_prompt_bytes}) must be below max_message_bytes "
                          f"({settings.max_message_bytes}), or a long prompt is refused without saying why")
    if settings.event_loop not in ("uvloop", "asyncio"):
        raise ConfigError(f"setting event_loop must be uvloop or asyncio, got {settings.event_loop!r}")
    if settings.ollama_kv_cache_type.lower() not in KV_CACHE_TYPES:
        raise ConfigError(f"setting ollama_kv_cache_type: {settings.ollama_kv_cache_type!r} is not one of Ollama's "
                          "KV cache types; write f16, q8_0 or q4_0 (as in OLLAMA_KV_CACHE_TYPE)")
    for name in ("workers", "max_in_flight", "max_in_flight_per_family", "num_ctx", "num_predict_default",
                 "ollama_num_parallel"):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"setting {name} must be positive, got {getattr(settings, name)}")
    if not 0 < settings.ewma_alpha <= 1:
        raise ConfigError(f"setting ewma_alpha must be in (0, 1], got {settings.ewma_alpha}")
    if not 0 <= settings.balanced_quality_weight <= 1:
        raise ConfigError("setting balanced_quality_weight must be in [0, 1]")
    if not 0 < settings.load_fraction <= 1:
        raise ConfigError(f"setting load_fraction must be in (0, 1], got {settings.load_fraction}")
    if settings.nodes and settings.discover:
        raise ConfigError("nodes and discover are two ways to find the fleet's nodes: set one of them")
    if settings.discover and not settings.discover.startswith("k8s://"):
        raise ConfigError(f"setting discover: {settings.discover!r}: write k8s://NAMESPACE/SERVICE[:PORT]")
    if (settings.nodes or settings.discover) and settings.embedded:
        raise ConfigError("a fleet router (nodes, discover) has no backend of its own: drop --embedded")
    if not 0 < settings.node_report_interval < settings.node_stale_after:
        raise ConfigError(f"setting node_stale_after ({settings.node_stale_after} s) must exceed "
                          f"node_report_interval ({settings.node_report_interval} s), which must be positive")
    if settings.fallbacks < 0 or not 0 < settings.endpoint_port < 65536:
        raise ConfigError(f"setting fallbacks ({settings.fallbacks}) must be ≥ 0 and endpoint_port "
                          f"({settings.endpoint_port}) a TCP port")
    if settings.default_min_quantization:
        try:
            parse_quantization(settings.default_min_quantization)
        except UnknownQuantizationError as error:
            raise ConfigError(f"setting default_min_quantization: {error}") from None
