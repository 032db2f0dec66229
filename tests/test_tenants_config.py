"""The ``[[tenants]]`` tables: each key's tenant, and every mistake refused at start-up with one
line that names the key, the value, where it came from and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kernel.config import Config, ConfigError, config_from_mapping, effective
from proxy.logs import config_block
from tests.support import sim_model

FILE = "file gw.toml"


def load(doc: dict[str, Any]) -> Config:
    return config_from_mapping({"models": [sim_model("m", aliases=["mm"]), sim_model("n")],
                                **doc}, source=FILE, environ={})


@pytest.mark.parametrize(("tenants", "message"), [
    ([{"name": "a", "models": ["nope"]}], 'tenants["a"].models[0] = \'nope\' (from file '
     "gw.toml): must be the name or an alias of a configured model: m, mm, n"),
    ([{"name": "a", "keys": ["sk-1"]}, {"name": "b", "keys": ["sk-1"]}],
     'tenants["b"].keys (from file gw.toml): a key of tenant \'a\' is listed again; a key '
     "belongs to one tenant"),
    ([{"name": "a", "rpm_limit": 0}], 'tenants["a"].rpm_limit = 0 (from file gw.toml): must '
     "be an integer from 1 to 100000000"),
    ([{"name": "a", "tpm_limit": 1.5}], 'tenants["a"].tpm_limit = 1.5 (from file gw.toml): '
     "must be an integer"),
    ([{"keys": ["sk-1"]}], "tenants[0].name is missing (from file gw.toml): it is required"),
    ([{"name": "a"}, {"name": "a"}], "tenants[1].name = 'a' (from file gw.toml): must be "
     "unique among the tenants"),
    ([{"name": "a", "rpm_limt": 5}], 'tenants["a"].rpm_limt = 5 (from file gw.toml): unknown '
     "key; did you mean rpm_limit?"),
    ([{"name": "a", "keys": ["not a key"]}], 'tenants["a"].keys[0] = \'***\' (from file '
     "gw.toml): must be letters, digits"),
    ({"name": "a"}, "tenants = {'name': 'a'} (from file gw.toml): must be an array of "
     "[[tenants]] tables"),
])
def test_a_mistake_is_refused_with_one_line(tenants: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({"tenants": tenants})
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_an_empty_keys_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "keys"
    empty.write_text("# nobody yet\n\n")
    with pytest.raises(ConfigError) as info:
        load({"tenants": [{"name": "a", "keys_file": str(empty)}]})
    assert str(info.value).startswith(f'tenants["a"].keys_file = \'{empty}\' (from file '
                                      "gw.toml): ")


def test_each_key_has_its_tenant_and_the_unlisted_ones_are_defaults(tmp_path: Path) -> None:
    plain = tmp_path / "keys"
    plain.write_text("sk-file-1\n# a comment\n\nsk-file-2\n")
    config = load({"auth": {"api_keys": ["sk-plain"]},
                   "tenants": [{"name": "a", "keys": ["sk-a"], "keys_file": str(plain),
                                "models": ["mm"], "rpm_limit": 5}]})
    assert {k: t.name for k, t in config.tenant_of_key.items()} == {
        "sk-a": "a", "sk-file-1": "a", "sk-file-2": "a", "sk-plain": "default"}
    assert config.client_keys == {"sk-a", "sk-file-1", "sk-file-2", "sk-plain"}
    a = config.tenants[0]
    assert a.models == ("m",)  # the alias, resolved
    assert a.may_use("m") and not a.may_use("n")
    assert config.default_tenant.may_use("n") and config.default_tenant.rpm_limit is None
    assert config.has_tenants


def test_keys_are_masked_where_the_configuration_is_shown(tmp_path: Path) -> None:
    config = load({"tenants": [{"name": "a", "keys": ["sk-secret-1"]}]})
    shown = effective(config)
    assert [t["name"] for t in shown["tenants"]] == ["a", "default"]
    block = config_block(shown)
    assert "[[tenants]] name=a keys=***" in block
    assert "sk-secret" not in block + repr(shown)


def test_without_keys_or_tenants_there_is_no_tenancy() -> None:
    assert not load({}).has_tenants
    assert not load({"tenants": [{"name": "default"}]}).has_tenants
    assert load({"tenants": [{"name": "default", "tpm_limit": 100}]}).has_tenants
