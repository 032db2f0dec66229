"""Configuration, in process: what an operator sees when a value is wrong, and what runs when not.

Every refusal is one line naming the key, the value, where it came from (the file, a
``GATEWAY_*`` variable, or ``--bind``) and what is allowed; nothing is clamped or defaulted.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel.config import (
    Config,
    ConfigError,
    config_from_mapping,
    effective,
    load_config,
    parse_size,
)
from tests.support import sim_model

ROOT = Path(__file__).resolve().parent.parent
FILE = "file gw.toml"
STATIC = {"name": "remote", "launcher": "static", "url": "http://10.0.0.5:8000"}


def load(doc: dict[str, Any] | None = None, *, env: dict[str, str] | None = None,
         options: dict[str, Any] | None = None) -> Config:
    """A document with one good model unless it says otherwise, read as if from gw.toml."""
    return config_from_mapping({"models": [sim_model("m")], **(doc or {})}, source=FILE,
                               environ=env or {}, options=options)


def refusal(doc: dict[str, Any] | None = None, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(doc, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def assert_names(message: str, key: str, value: str, source: str, allowed: str) -> None:
    assert message.startswith(f"{key} = {value} (from {source}): "), message
    assert allowed in message, message


# --- unknown keys --------------------------------------------------------------------------

@pytest.mark.parametrize(("doc", "key", "value", "allowed"), [
    ({"gatway": {"bind": "127.0.0.1:1"}}, "gatway", "{'bind': '127.0.0.1:1'}",
     "allowed keys: gateway, upstream, admin, auth, engines, models"),
    ({"gateway": {"max_concurent": 5}}, "gateway.max_concurent", "5",
     "unknown key; did you mean max_concurrent? allowed keys: bind, "),
    ({"upstream": {"read_timeout": 5.0}}, "upstream.read_timeout", "5.0",
     "unknown key; allowed keys: connect_timeout, timeout, "),
    ({"admin": {"password": "x"}}, "admin.password", "'x'", "unknown key; allowed keys: token"),
    ({"models": [sim_model("m", idle_timout=5)]}, 'models["m"].idle_timout', "5",
     "unknown key; did you mean idle_timeout? allowed keys: name, "),
    ({"engines": {"docker": {"url": "unix:///d.sock", "sockett": "x"}}},
     "engines.docker.sockett", "'x'", "allowed keys: name, url"),
], ids=["top-level", "gateway", "upstream", "admin", "model", "engine"])
def test_unknown_key_is_refused_in_every_section(doc, key, value, allowed):
    message = refusal(doc)
    assert_names(message, key, value, FILE, allowed)
    assert "unknown key" in message


def test_engine_table_may_not_rename_itself():
    message = refusal({"engines": {"docker": {"name": "podman", "url": "unix:///d.sock"}}})
    assert_names(message, "engines.docker.name", "'podman'", FILE, "named by its table")


# --- types ---------------------------------------------------------------------------------

WRONG_TYPE = [
    ({"gateway": {"max_concurrent": "50"}}, "gateway.max_concurrent", "'50'",
     "must be an integer from 1 to 10000"),
    ({"gateway": {"max_queue_size": 5.0}}, "gateway.max_queue_size", "5.0",
     "must be an integer from 1 to 1000000"),
    ({"gateway": {"bind": 8080}}, "gateway.bind", "8080", "must be a string"),
    ({"gateway": {"log_format": "yaml"}}, "gateway.log_format", "'yaml'",
     "must be one of 'auto', 'json', 'console'"),
    ({"gateway": {"instance": ""}}, "gateway.instance", "''", "must be a non-empty string"),
    ({"gateway": 5}, "gateway", "5", "must be a table"),
    ({"upstream": {"timeout": "300"}}, "upstream.timeout", "'300'",
     "must be a number from 0.001 to 86400.0"),
    ({"models": [sim_model("m", aliases="small")]}, 'models["m"].aliases', "'small'",
     "must be a list of strings"),
    ({"models": [sim_model("m", gpus=["0"])]}, 'models["m"].gpus[0]', "'0'", "must be an integer"),
    ({"models": [sim_model("m", env={"CUDA_VISIBLE_DEVICES": 0})]}, 'models["m"].env',
     "{'CUDA_VISIBLE_DEVICES': 0}", "must be a table of strings"),
    ({"models": {"name": "m"}}, "models", "{'name': 'm'}",
     "must be a non-empty array of [[models]] tables"),
]


@pytest.mark.parametrize(("doc", "key", "value", "allowed"), WRONG_TYPE,
                         ids=[f"{key}={value}" for _, key, value, _ in WRONG_TYPE])
def test_wrong_type_is_refused(doc, key, value, allowed):
    assert_names(refusal(doc), key, value, FILE, allowed)


@pytest.mark.parametrize(("section", "key", "allowed"), [
    ("gateway", "max_concurrent", "an integer from 1 to 10000"),
    ("gateway", "max_queue_size", "an integer from 1 to 1000000"),
    ("upstream", "timeout", "a number from 0.001 to 86400.0"),
])
def test_bool_is_not_a_number(section, key, allowed):
    assert_names(refusal({section: {key: True}}), f"{section}.{key}", "True", FILE, allowed)


# --- bounds --------------------------------------------------------------------------------

BOUNDED = [
    ("gateway", "max_queue_size", int, "an integer from 1 to 1000000"),
    ("gateway", "max_concurrent", int, "an integer from 1 to 10000"),
    ("gateway", "max_models_concurrent", int, "an integer from 1 to 1000"),
    ("gateway", "max_response_ids", int, "an integer from 1 to 10000000"),
    ("upstream", "timeout", float, "a number from 0.001 to 86400.0"),
    ("gateway", "send_timeout", float, "a number from 0.001 to 86400.0"),
    ("gateway", "body_timeout", float, "a number from 0.001 to 86400.0"),
]


def test_a_body_budget_smaller_than_one_body_is_refused():
    message = refusal({"gateway": {"max_body_bytes": 1000, "max_buffered_body_bytes": 999}})
    assert_names(message, "gateway.max_buffered_body_bytes", "999", FILE,
                 "at least gateway.max_body_bytes (1000)")


@pytest.mark.parametrize("value", [0, -1, 10 ** 12], ids=["zero", "negative", "huge"])
@pytest.mark.parametrize(("section", "key", "kind", "allowed"), BOUNDED,
                         ids=[key for _, key, _, _ in BOUNDED])
def test_out_of_bounds_is_refused_not_clamped(section, key, kind, allowed, value):
    message = refusal({section: {key: value}})
    assert_names(message, f"{section}.{key}", repr(kind(value)), FILE, allowed)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")],
                         ids=["nan", "inf", "-inf"])
def test_nan_and_infinity_are_refused(value):
    message = refusal({"upstream": {"timeout": value}})
    assert_names(message, "upstream.timeout", repr(value), FILE, "a number from 0.001 to")


@pytest.mark.parametrize("raw", ["nan", "inf", "1e999"])
def test_nan_and_infinity_from_a_variable_are_refused(raw):
    message = refusal(env={"GATEWAY_HTTP_TIMEOUT": raw})
    assert message.startswith("upstream.timeout = ")
    assert "(from environment variable GATEWAY_HTTP_TIMEOUT): must be a number from 0.001" \
        in message


def test_float_field_refuses_an_integer_too_large_for_a_float():
    message = refusal({"upstream": {"timeout": 10 ** 400}})
    assert message.startswith("upstream.timeout = 1000")
    assert "must be a number from 0.001 to 86400.0" in message


@pytest.mark.parametrize(("section", "key", "lo", "hi"), [
    ("gateway", "max_queue_size", 1, 1_000_000),
    ("gateway", "max_concurrent", 1, 10_000),
    ("gateway", "max_models_concurrent", 1, 1_000),
    ("gateway", "max_response_ids", 1, 10_000_000),
    ("gateway", "stream_keepalive", 0.0, 3_600.0),
    ("admin", "events_send_timeout", 0.1, 3_600.0),
    ("upstream", "timeout", 0.001, 86_400.0),
])
def test_bounds_are_inclusive_and_exact(section, key, lo, hi):
    for value in (lo, hi):
        assert getattr(getattr(load({section: {key: value}}), section), key) == value
    for value in (lo / 2 if isinstance(lo, float) and lo else lo - 1, hi + 1):
        with pytest.raises(ConfigError):
            load({section: {key: value}})


def test_a_stream_keepalive_too_short_to_tick_is_refused():
    assert load({"gateway": {"stream_keepalive": 0.1}}).gateway.stream_keepalive == 0.1
    message = refusal({"gateway": {"stream_keepalive": 0.01}})
    assert_names(message, "gateway.stream_keepalive", "0.01", FILE,
                 "must be 0 (no loading feedback) or a number from 0.1 to 3600.0")


def test_max_priority_wait_must_be_below_the_queue_timeout_where_priorities_differ():
    tenants = [{"name": "low", "priority": -1}, {"name": "high", "priority": 1}]
    assert load({"tenants": tenants}).gateway.max_priority_wait == 10.0
    message = refusal({"gateway": {"max_priority_wait": 60}, "tenants": tenants})
    assert_names(message, "gateway.max_priority_wait", "60.0", FILE,
                 "must be below gateway.queue_timeout (60) where tenants have different "
                 "priorities: a low-priority request would time out before its turn")
    # Equal priorities: the bound never applies, any value is kept.
    equal = [{"name": "a"}, {"name": "b", "weight": 2}]
    assert load({"gateway": {"max_priority_wait": 600}, "tenants": equal}
                ).gateway.max_priority_wait == 600
    assert_names(refusal({"gateway": {"max_priority_wait": 0}}), "gateway.max_priority_wait",
                 "0.0", FILE, "must be a number from 0.001 to 86400.0")


@given(st.integers(min_value=-(10 ** 20), max_value=10 ** 20))
def test_max_concurrent_is_kept_exactly_or_refused(value):
    try:
        config = load({"gateway": {"max_concurrent": value}})
    except ConfigError as exc:
        assert not 1 <= value <= 10_000
        assert str(exc).startswith(f"gateway.max_concurrent = {value} (from {FILE})")
    else:
        assert config.gateway.max_concurrent == value


# --- bind ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bind", [
    "localhost", "127.0.0.1", "127.0.0.1:", ":8080", "127.0.0.1:0", "127.0.0.1:65536",
    "127.0.0.1:http", "127.0.0.1:\uff18\uff10", "127.0.0.1:²", "http://127.0.0.1:8080",
    "127.0.0.1 :8080", "::1:8080", "[::zz]:8080", "127.0.0.1:8080\n",
])
def test_bad_bind_is_refused(bind):
    message = refusal({"gateway": {"bind": bind}})
    assert_names(message, "gateway.bind", repr(bind), FILE,
                 "must be HOST:PORT: a host name, an IPv4 address or an [IPv6] address, "
                 "and a port from 1 to 65535")


@pytest.mark.parametrize("bind", ["0.0.0.0:80", "localhost:8080", "[::1]:8080",
                                  "gateway.internal:65535"])
def test_good_bind_is_accepted(bind):
    assert load({"gateway": {"bind": bind}}).gateway.bind == bind


# --- models and launchers ------------------------------------------------------------------

def test_bad_launcher_is_refused():
    message = refusal({"models": [{**STATIC, "launcher": "docker"}]})
    assert_names(message, 'models["remote"].launcher', "'docker'", FILE,
                 "must be one of 'process', 'static', 'container'")


def test_a_model_without_a_name_of_its_own_is_named_by_its_place():
    assert refusal({"models": [{"launcher": "static", "url": "http://h:1"}]}) == (
        f"models[0].name is missing (from {FILE}): it is required, a string")
    assert_names(refusal({"models": [sim_model("a"), sim_model("a", vram_mb=-1)]}),
                 "models[1].vram_mb", "-1", FILE, "must be an integer from 0 to")


def test_missing_launcher_is_refused():
    message = refusal({"models": [{"name": "m", "url": "http://h:1"}]})
    assert message == (f'models["m"].launcher is missing (from {FILE}): it is required, '
                       "one of 'process', 'static', 'container'")


def test_a_static_model_cannot_sleep():
    assert_names(refusal({"models": [{**STATIC, "sleep_level": 1}]}),
                 'models["remote"].sleep_level', "1", FILE, "must be absent for a static model")
    assert load({"models": [sim_model("a", sleep_level=2)]}).models[0].sleep_level == 2
    assert_names(refusal({"models": [sim_model("a", sleep_level=3)]}),
                 'models["a"].sleep_level', "3", FILE, "must be an integer from 1 to 2")


def test_a_model_cannot_sleep_where_no_model_may_be_asleep():
    assert_names(refusal({"gateway": {"max_models_asleep": 0},
                          "models": [sim_model("a", sleep_level=1)]}),
                 'models["a"].sleep_level', "1", FILE,
                 "must be absent while gateway.max_models_asleep is 0")


ENGINES = {"docker": {"url": "unix:///run/docker.sock"}}


@pytest.mark.parametrize(("model", "key"), [
    ({"name": "m", "launcher": "process"}, "command"),
    ({"name": "m", "launcher": "process", "command": []}, "command"),
    ({"name": "m", "launcher": "static"}, "url"),
    ({"name": "m", "launcher": "container", "image": "vllm/vllm-openai"}, "engine"),
    ({"name": "m", "launcher": "container", "engine": "docker"}, "image"),
], ids=["process-no-command", "process-empty-command", "static-no-url", "container-no-engine",
        "container-no-image"])
def test_launcher_without_what_it_needs_is_refused(model, key):
    message = refusal({"models": [model], "engines": ENGINES})
    assert message == (f'models["m"].{key} is missing or empty (from {FILE}): a '
                       f"{model['launcher']} model requires it")


@pytest.mark.parametrize(("engines", "allowed"), [(ENGINES, "docker"), ({}, "none defined")])
def test_unknown_engine_name_is_refused(engines, allowed):
    model = {"name": "m", "launcher": "container", "engine": "podman", "image": "vllm"}
    message = refusal({"models": [model], "engines": engines})
    assert_names(message, 'models["m"].engine', "'podman'", FILE,
                 f"must be the name of an [engines.NAME] table: {allowed}")


@pytest.mark.parametrize(("models", "key", "value", "owner"), [
    ([sim_model("a"), sim_model("a")], "models[1].name", "a", "a"),
    ([sim_model("a"), sim_model("b", aliases=["a"])], 'models["b"].aliases[0]', "a", "a"),
    ([sim_model("a", aliases=["x"]), sim_model("b", aliases=["x"])], 'models["b"].aliases[0]',
     "x", "a"),
    ([sim_model("a", aliases=["a"])], 'models["a"].aliases[0]', "a", "a"),
    ([sim_model("a", aliases=["x"]), sim_model("x")], "models[1].name", "x", "a"),
    ([sim_model("a"), sim_model("b", adapters=[{"name": "a", "path": "/"}])],
     'models["b"].adapters[0].name', "a", "a"),
    ([sim_model("a", adapters=[{"name": "l", "path": "/"}]),
      sim_model("b", adapters=[{"name": "l", "path": "/"}])], 'models["b"].adapters[0].name',
     "l", "a"),
    ([sim_model("a", adapters=[{"name": "l", "path": "/"}]), sim_model("b", aliases=["l"])],
     'models["b"].aliases[0]', "l", "a"),
], ids=["name-twice", "alias-is-a-name", "alias-twice", "alias-is-own-name", "name-is-alias",
        "adapter-is-a-name", "adapter-twice", "alias-is-an-adapter"])
def test_duplicate_model_names_and_aliases_are_refused(models, key, value, owner):
    assert_names(refusal({"models": models}), key, repr(value), FILE,
                 "must be unique among the names, aliases and adapters of the models (model "
                 f"{owner!r} has it")


def test_adapters_are_read_with_their_base_model(tmp_path: Path) -> None:
    lora = [{"name": "l1", "path": str(tmp_path)}, {"name": "l2", "path": "/srv/l2"}]
    config = config_from_mapping({"models": [
        sim_model("a", adapters=lora[:1], max_loras=2),
        {"name": "b", "launcher": "static", "url": "http://gpu:8000", "adapters": lora[1:]}]})
    a, b = config.models
    assert [(x.name, x.path) for x in a.adapters] == [("l1", str(tmp_path))]
    assert (a.max_loras, a.max_lora_rank, b.max_loras) == (2, 16, 1)
    assert dict(config.adapters) == {"l1": a, "l2": b}
    assert effective(config)["models"][1]["adapters"] == lora[1:]


@pytest.mark.parametrize(("table", "key", "value", "allowed"), [
    ({"adapters": {"name": "l"}}, "adapters", "{'name': 'l'}", "must be an array of tables"),
    ({"adapters": ["l"]}, "adapters[0]", "'l'", "must be a table"),
    ({"adapters": [{"name": "l", "path": "/", "rank": 8}]}, "adapters[0].rank", "8",
     "unknown key; allowed keys: name, path"),
    ({"adapters": [{"name": "", "path": "/"}]}, "adapters[0].name", "''",
     "must be a non-empty string"),
    ({"adapters": [{"name": "l", "path": "/nowhere/l"}]}, "adapters[0].path", "'/nowhere/l'",
     "must be a path this host can read: a process model's server reads its adapters here"),
    ({"max_loras": 0}, "max_loras", "0", "must be an integer from 1 to 1000"),
    ({"max_lora_rank": 12}, "max_lora_rank", "12",
     "must be one of vLLM's ranks: 1, 8, 16, 32, 64, 128, 256, 320, 512"),
], ids=["not-an-array", "not-a-table", "unknown-key", "empty-name", "unreadable-path",
        "max-loras", "rank"])
def test_bad_adapters_are_refused(table, key, value, allowed):
    assert_names(refusal({"models": [sim_model("a", **table)]}), f'models["a"].{key}', value,
                 FILE, allowed)


@pytest.mark.parametrize(("env", "source"), [({}, FILE),
                                             ({"GATEWAY_DEFAULT_MODEL": "c"},
                                              "environment variable GATEWAY_DEFAULT_MODEL")],
                         ids=["file", "variable"])
def test_default_model_must_be_a_configured_name_or_alias(env, source):
    models = [sim_model("a", aliases=["x"]), sim_model("b")]
    doc = {"models": models, **({} if env else {"gateway": {"default_model": "c"}})}
    assert_names(refusal(doc, env=env), "gateway.default_model", "'c'", source,
                 "must be the name or an alias of a configured model: a, x, b")


@pytest.mark.parametrize("name", ["b", "x"])
def test_default_model_may_be_a_name_or_an_alias(name):
    models = [sim_model("a", aliases=["x"]), sim_model("b")]
    config = load({"models": models, "gateway": {"default_model": name}})
    assert effective(config)["gateway"]["default_model"] == name


def test_empty_alias_is_refused():
    message = refusal({"models": [sim_model("a", aliases=[""])]})
    assert_names(message, 'models["a"].aliases[0]', "''", FILE, "must be a non-empty string")


def test_empty_model_list_is_refused():
    assert_names(refusal({"models": []}), "models", "[]", FILE,
                 "must be a non-empty array of [[models]] tables")


def test_missing_model_list_is_refused():
    with pytest.raises(ConfigError) as info:
        config_from_mapping({}, source=FILE, environ={})
    assert str(info.value) == (f"models is missing (from {FILE}): it is required, a non-empty "
                               "array of [[models]] tables")


@pytest.mark.parametrize(("model", "key", "value", "allowed"), [
    ({**STATIC, "url": "10.0.0.5:8000"}, "url", "'10.0.0.5:8000'", "an http:// or https://"),
    ({**STATIC, "url": "http://:8000"}, "url", "'http://:8000'", "with a host"),
    ({**STATIC, "url": "http://h:99999"}, "url", "'http://h:99999'", "with a host"),
    ({**STATIC, "health_path": "health"}, "health_path", "'health'", "a path starting with /"),
    ({**STATIC, "gpus": [64]}, "gpus", "[64]", "GPU indexes from 0 to 63"),
    ({**STATIC, "container_port": 0}, "container_port", "0", "an integer from 1 to 65535"),
    ({**STATIC, "max_concurrent": 0}, "max_concurrent", "0", "an integer from 1 to 10000"),
], ids=["url-no-scheme", "url-no-host", "url-bad-port", "health-path", "gpus", "container-port",
        "model-max-concurrent"])
def test_bad_model_value_is_refused(model, key, value, allowed):
    assert_names(refusal({"models": [model]}), f'models["remote"].{key}', value, FILE, allowed)


@pytest.mark.parametrize("url", ["/run/docker.sock", "unix://", "tcp://[::1", "tcp://h:99999",
                                 "ssh://h"])
def test_bad_engine_url_is_refused(url):
    message = refusal({"engines": {"docker": {"url": url}}})
    assert_names(message, "engines.docker.url", repr(url), FILE,
                 "must be a unix://PATH, tcp://, http:// or https:// URL with a host")


@pytest.mark.parametrize("part", ["{pyton}", "--x={0}", '{"temperature": 0}', "{port.real}", "}"])
def test_command_placeholder_typo_is_refused(part):
    message = refusal({"models": [sim_model("m", command=["vllm", part])]})
    assert_names(message, 'models["m"].command[1]', repr(part), FILE,
                 "must be a string whose only placeholders are {port}, {python}, {name} "
                 "(write {{ and }} for a literal brace)")


def test_command_placeholders_and_escaped_braces_are_accepted():
    command = ["{python}", "--port={port}", "--model", "{name}", '{{"temperature": 0}}']
    assert load({"models": [sim_model("m", command=command)]}).models[0].command == \
        tuple(command)


# --- where a value came from ---------------------------------------------------------------

@pytest.mark.parametrize(("doc", "env", "options", "key", "value", "source"), [
    ({"gateway": {"max_concurrent": 0}}, {}, None, "gateway.max_concurrent", "0", FILE),
    ({}, {"GATEWAY_MAX_CONCURRENT": "0"}, None, "gateway.max_concurrent", "0",
     "environment variable GATEWAY_MAX_CONCURRENT"),
    ({"gateway": {"max_models_concurrent": 3}}, {"GATEWAY_MAX_MODELS_CONCURRENT": "-2"}, None,
     "gateway.max_models_concurrent", "-2", "environment variable GATEWAY_MAX_MODELS_CONCURRENT"),
    ({}, {"GATEWAY_MAX_QUEUE_SIZE": "many"}, None, "gateway.max_queue_size", "'many'",
     "environment variable GATEWAY_MAX_QUEUE_SIZE"),
    ({}, {"GATEWAY_HTTP_TIMEOUT": "0"}, None, "upstream.timeout", "0.0",
     "environment variable GATEWAY_HTTP_TIMEOUT"),
    ({}, {"GATEWAY_UPSTREAM_TIMEOUT": "-1"}, None, "upstream.timeout", "-1.0",
     "environment variable GATEWAY_UPSTREAM_TIMEOUT"),
    ({}, {"GATEWAY_BIND": "localhost"}, None, "gateway.bind", "'localhost'",
     "environment variable GATEWAY_BIND"),
    ({}, {}, {"gateway.bind": "0.0.0.0:99999"}, "gateway.bind", "'0.0.0.0:99999'",
     "command-line option --bind"),
], ids=["file", "variable", "variable-over-file", "variable-not-a-number", "http-timeout-alias",
        "upstream-timeout", "bind-variable", "bind-option"])
def test_message_names_the_source(doc, env, options, key, value, source):
    message = refusal(doc, env=env, options=options)
    assert message.startswith(f"{key} = {value} (from {source}): must be "), message


def test_variable_overrides_file_and_option_overrides_both():
    doc = {"gateway": {"max_concurrent": 0, "bind": "127.0.0.1:1"}}
    env = {"GATEWAY_MAX_CONCURRENT": "4", "GATEWAY_BIND": "127.0.0.1:2"}
    config = load(doc, env=env, options={"gateway.bind": "127.0.0.1:3"})
    assert (config.gateway.max_concurrent, config.gateway.bind) == (4, "127.0.0.1:3")


def test_unknown_gateway_variable_is_refused():
    message = refusal(env={"GATEWAY_MAX_CONCURENT": "5"})
    assert message.startswith("GATEWAY_MAX_CONCURENT = '5' (from environment variable "
                              "GATEWAY_MAX_CONCURENT): unknown variable; did you mean "
                              "GATEWAY_MAX_CONCURRENT? allowed: ")
    assert "GATEWAY_MAX_MODELS_CONCURRENT" in message and "GATEWAY_HTTP_TIMEOUT" in message


def test_unknown_variable_that_may_hold_a_secret_is_not_echoed():
    message = refusal(env={"GATEWAY_ADMIN_TOKN": "s3cret"})
    assert "s3cret" not in message
    assert message.startswith("GATEWAY_ADMIN_TOKN = '***' (from environment variable "
                              "GATEWAY_ADMIN_TOKN): unknown variable; did you mean "
                              "GATEWAY_ADMIN_TOKEN?")


def test_bad_secret_value_is_not_echoed():
    message = refusal({"admin": {"token": 123456}})
    assert message == f"admin.token = '***' (from {FILE}): must be a string"


def test_other_variables_are_ignored():
    config = load(env={"PATH": "/bin", "GATEWAY_CONFIG": "elsewhere.toml", "gateway_bind": "x"})
    assert config.gateway.bind == "127.0.0.1:8080"


def test_two_variables_for_one_key_are_refused():
    message = refusal(env={"GATEWAY_HTTP_TIMEOUT": "5", "GATEWAY_UPSTREAM_TIMEOUT": "7"})
    assert message == ("GATEWAY_UPSTREAM_TIMEOUT = '7' (from environment variable "
                       "GATEWAY_UPSTREAM_TIMEOUT): upstream.timeout is already set by "
                       "GATEWAY_HTTP_TIMEOUT; set only one of them")


def test_variable_values_take_the_type_of_their_key():
    config = load(env={"GATEWAY_MAX_CONCURRENT": "7", "GATEWAY_MAX_MODELS_CONCURRENT": "2",
                       "GATEWAY_MAX_QUEUE_SIZE": "30", "GATEWAY_HTTP_TIMEOUT": "12",
                       "GATEWAY_QUEUE_TIMEOUT": "2.5", "GATEWAY_ADMIN_TOKEN": "t",
                       "GATEWAY_MAX_CONCURRENT_TOTAL": "9"})
    typed = [config.gateway.max_concurrent, config.gateway.max_models_concurrent,
             config.gateway.max_queue_size, config.upstream.timeout,
             config.gateway.queue_timeout, config.admin.token,
             config.gateway.max_concurrent_total]
    assert typed == [7, 2, 30, 12.0, 2.5, "t", 9]
    assert [type(v) for v in typed] == [int, int, int, float, float, str, int]


@pytest.mark.parametrize("raw", ["7.5", "", "seven", "0x10"])
def test_variable_that_is_not_an_integer_is_refused(raw):
    message = refusal(env={"GATEWAY_MAX_CONCURRENT": raw})
    assert_names(message, "gateway.max_concurrent", repr(raw),
                 "environment variable GATEWAY_MAX_CONCURRENT", "an integer from 1 to 10000")


# --- the result ----------------------------------------------------------------------------

def test_config_is_frozen():
    config = load({"models": [sim_model("m", env={"A": "1"})], "engines": ENGINES})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.gateway.max_concurrent = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.upstream = config.upstream  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.models[0].name = "other"  # type: ignore[misc]
    for mapping in (config.by_name, config.engines, config.models[0].env,
                    load().models[0].env):
        with pytest.raises(TypeError):
            mapping["x"] = "y"  # type: ignore[index]
    assert isinstance(config.models, tuple) and isinstance(config.models[0].command, tuple)


@pytest.mark.parametrize(("concurrent", "models", "pool"), [(1, 1, 1), (50, 3, 150),
                                                            (100, 10, 1000)])
def test_pool_and_keepalive_are_every_server_at_full_concurrency(concurrent, models, pool):
    config = load({"gateway": {"max_concurrent": concurrent, "max_models_concurrent": models},
                   "models": [sim_model(f"m{i}") for i in range(models)]})
    assert config.upstream_pool_size == config.upstream_keepalive_size == pool
    assert effective(config)["derived"] == {"upstream_pool_size": pool,
                                            "upstream_keepalive_size": pool}


def test_pool_follows_variable_overrides():
    config = load({"models": [sim_model(f"m{i}") for i in range(5)]},
                  env={"GATEWAY_MAX_CONCURRENT": "7", "GATEWAY_MAX_MODELS_CONCURRENT": "4"})
    assert config.upstream_pool_size == config.upstream_keepalive_size == 28


@pytest.mark.parametrize(("gateway", "models", "pool"), [
    # A model's own max_concurrent counts, not the gateway's default (issue 16: 500 slots).
    ({}, [sim_model("big", max_concurrent=500)], 500),
    # Each replica has the model's slots.
    ({}, [sim_model("r", max_concurrent=20, max_replicas=3)], 60),
    # At most max_models_concurrent servers at once: the largest of them.
    ({"max_models_concurrent": 2},
     [sim_model("a", max_concurrent=5), sim_model("b", max_concurrent=30, max_replicas=2),
      sim_model("c", max_concurrent=10)], 60),
    # Fewer servers than the budget: only theirs.
    ({"max_models_concurrent": 10}, [sim_model("a", max_concurrent=5)], 5),
    # max_concurrent_total bounds them all.
    ({"max_concurrent_total": 70}, [sim_model("big", max_concurrent=500)], 70),
])
def test_pool_is_what_can_be_in_flight_at_once(gateway, models, pool):
    config = load({"gateway": gateway, "models": models})
    assert config.upstream_pool_size == config.upstream_keepalive_size == pool


def test_replica_keys_default_to_one_server_and_gpu_alternatives_are_placements():
    plain = load().models[0]
    assert (plain.max_replicas, plain.min_replicas, plain.scale_up_after,
            plain.affinity_slack, plain.placements) == (1, 0, 2.0, 1.5, ((None, ()),))
    model = load({"models": [sim_model("m", gpus=[[0], [1, 2]], max_replicas=2)]}).models[0]
    assert model.gpus == (0,)
    assert model.placements == ((None, (0,)), (None, (1, 2)))
    engines = {"a": {"url": "unix:///a.sock"}, "b": {"url": "unix:///b.sock"}}
    container = load({"engines": engines, "models": [
        {"name": "c", "launcher": "container", "image": "i", "engines": ["a", "b"],
         "gpus": [[0], [1]], "max_replicas": 3}]}).models[0]
    assert container.engine == "a"
    assert container.placements == (("a", (0,)), ("a", (1,)), ("b", (0,)), ("b", (1,)))


def test_routing_is_by_prefix_for_a_model_with_replicas_unless_told():
    plain, replicated, told = load({"models": [
        sim_model("a"), sim_model("b", max_replicas=2),
        sim_model("c", max_replicas=2, routing="least_loaded")]}).models
    assert (plain.routing, replicated.routing, told.routing) == (
        "least_loaded", "prefix", "least_loaded")
    assert (replicated.prefix_index_size, replicated.prefix_block_chars) == (50_000, 256)


@pytest.mark.parametrize(("doc", "key", "value", "allowed"), [
    ({"models": [sim_model("m", max_replicas=2, min_replicas=3)]},
     'models["m"].min_replicas', "3", "at most max_replicas (2)"),
    ({"models": [sim_model("m", max_replicas=4)]}, 'models["m"].max_replicas', "4",
     "at most gateway.max_models_concurrent (3)"),
    ({"models": [{**STATIC, "max_replicas": 2}]}, 'models["remote"].max_replicas', "2",
     "1 for a static model"),
    ({"models": [sim_model("a", max_replicas=2, min_replicas=2),
                 sim_model("b", max_replicas=2, min_replicas=2)]},
     'models["b"].min_replicas', "2", "fit in gateway.max_models_concurrent (3)"),
    # Two always-on replicas of 600 MiB on one 1000 MiB GPU cannot both run...
    ({"gateway": {"gpu_memory_mb": 1000},
      "models": [sim_model("m", gpus=[0], vram_mb=600, max_replicas=2, min_replicas=2)]},
     'models["m"].min_replicas', "2", "fits in gateway.gpu_memory_mb (1000) on GPU 0"),
    ({"models": [sim_model("m", gpus=[[0], []])]}, 'models["m"].gpus[1]', "[]",
     "a non-empty list"),
    ({"models": [sim_model("m", gpus=[[0], [64]])]}, 'models["m"].gpus', "[[0], [64]]",
     "GPU indexes from 0 to 63"),
    ({"models": [sim_model("m", engines=["a"])]}, 'models["m"].engines', "['a']",
     "only a container model"),
    ({"models": [sim_model("m", placements=[])]}, 'models["m"].placements', "[]",
     "unknown key"),
    ({"models": [sim_model("m", routing="round_robin")]}, 'models["m"].routing',
     "'round_robin'", "one of 'prefix', 'least_loaded'"),
    ({"models": [sim_model("m", prefix_index_size=0)]}, 'models["m"].prefix_index_size', "0",
     "an integer from 1 to 10000000"),
    ({"models": [sim_model("m", prefix_block_chars=8)]}, 'models["m"].prefix_block_chars', "8",
     "an integer from 16 to 1000000"),
])
def test_bad_replica_settings_are_refused(doc, key, value, allowed):
    with pytest.raises(ConfigError) as err:
        load(doc)
    assert str(err.value).startswith(f"{key} = {value} (from {FILE}): ")
    assert allowed in str(err.value)


def test_always_on_replicas_on_gpu_alternatives_fit_one_per_gpu():
    """... but on two GPUs they do: one each."""
    config = load({"gateway": {"gpu_memory_mb": 1000}, "models": [
        sim_model("m", gpus=[[0], [1]], vram_mb=600, max_replicas=2, min_replicas=2)]})
    assert config.models[0].min_replicas == 2


def test_effective_masks_secrets_and_keeps_the_rest():
    model = {**STATIC, "url": "https://user:pw@10.0.0.5:8000/v1",
             "env": {"HF_TOKEN": "hf_x", "AWS_SECRET_ACCESS_KEY": "aws_x",
                     "CUDA_VISIBLE_DEVICES": "0"},
             "args": ["--api-key", "sk_x", "--api-key=sk_y", "--max-num-batched-tokens", "8"]}
    shown = effective(load({"admin": {"token": "adm_x"}, "models": [model]}))
    text = json.dumps(shown)
    for secret in ("adm_x", "hf_x", "aws_x", "sk_x", "sk_y", ":pw@"):
        assert secret not in text
    assert shown["admin"]["token"] == "***"
    assert shown["models"][0]["url"] == "https://user:***@10.0.0.5:8000/v1"
    assert shown["models"][0]["env"] == {"HF_TOKEN": "***", "AWS_SECRET_ACCESS_KEY": "***",
                                         "CUDA_VISIBLE_DEVICES": "0"}
    assert shown["models"][0]["args"] == ["--api-key", "***", "--api-key=***",
                                          "--max-num-batched-tokens", "8"]


def test_effective_shows_no_token_when_none_is_set():
    assert effective(load())["admin"]["token"] is None


def test_aliases_resolve_to_their_model():
    config = load({"models": [sim_model("big", aliases=["large", "l"]), sim_model("small")]})
    assert config.by_name["large"] is config.by_name["l"] is config.by_name["big"]
    assert config.by_name["small"].name == "small"
    assert set(config.by_name) == {"big", "large", "l", "small"}


def test_served_name_defaults_to_the_name():
    config = load({"models": [sim_model("a"), sim_model("b", served_name="org/b-7b")]})
    assert [m.served_name for m in config.models] == ["a", "org/b-7b"]


# --- the file ------------------------------------------------------------------------------

def test_shipped_config_loads():
    config = load_config(str(ROOT / "config.toml"), environ={})
    assert [m.name for m in config.models] == ["sim-small", "sim-large"]
    assert config.by_name["small"].name == "sim-small"
    assert config.source == f"file {ROOT / 'config.toml'}"
    assert config.upstream_pool_size == 100  # two models of 50


def write(tmp_path: Path, text: str, name: str = "gw.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = '[[models]]\nname = "m"\nlauncher = "static"\nurl = "http://h:1"\n'


def test_file_is_chosen_by_option_then_variable_then_default(tmp_path, monkeypatch):
    option = write(tmp_path, GOOD + "[gateway]\ninstance = 'option'\n", "a.toml")
    variable = write(tmp_path, GOOD + "[gateway]\ninstance = 'variable'\n", "b.toml")
    write(tmp_path, GOOD + "[gateway]\ninstance = 'default'\n", "config.toml")
    monkeypatch.chdir(tmp_path)
    env = {"GATEWAY_CONFIG": str(variable)}
    assert load_config(str(option), environ=env).gateway.instance == "option"
    assert load_config(None, environ=env).gateway.instance == "variable"
    assert load_config(None, environ={}).gateway.instance == "default"


def test_bad_value_in_a_file_names_that_file(tmp_path):
    path = write(tmp_path, GOOD + "[gateway]\nmax_models_concurrent = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    assert str(info.value) == (f"gateway.max_models_concurrent = 0 (from file {path}): must be "
                               "an integer from 1 to 1000")


@pytest.mark.parametrize(("cli", "env", "why"), [
    ("missing.toml", {}, "named by --config"),
    (None, {"GATEWAY_CONFIG": "missing.toml"}, "named by GATEWAY_CONFIG"),
    (None, {}, "the default; name another with --config or GATEWAY_CONFIG"),
], ids=["option", "variable", "default"])
def test_missing_file_says_which_and_why(tmp_path, monkeypatch, cli, env, why):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(cli, environ=env)
    name = cli or env.get("GATEWAY_CONFIG", "config.toml")
    assert str(info.value) == (f"config file {name} ({why}) cannot be read: "
                               "No such file or directory")


def test_file_that_is_not_toml_is_refused(tmp_path):
    path = write(tmp_path, GOOD + "[gateway\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    message = str(info.value)
    assert message.startswith(f"config file {path} (named by --config) is not valid TOML: ")
    assert "line 5" in message and "\n" not in message


def test_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_bytes(b'[gateway]\ninstance = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    assert str(info.value) == (f"config file {path} (named by --config) is not UTF-8 text: "
                               "invalid continuation byte at byte 25")


@pytest.mark.parametrize("size", ["0", "8x", "-1g", "g", "1.5g"])
def test_a_bad_shm_size_is_refused(size: str) -> None:
    model = {"name": "m", "launcher": "container", "engine": "e", "image": "i", "shm_size": size}
    with pytest.raises(ConfigError, match=r'models\["m"\]\.shm_size'):
        config_from_mapping({"models": [model], "engines": {"e": {"url": "unix:///x.sock"}}},
                            environ={})


def test_shm_size_takes_docker_notation() -> None:
    assert parse_size("8g") == 8 * 1024 ** 3
    assert parse_size("512M") == 512 * 1024 ** 2
    assert parse_size("4096") == 4096


@pytest.mark.parametrize("instance", ["my gateway", "gw/1", "-gw", "é", "x" * 64])
def test_an_instance_that_cannot_name_a_container_is_refused(instance: str) -> None:
    assert_names(refusal({"gateway": {"instance": instance}}), "gateway.instance",
                 repr(instance), FILE, "letters, digits and _ . -")


def test_a_process_model_with_gpus_leaves_cuda_visible_devices_to_them() -> None:
    model = {**sim_model("m"), "gpus": [1], "env": {"CUDA_VISIBLE_DEVICES": "0"}}
    assert_names(refusal({"models": [model]}), 'models["m"].env',
                 "{'CUDA_VISIBLE_DEVICES': '0'}", FILE, "without CUDA_VISIBLE_DEVICES")


# --- telemetry ------------------------------------------------------------------------------

COLLECTOR = "http://collector:4318"


@pytest.mark.parametrize(("doc", "env", "traces"), [
    ({}, {}, None),
    ({"telemetry": {"endpoint": COLLECTOR}}, {}, "http/protobuf"),
    ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": COLLECTOR}, "http/protobuf"),
    ({}, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": COLLECTOR + "/v1/traces",
          "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "grpc"),
    ({"telemetry": {"endpoint": COLLECTOR, "protocol": "grpc"}},
     {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "grpc"),
    ({"telemetry": {"endpoint": COLLECTOR}}, {"OTEL_SDK_DISABLED": "true"}, None),
    ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": COLLECTOR, "OTEL_SDK_DISABLED": "TRUE"}, None),
], ids=["off", "table", "variable", "traces-variable-grpc", "table-wins", "disabled",
        "disabled-variable"])
def test_tracing_is_on_only_with_an_endpoint_and_its_protocol_is_the_tables_or_the_variables(
        doc, env, traces):
    config = load(doc, env=env)
    assert config.telemetry.traces == traces
    assert effective(config)["telemetry"]["traces"] == traces


@pytest.mark.parametrize(("doc", "env", "key", "value", "source", "allowed"), [
    ({"telemetry": {"endpoint": "collector:4317"}}, {}, "telemetry.endpoint",
     "'collector:4317'", FILE, "must be an http:// or https:// URL"),
    ({"telemetry": {"endpoint": COLLECTOR, "protocol": "http/json"}}, {}, "telemetry.protocol",
     "'http/json'", FILE, "must be one of 'http/protobuf', 'grpc'"),
    ({"telemetry": {"sample_ratio": 2}}, {}, "telemetry.sample_ratio", "2.0", FILE,
     "must be a number from 0.0 to 1.0"),
    ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": COLLECTOR, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
     "OTEL_EXPORTER_OTLP_PROTOCOL", "'http/json'",
     "environment variable OTEL_EXPORTER_OTLP_PROTOCOL", "must be one of 'http/protobuf'"),
    ({}, {"GATEWAY_TELEMETRY_SAMPLE_RATIO": "x"}, "telemetry.sample_ratio", "'x'",
     "environment variable GATEWAY_TELEMETRY_SAMPLE_RATIO", "must be a number"),
], ids=["endpoint", "protocol", "ratio", "variable-protocol", "gateway-variable"])
def test_a_bad_telemetry_setting_is_refused_in_one_line(doc, env, key, value, source, allowed):
    assert_names(refusal(doc, env=env), key, value, source, allowed)


def test_telemetry_headers_are_masked_even_when_refused():
    shown = effective(load({"telemetry": {"endpoint": COLLECTOR,
                                          "headers": {"authorization": "Bearer s3cret"}}}))
    assert shown["telemetry"]["headers"] == "***"
    message = refusal({"telemetry": {"headers": {"authorization": 5}}})
    assert_names(message, "telemetry.headers", "'***'", FILE, "must be a table of strings")


def test_tracing_without_the_packages_is_refused_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name.startswith("opentelemetry.exporter.otlp.proto.grpc")
                        else real(name, *a))
    message = refusal(env={"OTEL_EXPORTER_OTLP_ENDPOINT": COLLECTOR,
                           "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert message.startswith("OTEL_EXPORTER_OTLP_ENDPOINT (from environment variable "
                              "OTEL_EXPORTER_OTLP_ENDPOINT) turns tracing on, but "
                              "opentelemetry.exporter.otlp.proto.grpc.trace_exporter is not "
                              "installed: pip install 'vllm-gateway[otel]'"), message
    assert load({"telemetry": {"endpoint": COLLECTOR}}).telemetry.traces == "http/protobuf"
