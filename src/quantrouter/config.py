"""Settings, from one place: command-line flags, then `QUANTROUTER_*` environment, then a TOML file.

`Settings` is a set of small frozen groups (server, security, backend, catalog, memory, policy, limits,
request defaults, embedded); each part of the router takes only its group as an argument, and nothing
else reads the environment. Keys stay flat (`--num-ctx`, `QUANTROUTER_NUM_CTX`, `num_ctx = …` in TOML).
`load_settings` takes the environment as a mapping so tests pass a dict.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin, get_type_hints

from quantrouter.quant import KV_CACHE_TYPES, UnknownQuantizationError, parse_quantization
from quantrouter.units import GiB, MiB

__all__ = [
    "SETTING_KEYS",
    "BackendSettings",
    "CatalogSettings",
    "ConfigError",
    "EmbeddedSettings",
    "FleetSettings",
    "LimitSettings",
    "MemorySettings",
    "PolicySettings",
    "RequestDefaults",
    "SecuritySettings",
    "ServerSettings",
    "Settings",
    "default_cache_dir",
    "load_settings",
    "parse_bytes",
    "parse_duration",
    "with_keys",
]


# Ollama's own default address (ollama-python `_parse_host`).
DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"
# OpenTelemetry's Prometheus exporter port; it keeps clear of a Prometheus server's 9090.
DEFAULT_METRICS_PORT = 9464
DEFAULT_GRPC_PORT = 50051
# Ollama's per-GPU minimum reserve on CUDA (`ml/device.go` MinimumMemory, docs/quantization.md §3).
OLLAMA_GPU_MINIMUM_MEMORY = 457 * MiB


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the key and says what is expected."""


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


# A field's type says how its flag, `QUANTROUTER_*` value or TOML value is read: a size ("512MiB") or a
# duration ("250ms") by the parser it carries, a path, a NAME=VALUE mapping, or its plain type.
ByteSize = Annotated[int, parse_bytes]
Seconds = Annotated[float, parse_duration]


