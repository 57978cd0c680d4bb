"""Settings: precedence (flags > QUANTROUTER_* > TOML > defaults), parsing, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantrouter.config import (
    BackendSettings,
    ConfigError,
    Settings,
    default_cache_dir,
    load_settings,
    parse_bytes,
    parse_duration,
    with_keys,
)
from quantrouter.server import policy_config
from quantrouter.units import GiB, MiB


@pytest.mark.parametrize(("text", "expected"), [
    ("1GiB", GiB), ("512MiB", 512 * MiB), ("8GB", 8 * 10**9), ("1073741824", GiB), ("1.5GiB", GiB * 3 // 2),
])
def test_sizes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1.5", 1.5)])
def test_durations(text: str, expected: float) -> None:
    assert parse_duration(text) == expected


def test_flags_win_over_environment_which_wins_over_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "quantrouter.toml"
    toml.write_text('num_ctx = 2048\nmax_in_flight = 10\nmemory_capacity = "24GiB"\n'
                    'aliases = {"bot" = "gemma3:270m"}\n')
    settings = load_settings({"num_ctx": 8192}, {"QUANTROUTER_NUM_CTX": "1024", "QUANTROUTER_MAX_IN_FLIGHT": "20"},
                             toml)
    assert settings.requests.num_ctx == 8192
    assert settings.limits.max_in_flight == 20
    assert settings.memory.capacity == 24 * GiB
    assert settings.catalog.aliases == {"bot": "gemma3:270m"}


def test_ollama_host_follows_ollamas_own_variable_below_ours() -> None:
    assert load_settings({}, {"OLLAMA_HOST": "http://gpu:11434"}).backend.host == "http://gpu:11434"
    both = {"OLLAMA_HOST": "http://gpu:11434", "QUANTROUTER_OLLAMA_HOST": "http://other:11434"}
    assert load_settings({}, both).backend.host == "http://other:11434"


def test_ollamas_parallel_and_kv_cache_type_are_mirrored_below_ours() -> None:
    settings = load_settings({}, {"OLLAMA_NUM_PARALLEL": "4", "OLLAMA_KV_CACHE_TYPE": "q8_0"})
    assert (settings.policy.ollama_num_parallel, settings.policy.ollama_kv_cache_type) == (4, "q8_0")
    ours = load_settings({}, {"OLLAMA_NUM_PARALLEL": "4", "QUANTROUTER_OLLAMA_NUM_PARALLEL": "2"})
    assert (ours.policy.ollama_num_parallel, ours.policy.ollama_kv_cache_type) == (2, "")


def test_ollamas_model_cap_reaches_the_policy_and_unset_means_three_per_gpu() -> None:
    assert policy_config(load_settings({}, {}).policy).max_loaded == 3
    capped = load_settings({}, {"OLLAMA_MAX_LOADED_MODELS": "1"})
    assert policy_config(capped.policy).max_loaded == 1
    with pytest.raises(ConfigError, match="ollama_max_loaded_models must be 0"):
        load_settings({}, {"OLLAMA_MAX_LOADED_MODELS": "-2"})


def test_the_quality_knobs_reach_the_policy() -> None:
    default = policy_config(load_settings({}, {}).policy)
    assert (default.busy_quality_tolerance, default.sole_runner_as_balanced, default.tight_arrivals,
            default.smallest_under_overload) == (0.025, True, 0.0, 0.0)
    tuned = policy_config(load_settings({}, {"QUANTROUTER_BUSY_QUALITY_TOLERANCE": "0.005",
                                             "QUANTROUTER_SOLE_RUNNER_AS_BALANCED": "false",
                                             "QUANTROUTER_TIGHT_ARRIVALS": "0.5",
                                             "QUANTROUTER_SMALLEST_UNDER_OVERLOAD": "1"}).policy)
    assert (tuned.busy_quality_tolerance, tuned.sole_runner_as_balanced, tuned.tight_arrivals,
            tuned.smallest_under_overload) == (0.005, False, 0.5, 1.0)
    with pytest.raises(ConfigError, match="busy_quality_tolerance must be in"):
        load_settings({}, {"QUANTROUTER_BUSY_QUALITY_TOLERANCE": "2"})
    with pytest.raises(ConfigError, match="tight_arrivals must be a number ≥ 0"):
        load_settings({}, {"QUANTROUTER_TIGHT_ARRIVALS": "-1"})
    with pytest.raises(ConfigError, match="smallest_under_overload must be a number ≥ 0"):
        load_settings({}, {"QUANTROUTER_SMALLEST_UNDER_OVERLOAD": "nan"})


def test_cache_dir_follows_xdg() -> None:
    assert default_cache_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/quantrouter")
    assert default_cache_dir({"QUANTROUTER_CACHE_DIR": "/q", "XDG_CACHE_HOME": "/c"}) == Path("/q")


@pytest.mark.parametrize(("environ", "message"), [
    ({"QUANTROUTER_NUM_CTX": "lots"}, "setting num_ctx"),
    ({"QUANTROUTER_EMBEDDED": "maybe"}, "setting embedded: expected true or false"),
    ({"QUANTROUTER_MEMORY_CAPACITY": "big"}, "not a size"),
    ({"QUANTROUTER_DEFAULT_MIN_QUANTIZATION": "Q9_X"}, "default_min_quantization: unknown quantization"),
    ({"QUANTROUTER_LOAD_FRACTION": "1.5"}, "load_fraction must be in"),
    ({"QUANTROUTER_TLS_CERT": "/a.pem"}, "tls_cert and tls_key go together"),
    ({"QUANTROUTER_WORKERS": "0"}, "setting workers must be positive"),
    ({"QUANTROUTER_EVENT_LOOP": "trio"}, "setting event_loop must be uvloop or asyncio"),
    ({"OLLAMA_KV_CACHE_TYPE": "q5_1"}, "ollama_kv_cache_type: 'q5_1' is not one of Ollama's KV cache types"),
    ({"OLLAMA_NUM_PARALLEL": "0"}, "setting ollama_num_parallel must be positive"),
])
def test_bad_values_name_the_setting(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({}, environ)


def test_unknown_keys_in_the_file_are_refused(tmp_path: Path) -> None:
    toml = tmp_path / "quantrouter.toml"
    toml.write_text("num_cxt = 2048\n")
    with pytest.raises(ConfigError, match="unknown settings num_cxt"):
        load_settings({}, {}, toml)


def test_keys_land_in_their_group() -> None:
    settings = load_settings({"backend_read_timeout": "5s"}, {"QUANTROUTER_OLLAMA_HOST": "http://gpu:11434",
                                                               "QUANTROUTER_NUM_PREDICT_DEFAULT": "64"})
    assert settings.backend == BackendSettings(host="http://gpu:11434", read_timeout=5.0)
    assert settings.requests.num_predict == 64
    assert settings.limits == Settings().limits


def test_changing_keys_casts_and_checks_them_as_flags() -> None:
    settings = with_keys(Settings(), {"memory_capacity": "8GiB", "embedded": "yes"})
    assert (settings.memory.capacity, settings.embedded.enabled) == (8 * GiB, True)
    with pytest.raises(ConfigError, match="unknown settings num_cxt"):
        with_keys(settings, {"num_cxt": 1})
    with pytest.raises(ConfigError, match="max_prompt_bytes"):
        with_keys(settings, {"max_prompt_bytes": "16MiB"})
