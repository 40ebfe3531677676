"""Settings from the environment: HALKSPEECH_* names, the WHISPER__* names of faster-whisper server
deployments (each must land in the setting its name says), CLI overrides, and one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from halkspeech.config import ServerSettings, Settings, load_settings
from halkspeech.errors import InvalidRequest


@pytest.mark.parametrize(
    ("variable", "value", "section", "key", "expected"),
    [
        ("WHISPER__BATCH_SIZE", "24", "engine", "max_encoder_batch", 24),
        ("WHISPER__BATCH_WINDOW_MS", "12.5", "engine", "batch_window_ms", 12.5),
        ("WHISPER__MAX_QUEUE_SIZE", "77", "server", "max_queue_size", 77),
        ("WHISPER__MAX_CONCURRENT_REQUESTS", "9", "server", "max_concurrent_requests", 9),
        ("WHISPER__MODEL_TTL", "300", "server", "model_ttl_s", 300.0),
        ("WHISPER__MODEL_TTL", "-1", "server", "model_ttl_s", -1.0),
        ("WHISPER__PRELOAD_MODEL", "tiny.en, base", "server", "preload", ["tiny.en", "base"]),
        ("WHISPER__COMPUTE_TYPE", "float16", "engine", "dtype", "float16"),
        ("WHISPER__COMPUTE_TYPE", "int8_float16", "engine", "dtype", "int8"),  # int8 on a CPU, as CTranslate2
        ("WHISPER__COMPUTE_TYPE", "int8_bfloat16", "engine", "dtype", "int8"),
        ("WHISPER__COMPUTE_TYPE", "int8", "engine", "dtype", "int8"),
        ("WHISPER__COMPUTE_TYPE", "int8_float32", "engine", "dtype", "int8"),
        ("WHISPER__COMPUTE_TYPE", "BFLOAT16", "engine", "dtype", "bfloat16"),
        ("WHISPER__INFERENCE_DEVICE", "cuda", "engine", "device", "cuda"),
        ("WHISPER__INFERENCE_DEVICE", "CPU", "engine", "device", "cpu"),
        ("WHISPER__DEVICE_INDEX", "3", "engine", "device_index", (3,)),
        ("WHISPER__DEVICE_INDEX", "[0, 1]", "engine", "device_index", (0, 1)),  # faster-whisper-server's list
        ("WHISPER__DEVICE_INDEX", "2,3", "engine", "device_index", (2, 3)),
        ("WHISPER__MODEL", "tiny.en", "model", "default", "tiny.en"),
    ],
)
def test_legacy_variables_land_where_their_names_say(
    variable: str, value: str, section: str, key: str, expected: object
) -> None:
    settings = load_settings({variable: value})
    assert getattr(getattr(settings, section), key) == expected
    defaults = Settings()
    untouched = {s: getattr(defaults, s).model_dump() for s in ("model", "engine", "server")}
    untouched[section].pop(key)
    for s, values in untouched.items():
        got = getattr(settings, s).model_dump()
        assert {k: got[k] for k in values} == values  # nothing else moved


def test_an_unknown_compute_type_names_its_variable_and_the_types_it_takes() -> None:
    """engine.dtype's own error named only that setting and listed float32 ... int8, not int8_float16 and the
    other compute types the variable takes."""
    with pytest.raises(InvalidRequest, match=r"WHISPER__COMPUTE_TYPE='int8float16' is no compute type; use one of "
                       r"default, auto, .*int8_float16, int8_bfloat16, int8_float32, int16$"):  # fmt: skip
        load_settings({"WHISPER__COMPUTE_TYPE": "int8float16"})
    # as for every legacy name, HALKSPEECH_ENGINE__DTYPE wins, and the legacy value is then not read
    assert load_settings({"WHISPER__COMPUTE_TYPE": "x", "HALKSPEECH_ENGINE__DTYPE": "int8"}).engine.dtype == "int8"


def test_preload_true_means_the_default_model() -> None:
    assert load_settings({"WHISPER__PRELOAD_MODEL": "true", "WHISPER__MODEL": "base"}).server.preload == ["base"]
    assert load_settings({"WHISPER__PRELOAD_MODEL": "false"}).server.preload == []


def test_halkspeech_names_win_over_legacy_and_flags_win_over_both() -> None:
    env = {"WHISPER__MAX_QUEUE_SIZE": "5", "HALKSPEECH_SERVER__MAX_QUEUE_SIZE": "6"}
    assert load_settings(env).server.max_queue_size == 6
    assert load_settings(env, server__max_queue_size=7).server.max_queue_size == 7
    assert load_settings(env, server__max_queue_size=None).server.max_queue_size == 6  # None: flag not given


def test_lists_from_csv_or_json() -> None:
    assert load_settings({"HALKSPEECH_SERVER__API_KEYS": "a, b ,c"}).server.api_keys == ["a", "b", "c"]
    assert load_settings({"HALKSPEECH_SERVER__API_KEYS": '["x,y", "z"]'}).server.api_keys == ["x,y", "z"]
    nested = load_settings({"halkspeech_engine__max_slots": "64", "HALKSPEECH_SERVER__FORCE_DECODE_TOKENS": "80"})
    assert nested.engine.max_slots == 64 and nested.server.force_decode_tokens == 80


def test_the_given_mapping_is_the_only_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HALKSPEECH_SERVER__PORT", "1234")
    monkeypatch.setenv("WHISPER__MODEL_TTL", "5")
    before = dict(os.environ)
    assert load_settings({}).server.port == 8000 and load_settings({}).server.model_ttl_s == -1
    assert dict(os.environ) == before  # read, never swapped or modified
    assert load_settings().server.port == 1234 and load_settings().server.model_ttl_s == 5
    assert Settings().server.port == 8000  # built directly: defaults, no environment


def test_unknown_halkspeech_names_are_errors_not_ignored() -> None:
    """A typo must not pass silently: HALKSPEECH_SERVER__API_KEY (no S) would leave the server open."""
    with pytest.raises(InvalidRequest, match="unknown setting HALKSPEECH_SERVER__API_KEY; did you mean "
                       "HALKSPEECH_SERVER__API_KEYS"):  # fmt: skip
        load_settings({"HALKSPEECH_SERVER__API_KEY": "secret"})
    with pytest.raises(InvalidRequest, match=r"unknown setting HALKSPEECH_NOTHING \(README: Configuration\)"):
        load_settings({"HALKSPEECH_NOTHING": "1"})
    known = {"HALKSPEECH_LOG_LEVEL": "info", "HALKSPEECH_ENGINE": "{}", "halkspeech_server__port": "9000"}
    assert load_settings(known).server.port == 9000  # any case, whole sections as JSON
    assert load_settings({"OTHER_APP_SETTING": "x"}).server.port == 8000  # other names are not ours


def test_unknown_names_inside_a_section_json_are_errors_too() -> None:
    """HALKSPEECH_SERVER='{"api_key": [...]}' was ignored (pydantic's extra="ignore"): a server left open."""
    with pytest.raises(InvalidRequest, match=r"^unknown setting server\.api_key; did you mean server\.api_keys\?$"):
        load_settings({"HALKSPEECH_SERVER": '{"api_key": ["k1"]}'})
    with pytest.raises(InvalidRequest, match=r"unknown setting engine\.warp_drive \(README: Configuration\)"):
        load_settings({"HALKSPEECH_ENGINE": '{"warp_drive": 9}'})


@pytest.mark.parametrize(
    "env",
    [
        {"HALKSPEECH_SERVER__API_KEYS": '["k1", ""]'},
        {"HALKSPEECH_SERVER__API_KEYS": '["  "]'},
        {"HALKSPEECH_SERVER__API_KEYS": ""},  # "$KEY" with KEY unset: it was no keys at all, an open server
        {"HALKSPEECH_SERVER__API_KEYS": "k1,,k2"},
    ],
)
def test_a_blank_api_key_stops_the_start(env: dict[str, str]) -> None:
    """An empty key let in anyone who sent an empty X-API-Key or ?token= (`--api-key "$KEY"`, KEY unset)."""
    with pytest.raises(InvalidRequest, match=r"server\.api_keys: .*empty or blank .*\(got \(not shown\)\)"):
        load_settings(env)
    with pytest.raises(InvalidRequest, match="empty or blank"):
        load_settings({}, server__api_keys=[""])  # the --api-key flag


def test_a_bad_api_key_value_is_never_echoed() -> None:
    with pytest.raises(InvalidRequest) as error:
        load_settings({"HALKSPEECH_SERVER__API_KEYS": "[s3cr3t-key"})
    assert "s3cr3t" not in str(error.value) and "server.api_keys" in str(error.value)


def test_preload_true_follows_the_final_default_model() -> None:
    """ "true" was resolved before WHISPER__MODEL and the flags applied: it preloaded base, the first default."""
    assert load_settings({"HALKSPEECH_SERVER__PRELOAD": "true"}, model__default="tiny.en").server.preload == ["tiny.en"]
    assert load_settings({"HALKSPEECH_SERVER__PRELOAD": "true", "WHISPER__MODEL": "tiny.en"}).server.preload == [
        "tiny.en"
    ]


@pytest.mark.parametrize("env", [{"WHISPER__MODEL": ""}, {"HALKSPEECH_MODEL__DEFAULT": " "},
                                 {"HALKSPEECH_MODEL__CACHE_DIR": ""}])  # fmt: skip
def test_an_empty_model_or_cache_dir_is_an_error(env: dict[str, str]) -> None:
    """Both became the working directory: a model loaded from wherever the server was started."""
    with pytest.raises(InvalidRequest, match=r"invalid setting model\.(default|cache_dir): .*must not be empty"):
        load_settings(env)


def test_a_cache_dir_under_home_is_expanded() -> None:
    """HALKSPEECH_MODEL__CACHE_DIR='~/models' from an env file (no shell to expand it) was ./~/models: every
    cached model looked missing and `models pull` wrote into a directory named '~' in the working directory."""
    assert load_settings({"HALKSPEECH_MODEL__CACHE_DIR": "~/models"}).model.cache_dir == Path.home() / "models"
    assert load_settings({}, model__cache_dir=Path("~/m")).model.cache_dir == Path.home() / "m"


def test_log_level_is_any_case() -> None:
    assert load_settings({"HALKSPEECH_LOG_LEVEL": "WARNING"}).log_level == "warning"


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"HALKSPEECH_SERVER__PORT": "eighty"}, "invalid setting server.port"),
        ({"WHISPER__MAX_CONCURRENT_REQUESTS": "0"}, "invalid setting server.max_concurrent_requests"),
        ({"WHISPER__INFERENCE_DEVICE": "tpu"}, "invalid setting engine.device"),
        ({"HALKSPEECH_ENGINE": "{not json"}, "invalid setting"),
        # numbers that would start an engine unable to work: refused before anything starts
        ({"WHISPER__BATCH_SIZE": "0"}, "invalid setting engine.max_encoder_batch"),
        ({"HALKSPEECH_ENGINE__MAX_SLOTS": "-3"}, "invalid setting engine.max_slots"),
        ({"HALKSPEECH_ENGINE__ADMIT_BATCH": "0"}, "invalid setting engine.admit_batch"),
        ({"WHISPER__DEVICE_INDEX": "-1"}, "invalid setting engine.device_index"),
        ({"WHISPER__DEVICE_INDEX": "0,0"}, "a GPU index appears twice"),
        ({"WHISPER__DEVICE_INDEX": "[]"}, "give at least one GPU index"),
        ({"WHISPER__DEVICE_INDEX": "[0, 1"}, "invalid setting engine.device_index"),
        ({"WHISPER__MODEL_TTL": "-5"}, "invalid setting server.model_ttl_s"),
        ({"HALKSPEECH_SERVER__WS_MAX_TURN_S": "0"}, "invalid setting server.ws_max_turn_s"),
        # infinities and NaN parse as floats; each would fail later, deep in the server (a frame size, a timeout)
        ({"HALKSPEECH_SERVER__WS_MAX_TURN_S": "inf"}, "invalid setting server.ws_max_turn_s"),
        ({"HALKSPEECH_SERVER__REQUEST_TIMEOUT_S": "nan"}, "invalid setting server.request_timeout_s"),
        ({"HALKSPEECH_ENGINE__GPU_MEMORY_FRACTION": "nan"}, "invalid setting engine.gpu_memory_fraction"),
        ({"HALKSPEECH_LOG_LEVEL": "loud"}, "invalid setting log_level"),
    ],
)
def test_bad_values_are_one_line_errors(env: dict[str, str], says: str) -> None:
    with pytest.raises(InvalidRequest, match=says) as error:
        load_settings(env)
    assert "\n" not in str(error.value)


def test_idle_kept_alive_connections_outlive_the_proxies_in_front() -> None:
    """uvicorn's own 5 s closed connections that nginx or a load balancer (60 s idle) was about to reuse."""
    from halkspeech.api.server import uvicorn_config

    assert uvicorn_config(object(), ServerSettings()).timeout_keep_alive == 75 > 60
    assert uvicorn_config(object(), ServerSettings(keep_alive_timeout_s=9)).timeout_keep_alive == 9