# Each part of the router takes only its group. A setting's key (the flag, the `QUANTROUTER_<KEY>`
# variable and the TOML key) is its field name, or the name in `_KEYS` where the group's context makes
# a shorter field name clear (`backend.host` is `ollama_host`).


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Where the router listens, how long a shutdown lets streams finish, and how it logs."""

    grpc_address: str = f"0.0.0.0:{DEFAULT_GRPC_PORT}"
    metrics_address: str = f"0.0.0.0:{DEFAULT_METRICS_PORT}"
    grace_period: Seconds = 30.0
    log_level: str = "info"
    # Router processes sharing the gRPC port (SO_REUSEPORT): one event loop relays on one core. Worker i
    # serves its metrics on the metrics port + i; limits and measured speeds are per process.
    workers: int = 1
    # "uvloop" (libuv, where installed) or "asyncio" (the standard loop).
    event_loop: str = "uvloop"


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    """The bearer tokens calls must carry (none: no authentication) and TLS for the gRPC port."""

    auth_token: str = ""
    auth_token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """Where Ollama is and how long to wait for it: everything the backend client is built from."""

    host: str = DEFAULT_OLLAMA_HOST
    connect_timeout: Seconds = 5.0
    read_timeout: Seconds = 300.0
    keep_alive: str = "5m"

    def at(self, host: str | None) -> BackendSettings:
        """The same client settings for another address (a tool's --backend), or these without one."""
        return dataclasses.replace(self, host=host) if host else self


@dataclass(frozen=True, slots=True)
class CatalogSettings:
    """How often the catalog follows the backend, and the names that put custom models into a family.

    `/api/tags` and `/api/show` change slowly; `/api/ps` follows loads and unloads. Aliases map
    alias → family, for custom models built FROM a base with a Modelfile.
    """

    tags_refresh_interval: Seconds = 30.0
    ps_refresh_interval: Seconds = 1.5
    aliases: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MemorySettings:
    """NVML when available, else `capacity` (0 = the embedded budget, or unknown); Ollama's per-GPU reserve."""

    capacity: ByteSize = 0
    reserve: ByteSize = OLLAMA_GPU_MINIMUM_MEMORY
    nvml_poll_interval: Seconds = 0.25


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """The routing policy's knobs and where its speed table starts from (priors, a calibration file)."""

    ewma_alpha: float = 0.3
    # Ollama loads beside other models only within 80 % of free memory (docs/ollama.md).
    load_fraction: float = 0.8
    # What the backend was started with, mirrored: the requests one runner serves at once (a further one
    # queues), and the KV cache element size, so that the memory estimate is what a runner will hold.
    ollama_num_parallel: int = 1
    ollama_kv_cache_type: str = ""
    # Ollama's own default, 0, holds 3 models per GPU at once (docs/ollama.md); a set value is a global cap.
    ollama_max_loaded_models: int = 0
    balanced_quality_weight: float = 0.5
    upgrade_hysteresis: float = 0.15
    # While the GPU is busy, qualities this close to the best count as equal for QUALITY callers (the faster wins).
    busy_quality_tolerance: float = 0.025
    # A QUALITY or LATENCY pick with a deadline that would leave no room for any sibling (at or above the speed
    # floor) is ranked as BALANCED; a GPU that serves QUALITY callers alone may turn this off (policy.PolicyConfig
    # says why).
    sole_runner_as_balanced: bool = True
    # A slower runner not busy now is held back while this many callers it would push past their deadline or rate
    # floor are expected to arrive during its service; 0, the default, turns it off (policy.PolicyConfig says why).
    tight_arrivals: float = 0.0
    # Under overload the smallest variant at or above the speed floor serves the queue, a cold one where its load is
    # repaid this many times over; 0, the default, turns it off (policy.PolicyConfig says why).
    smallest_under_overload: float = 0.0
    gpu_bandwidth: float = 0.0
    calibration_file: Path | None = None


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """How much the router takes on at once, how large a request may be, and when a variant is benched."""

    max_in_flight: int = 256
    max_in_flight_per_family: int = 64
    max_prompt_bytes: ByteSize = 1 * MiB
    max_message_bytes: ByteSize = 8 * MiB
    breaker_failures: int = 3
    breaker_cooldown: Seconds = 30.0


@dataclass(frozen=True, slots=True)
class RequestDefaults:
    """What a request that sets nothing gets.

    One num_ctx per variant so Ollama never reloads a model over a context change. The quality floor
    applies to requests that set none (callers may still set a lower one): the policy simulator found
    Q4_K_M worth it on GPU ladders, since below ~4 bpw decode is no faster (bench/results/simulation.md).
    """

    num_ctx: int = 4096
    num_predict: int = 256
    min_quantization: str = ""


@dataclass(frozen=True, slots=True)
class EmbeddedSettings:
    """The in-process llama.cpp backend: whether to start it, its memory budget, where its ladder is cached."""

    enabled: bool = False
    memory_budget: ByteSize = 2 * GiB
    cache_dir: Path = field(default_factory=lambda: default_cache_dir({}))


@dataclass(frozen=True, slots=True)
class FleetSettings:
    """A fleet router routes across node routers instead of one backend: named addresses (name →
    host:port), or the endpoints of a headless Service (k8s://NAMESPACE/SERVICE[:PORT])."""

    nodes: Mapping[str, str] = field(default_factory=dict)
    discover: str = ""
    report_interval: Seconds = 1.0
    stale_after: Seconds = 5.0
    # The bearer token the fleet presents to node routers that require one (their auth_token).
    auth_token: str = ""
    # TLS to node routers that serve it (their tls_cert): the CA bundle that signed their certificates; the
    # name those certificates carry, when nodes are dialled by pod IP and the certificates name a Service;
    # and this router's own certificate and key, for nodes that require one (their tls_client_ca).
    node_tls_ca: Path | None = None
    node_tls_server_name: str = ""
    node_tls_cert: Path | None = None
    node_tls_key: Path | None = None
    # Endpoint Picker (`quantrouter epp`): each node's model server (name → host:port) for Envoy to send
    # requests to; a node not listed is reached on its node router's host at `endpoint_port` (Ollama's).
    endpoints: Mapping[str, str] = field(default_factory=dict)
    endpoint_port: int = 11434
    # Nodes after the picked one that the proxy may try, in order, for the same variant. Envoy's ORIGINAL_DST
    # cluster takes one address only, so the default sends one; its override_host policy takes a list.
    fallbacks: int = 0


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the router and the embedded backend, in groups, with defaults that work on a laptop."""

    server: ServerSettings = field(default_factory=ServerSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    backend: BackendSettings = field(default_factory=BackendSettings)
    catalog: CatalogSettings = field(default_factory=CatalogSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    requests: RequestDefaults = field(default_factory=RequestDefaults)
    embedded: EmbeddedSettings = field(default_factory=EmbeddedSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)


# Per group, the fields whose key is not their own name: field → key.
_KEYS = {
    "backend": {"host": "ollama_host", "connect_timeout": "backend_connect_timeout",
                "read_timeout": "backend_read_timeout"},
    "memory": {"capacity": "memory_capacity", "reserve": "memory_reserve"},
    "requests": {"num_predict": "num_predict_default", "min_quantization": "default_min_quantization"},
    "embedded": {"enabled": "embedded", "memory_budget": "embedded_memory_budget"},
    "fleet": {"report_interval": "node_report_interval", "stale_after": "node_stale_after",
              "auth_token": "node_auth_token"},
}


def _setting_keys() -> dict[str, tuple[str, str]]:
    """key → (group, field), over every group of `Settings`."""
    keys: dict[str, tuple[str, str]] = {}
    for group in dataclasses.fields(Settings):
        group_class = group.default_factory
        assert isinstance(group_class, type)  # each group's default is its class
        for item in dataclasses.fields(group_class):
            key = _KEYS.get(group.name, {}).get(item.name, item.name)
            assert key not in keys, f"two settings share the key {key}"
            keys[key] = (group.name, item.name)
    return keys


# Every setting's key, in the order of the groups: what flags, `QUANTROUTER_*` variables and TOML use.
SETTING_KEYS: dict[str, tuple[str, str]] = _setting_keys()


# Settings that fall back to Ollama's own variable, so a router started with Ollama's environment agrees with it.
_OLLAMA_MIRRORS = {"ollama_host": "OLLAMA_HOST", "ollama_num_parallel": "OLLAMA_NUM_PARALLEL",
                   "ollama_kv_cache_type": "OLLAMA_KV_CACHE_TYPE",
                   "ollama_max_loaded_models": "OLLAMA_MAX_LOADED_MODELS"}


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """The XDG cache directory for built model ladders, overridable with QUANTROUTER_CACHE_DIR."""
    if environ.get("QUANTROUTER_CACHE_DIR"):
        return Path(environ["QUANTROUTER_CACHE_DIR"])
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", str(Path.home()))) / ".cache")
    return Path(base) / "quantrouter"


def _field_types() -> dict[str, Any]:
    """key → the type its field declares (with an `Annotated` parser where it has one)."""
    hints = {group.name: get_type_hints(group.default_factory, include_extras=True)
             for group in dataclasses.fields(Settings)}
    return {key: hints[group][name] for key, (group, name) in SETTING_KEYS.items()}


_FIELD_TYPES = _field_types()


def _convert(name: str, value: Any, default: Any) -> Any:
    """Cast a raw flag, environment or TOML value to the type its field declares."""
    declared = _FIELD_TYPES[name]
    try:
        parse = next(iter(getattr(declared, "__metadata__", ())), None)
        if parse is not None:
            return parse(value)
        if get_origin(declared) is Mapping:
            if isinstance(value, str):
                value = [item for item in value.split(",") if item.strip()]
            if isinstance(value, list | tuple):
                pairs = [item.split("=", 1) for item in value]
                if any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
                    raise ValueError(f"expected NAME=VALUE items, got {value!r}")
                return {key.strip(): target.strip() for key, target in pairs}
            return dict(value)
        if declared is Path or Path in get_args(declared):
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
    """Flags win over `QUANTROUTER_<KEY>` variables, which win over the TOML file, then defaults.

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
    unknown = sorted(set(file_values) - set(SETTING_KEYS))
    if unknown:
        raise ConfigError(f"config file {toml_path}: unknown settings {', '.join(unknown)}")

    chosen: dict[str, Any] = {}
    for key in SETTING_KEYS:
        env_value = environ.get(f"QUANTROUTER_{key.upper()}")
        if key in _OLLAMA_MIRRORS and env_value is None:
            env_value = environ.get(_OLLAMA_MIRRORS[key])
        raw = next((value for value in (flags.get(key), env_value, file_values.get(key)) if value is not None), None)
        if raw is not None:
            chosen[key] = raw
    return with_keys(Settings(embedded=EmbeddedSettings(cache_dir=default_cache_dir(environ))), chosen)


def with_keys(settings: Settings, changes: Mapping[str, Any]) -> Settings:
    """`settings` with some keys set, each value cast and checked as a flag's would be."""
    unknown = sorted(set(changes) - set(SETTING_KEYS))
    if unknown:
        raise ConfigError(f"unknown settings {', '.join(unknown)}")
    groups: dict[str, dict[str, Any]] = {}
    for key, raw in changes.items():
        group, name = SETTING_KEYS[key]
        groups.setdefault(group, {})[name] = _convert(key, raw, getattr(getattr(settings, group), name))
    result = dataclasses.replace(settings, **{group: dataclasses.replace(getattr(settings, group), **fields)
                                              for group, fields in groups.items()})
    _validate(result)
    return result


def _validate(settings: Settings) -> None:
    security, limits, policy, requests = settings.security, settings.limits, settings.policy, settings.requests
    if (security.tls_cert is None) != (security.tls_key is None):
        raise ConfigError("tls_cert and tls_key go together: set both or neither")
    if security.tls_client_ca is not None and security.tls_cert is None:
        raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
    if limits.max_prompt_bytes >= limits.max_message_bytes:
        raise ConfigError(f"setting max_prompt_bytes ({limits.max_prompt_bytes}) must be below max_message_bytes "
                          f"({limits.max_message_bytes}), or a long prompt is refused without saying why")
    if settings.server.event_loop not in ("uvloop", "asyncio"):
        raise ConfigError(f"setting event_loop must be uvloop or asyncio, got {settings.server.event_loop!r}")
    if policy.ollama_kv_cache_type.lower() not in KV_CACHE_TYPES:
        raise ConfigError(f"setting ollama_kv_cache_type: {policy.ollama_kv_cache_type!r} is not one of Ollama's "
                          "KV cache types; write f16, q8_0 or q4_0 (as in OLLAMA_KV_CACHE_TYPE)")
    for key, value in (("workers", settings.server.workers), ("max_in_flight", limits.max_in_flight),
                       ("max_in_flight_per_family", limits.max_in_flight_per_family),
                       ("num_ctx", requests.num_ctx), ("num_predict_default", requests.num_predict),
                       ("ollama_num_parallel", policy.ollama_num_parallel)):
        if value <= 0:
            raise ConfigError(f"setting {key} must be positive, got {value}")
    if policy.ollama_max_loaded_models < 0:
        raise ConfigError(f"setting ollama_max_loaded_models must be 0 (Ollama's default, 3 per GPU) or a cap, "
                          f"got {policy.ollama_max_loaded_models}")
    if not 0 < policy.ewma_alpha <= 1:
        raise ConfigError(f"setting ewma_alpha must be in (0, 1], got {policy.ewma_alpha}")
    if not 0 <= policy.balanced_quality_weight <= 1:
        raise ConfigError("setting balanced_quality_weight must be in [0, 1]")
    if not 0 <= policy.busy_quality_tolerance <= 1:
        raise ConfigError(f"setting busy_quality_tolerance must be in [0, 1], got {policy.busy_quality_tolerance}")
    if not (math.isfinite(policy.tight_arrivals) and policy.tight_arrivals >= 0):
        raise ConfigError(f"setting tight_arrivals must be a number ≥ 0 (0 turns the arrivals charge off), "
                          f"got {policy.tight_arrivals}")
    if not (math.isfinite(policy.smallest_under_overload) and policy.smallest_under_overload >= 0):
        raise ConfigError(f"setting smallest_under_overload must be a number ≥ 0 (0 turns the rule off), "
                          f"got {policy.smallest_under_overload}")
    if not 0 < policy.load_fraction <= 1:
        raise ConfigError(f"setting load_fraction must be in (0, 1], got {policy.load_fraction}")
    fleet = settings.fleet
    if fleet.nodes and fleet.discover:
        raise ConfigError("nodes and discover are two ways to find the fleet's nodes: set one of them")
    if fleet.discover and not fleet.discover.startswith("k8s://"):
        raise ConfigError(f"setting discover: {fleet.discover!r}: write k8s://NAMESPACE/SERVICE[:PORT]")
    if (fleet.nodes or fleet.discover) and settings.embedded.enabled:
        raise ConfigError("a fleet router (nodes, discover) has no backend of its own: drop --embedded")
    if not 0 < fleet.report_interval < fleet.stale_after:
        raise ConfigError(f"setting node_stale_after ({fleet.stale_after} s) must exceed "
                          f"node_report_interval ({fleet.report_interval} s), which must be positive")
    if (fleet.node_tls_cert is None) != (fleet.node_tls_key is None):
        raise ConfigError("node_tls_cert and node_tls_key go together: set both or neither")
    if fleet.node_tls_ca is None and (fleet.node_tls_cert is not None or fleet.node_tls_server_name):
        raise ConfigError("node_tls_cert and node_tls_server_name are for TLS to the nodes: set node_tls_ca too "
                          "(the CA that signed the node routers' certificates)")
    if fleet.fallbacks < 0 or not 0 < fleet.endpoint_port < 65536:
        raise ConfigError(f"setting fallbacks ({fleet.fallbacks}) must be ≥ 0 and endpoint_port "
                          f"({fleet.endpoint_port}) a TCP port")
    if requests.min_quantization:
        try:
            parse_quantization(requests.min_quantization)
        except UnknownQuantizationError as error:
            raise ConfigError(f"setting default_min_quantization: {error}") from None
