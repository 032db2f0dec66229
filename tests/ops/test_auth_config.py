"""The configuration of client API keys and the admin token: read once, validated, never shown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import structlog

from kernel.config import ConfigError, config_from_mapping, effective
from proxy import cli
from tests.support import static_model

MODELS = [static_model("m", "http://127.0.0.1:9")]


def load(environ: dict[str, str] | None = None, **sections: Any) -> Any:
    return config_from_mapping({"models": MODELS, **sections}, source="file gw.toml",
                               environ=environ or {})


def refusal(environ: dict[str, str] | None = None, **sections: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load(environ, **sections)
    return str(caught.value)


def test_keys_come_from_the_list_and_the_file_and_are_masked(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# comment\n\nsk-file-1\n  sk-file-2\n")
    config = load(auth={"api_keys": ["sk-list"], "api_keys_file": str(keys)})
    assert config.client_keys == {"sk-list", "sk-file-1", "sk-file-2"}
    shown = json.dumps(effective(config))
    assert "sk-" not in shown
    assert effective(config)["auth"] == {"api_keys": "***", "api_keys_file": str(keys)}
    assert effective(load())["auth"] == {"api_keys": [], "api_keys_file": None}
    assert load().client_keys == frozenset()


def test_keys_and_their_file_can_come_from_the_environment(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-file\n")
    config = load({"GATEWAY_AUTH_API_KEYS": "sk-a,sk-b", "GATEWAY_AUTH_API_KEYS_FILE": str(keys)})
    assert config.client_keys == {"sk-a", "sk-b", "sk-file"}


def test_an_unreadable_empty_or_malformed_keys_file_stops_the_start(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # A short path (not the test's own, under an xdist worker's directory): a value longer
    # than an error shows (SHOWN_CHARS) is cut short.
    tmp_path = tmp_path_factory.mktemp("keys")
    missing = tmp_path / "missing"
    assert refusal(auth={"api_keys_file": str(missing)}) == (
        f"auth.api_keys_file = '{missing}' (from file gw.toml): cannot be read: "
        "No such file or directory")
    empty = tmp_path / "empty"
    empty.write_text("# nobody yet\n\n")
    assert refusal(auth={"api_keys_file": str(empty)}).endswith(
        "holds no API key; write one key per line")
    bad = tmp_path / "bad"
    bad.write_text("sk-good\nsk-bad key-secret\n")
    message = refusal(auth={"api_keys_file": str(bad)})
    assert message.startswith(f"auth.api_keys_file = '{bad}' (from file gw.toml): line 2 is "
                              "not an API key: must be letters, digits and")
    assert "secret" not in message


@pytest.mark.parametrize(("sections", "environ", "key"), [
    ({"auth": {"api_keys": ["good", "bad secret"]}}, {}, "auth.api_keys[1]"),
    ({"auth": {"api_keys": "sk-secret"}}, {}, "auth.api_keys"),
    ({"admin": {"token": "bad secret"}}, {}, "admin.token"),
    ({}, {"GATEWAY_ADMIN_TOKEN": "bad\tsecret"}, "admin.token"),
])
def test_a_malformed_key_or_token_is_refused_without_showing_it(
        sections: dict[str, Any], environ: dict[str, str], key: str) -> None:
    message = refusal(environ, **sections)
    assert message.startswith(f"{key} = '***' (from ")
    assert "secret" not in message


def test_a_misspelt_keys_variable_does_not_show_its_value() -> None:
    message = refusal({"GATEWAY_AUTH_APIKEYS": "sk-secret"})
    assert "sk-secret" not in message
    assert "did you mean GATEWAY_AUTH_API_KEYS?" in message


@pytest.mark.parametrize(("bind", "keys", "warned"), [
    ("0.0.0.0:8080", (), True),
    ("[::]:8080", (), True),
    ("gpu1.example.com:8080", (), True),
    ("0.0.0.0:8080", ("sk-1",), False),
    ("127.0.0.1:8080", (), False),
    ("127.0.0.2:8080", (), False),
    ("[::1]:8080", (), False),
    ("localhost:8080", (), False),
])
def test_serving_beyond_loopback_without_keys_warns_at_start_up(
        bind: str, keys: tuple[str, ...], warned: bool) -> None:
    config = load(gateway={"bind": bind}, auth={"api_keys": list(keys)})
    with structlog.testing.capture_logs() as logs:
        cli.log_start_up(config)
    warnings = [line for line in logs if line["log_level"] == "warning"]
    assert len(warnings) == warned
    if warned:
        assert warnings[0]["bind"] == bind
        assert "CAN USE EVERY MODEL" in warnings[0]["event"]
