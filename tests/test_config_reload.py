"""``plan_reload``: what a new configuration changes, model by model and key by key, and what
cannot change live; ``config_hash``: equal configurations, equal hashes."""

from __future__ import annotations

from typing import Any

import pytest

from kernel.config import config_hash, plan_reload
from tests.support import make_config, sim_model, static_model

URL = "http://127.0.0.1:9"


def config(*models: dict[str, Any], **sections: dict[str, Any]) -> Any:
    return make_config(list(models) or [static_model("s", URL)], **sections)


@pytest.mark.parametrize(("change", "restarted", "changed"), [
    ({"max_concurrent": 4, "idle_timeout": 9.0}, {}, {"m": ("idle_timeout", "max_concurrent")}),
    ({"aliases": ["n"]}, {}, {"m": ("aliases",)}),
    ({"env": {"A": "1"}}, {"m": ("env",)}, {}),
    ({"gpus": [1]}, {"m": ("gpus",)}, {}),
    ({"max_replicas": 2, "max_concurrent": 4},
     {"m": ("max_concurrent", "max_replicas", "routing")}, {}),  # "prefix" with replicas
])
def test_a_model_is_restarted_when_its_server_changes_else_changed_in_place(
        change: dict[str, Any], restarted: dict[str, Any], changed: dict[str, Any]) -> None:
    plan = plan_reload(config(sim_model("m")), config(sim_model("m", **change)))
    assert (dict(plan.restarted), {m: tuple(sorted(f)) for m, f in plan.changed.items()}) == (
        restarted, changed)
    assert not plan.refused


def test_added_removed_and_a_default_limit_that_reaches_a_model() -> None:
    old = config(sim_model("a"), sim_model("b"), sim_model("c", max_concurrent=2))
    new = config(sim_model("a"), sim_model("c", max_concurrent=2), sim_model("d"),
                 gateway={"max_concurrent": 7, "max_body_bytes": 1000})
    plan = plan_reload(old, new)
    assert (plan.added, plan.removed) == (("d",), ("b",))
    assert dict(plan.changed) == {"a": ("max_concurrent",)}  # c keeps its own
    assert plan.keys == ("gateway.max_concurrent", "gateway.max_body_bytes")
    assert not plan.refused


def test_keys_that_cannot_change_live_are_each_named() -> None:
    new = config(gateway={"bind": "127.0.0.1:9999", "instance": "x"},
                 upstream={"timeout": 5.0}, admin={"token": "new"})
    plan = plan_reload(config(), new)
    assert plan.refused == ("gateway.bind", "gateway.instance", "upstream.timeout")
    assert "admin.token" in plan.keys


def test_the_hash_follows_the_configuration_not_its_source() -> None:
    assert config_hash(config()) == config_hash(config())
    assert config_hash(config()) != config_hash(config(admin={"token": "t"}))
    assert plan_reload(config(), config()).empty


def test_tenants_change_live_and_in_the_hash() -> None:
    old = config(tenants=[{"name": "chat", "keys": ["k1"]}])
    new = config(tenants=[{"name": "chat", "keys": ["k1", "k2"], "rpm_limit": 5}])
    plan = plan_reload(old, new)
    assert (plan.keys, plan.refused) == (("tenants",), ())
    assert config_hash(old) != config_hash(new)


def test_a_reload_cannot_switch_the_queues_between_first_come_and_fair() -> None:
    one = config(tenants=[{"name": "chat", "keys": ["k1"]}])  # with default: fair
    assert one.fair_queues and not config().fair_queues
    assert plan_reload(config(), one).refused
    assert plan_reload(one, config()).refused
    more = config(tenants=[{"name": "chat", "keys": ["k1"], "priority": 3}])
    assert not plan_reload(one, more).refused
    # Nor in a [cluster], whose queues in Redis are one or the other too.
    cluster = {"redis_url": "redis://127.0.0.1:1"}
    fair = config(cluster=cluster, tenants=[{"name": "chat", "keys": ["k1"]}])
    assert plan_reload(config(cluster=cluster), fair).refused[0].startswith(
        "tenants (from one to several")


def test_in_a_cluster_what_the_members_share_is_not_reloaded_by_one_alone() -> None:
    cluster = {"redis_url": "redis://127.0.0.1:1"}
    old = config(cluster=cluster)
    plan = plan_reload(old, config(cluster=cluster, gateway={"max_concurrent": 9}))
    assert plan.refused == ("gateway.max_concurrent (the configuration a [cluster]'s members "
                            "share: restart every member with the new one, or give it a new "
                            "cluster.key_prefix)",)
    assert not plan_reload(old, config(cluster=cluster, admin={"token": "t"})).refused
    # A tenant's keys and rate limits are the process's own; its place in the queues is shared.
    team = {"name": "team", "keys": ["k1"]}
    old = config(cluster=cluster, tenants=[team])
    assert not plan_reload(old, config(cluster=cluster, tenants=[
        {**team, "keys": ["k2"], "rpm_limit": 5}])).refused
    assert plan_reload(old, config(cluster=cluster, tenants=[{**team, "weight": 2}])).refused == (
        'tenants["team"].weight (the configuration a [cluster]\'s members share: restart every '
        "member with the new one, or give it a new cluster.key_prefix)",)
