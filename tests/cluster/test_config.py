"""The ``[cluster]`` table: off without it (and then no Redis client is imported), the URL from
the file or ``GATEWAY_CLUSTER_REDIS_URL`` with its password masked, the defaults made from the
lease and the instance, and the one-line refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kernel.config import ConfigError, config_from_mapping, effective, shared
from tests.support import ROOT, static_model

MODELS = [static_model("m", "http://127.0.0.1:9")]
ENGINES = {"local": {"url": "unix:///run/podman/podman.sock"},
           "removing": {"url": "unix:///run/podman/podman.sock", "on_start": "remove"}}


def test_without_cluster_nothing_is_shared_and_no_redis_client_is_imported() -> None:
    assert not config_from_mapping({"models": MODELS}).cluster.enabled
    code = ("import sys; from proxy.app import Gateway; from tests.support import make_config, "
            "static_model; Gateway(make_config([static_model('m', 'http://127.0.0.1:9')])); "
            "print('coredis' in sys.modules, 'cluster.accounting' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False"]


def test_the_url_from_the_environment_with_its_password_masked() -> None:
    cfg = config_from_mapping({"models": MODELS, "gateway": {"instance": "edge"}},
                              environ={"GATEWAY_CLUSTER_REDIS_URL": "rediss://u:pw@redis:6380/1"})
    cluster = cfg.cluster
    assert cluster.enabled and cluster.redis_url == "rediss://u:pw@redis:6380/1"
    assert (cluster.key_prefix, cluster.lease_s, cluster.heartbeat) == (
        "vllm-gateway:edge", 10.0, pytest.approx(10 / 3))
    assert effective(cfg)["cluster"]["redis_url"] == "rediss://u:***@redis:6380/1"


@pytest.mark.parametrize(("table", "models", "message"), [
    ({"lease_s": 5}, MODELS, "cluster.lease_s (from test): [cluster] needs cluster.redis_url "
     "(or GATEWAY_CLUSTER_REDIS_URL)"),
    ({"redis_url": "http://u:pw@redis"}, MODELS,
     "cluster.redis_url (from test): must be a redis://, rediss:// or unix:// URL"),
    ({"redis_url": "unix:///run/redis.sock", "lease_s": 3, "heartbeat_s": 3}, MODELS,
     "cluster.heartbeat_s = 3.0 (from test): must be less than cluster.lease_s (3)"),
    ({"redis_url": "redis://redis"}, [{"name": "c", "launcher": "container", "image": "x",
                                       "engine": "removing"}],
     "engines.removing.on_start = 'remove' (from test): must be 'adopt' in a [cluster]: a new "
     "pool owner adopts the containers the last one left running"),
    ({"redis_url": "redis://redis"}, [{"name": "s", "launcher": "static", "url": "http://s",
                                       "adapters": [{"name": "a", "path": "/a"}]}],
     'models["s"].adapters (from test): a [cluster] gateway does not load LoRA adapters yet '
     "(each process would count a server's adapters on its own, and max_loras would not hold); "
     "leave them out with cluster.redis_url"),
])
def test_refusals_name_the_key(table: dict, models: list, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config_from_mapping({"models": models, "cluster": table, "engines": ENGINES},
                            source="test")
    assert str(refused.value) == message
    assert "pw" not in str(refused.value)


@pytest.mark.parametrize(("key", "value", "shown"), [
    ("priority", 2, "2"), ("weight", 3, "3.0"), ("max_concurrent", 4, "4")])
def test_a_tenants_place_in_the_queues_is_what_the_members_share(
        key: str, value: int, shown: str) -> None:
    """A tenant's priority, weight and bound order the queues in Redis: every member must run
    the same (``shared``: a member with another is refused as it joins); its keys and rate
    limits are its process's own."""
    tenants = [{"name": "team", "keys": ["sk-team-000000000001"], key: value}]
    cfg = config_from_mapping({"models": MODELS, "cluster": {"redis_url": "redis://redis"},
                               "tenants": tenants}, source="test")
    assert cfg.fair_queues and shared(cfg)[f'tenants["team"].{key}'] == shown
    tenants[0].update(keys=["sk-team-000000000002"], rpm_limit=5)
    other = config_from_mapping({"models": MODELS, "cluster": {"redis_url": "redis://redis"},
                                 "tenants": tenants}, source="test")
    assert shared(other) == shared(cfg)
