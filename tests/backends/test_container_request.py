"""The create request the container launcher sends, for Docker's and Podman's GPU shapes, and
the engine's reconciling of the containers it watches."""

from __future__ import annotations

import socket

import anyio
import pytest
from aiodocker.containers import DockerContainer

from backends.container import ContainerEngines, Engine, container_name, create_request
from backends.launcher import LaunchError
from backends.pool import BackendPool
from kernel.config import config_from_mapping
from tests.support import make_config

ENGINES = {"local": {"url": "unix:///run/podman/podman.sock"}}


def model(**settings: object) -> object:
    table = {"name": "llama-8b", "launcher": "container", "engine": "local",
             "image": "docker.io/vllm/vllm-openai:v0.11.0",
             "args": ["--model", "meta-llama/Llama-3.1-8B-Instruct"],
             "container_port": 8000, "volumes": ["/srv/hf:/root/.cache/huggingface"],
             "env": {"HF_HUB_OFFLINE": "1"}, "shm_size": "8g", **settings}
    return make_config([table], engines=ENGINES).models[0]


def test_docker_gets_nvidia_device_requests() -> None:
    request = create_request(model(gpus=[0, 1]), kind="docker", version=(28, 2),
                             instance="gw1", publish_ip="127.0.0.1")
    assert request["HostConfig"]["DeviceRequests"] == [
        {"Driver": "nvidia", "DeviceIDs": ["0", "1"], "Capabilities": [["gpu"]]}]


def test_podman_gets_cdi_device_requests() -> None:
    request = create_request(model(gpus=[1]), kind="podman", version=(5, 4, 0),
                             instance="gw1", publish_ip="127.0.0.1")
    assert request["HostConfig"]["DeviceRequests"] == [
        {"Driver": "cdi", "DeviceIDs": ["nvidia.com/gpu=1"]}]


def test_an_old_podman_refuses_gpu_models_with_the_reason() -> None:
    with pytest.raises(LaunchError, match=r"Podman 4\.3\.1 ignores GPU requests"):
        create_request(model(gpus=[0]), kind="podman", version=(4, 3, 1), instance="gw1",
                       publish_ip="127.0.0.1")


def test_the_rest_of_the_request() -> None:
    request = create_request(model(), kind="podman", version=(4, 3, 1), instance="gw1",
                             publish_ip="10.0.0.5")
    assert request["Image"] == "docker.io/vllm/vllm-openai:v0.11.0"
    assert request["Cmd"] == ["--model", "meta-llama/Llama-3.1-8B-Instruct"]
    assert request["Env"] == ["HF_HUB_OFFLINE=1"]
    assert request["Labels"] == {"vllm-gateway.instance": "gw1", "vllm-gateway.model": "llama-8b"}
    assert request["ExposedPorts"] == {"8000/tcp": {}}
    host = request["HostConfig"]
    assert host["PortBindings"] == {"8000/tcp": [{"HostIp": "10.0.0.5", "HostPort": ""}]}
    assert host["Binds"] == ["/srv/hf:/root/.cache/huggingface"]
    assert host["ShmSize"] == 8 * 1024 ** 3
    assert "DeviceRequests" not in host


def test_a_model_with_adapters_gets_vllms_lora_flags_and_variable() -> None:
    request = create_request(
        model(adapters=[{"name": "sql", "path": "/adapters/sql"}], max_loras=3,
              max_lora_rank=64), kind="podman", version=(5, 4), instance="gw1",
        publish_ip="127.0.0.1")
    assert request["Cmd"] == ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--enable-lora",
                              "--max-loras", "3", "--max-lora-rank", "64"]
    assert request["Env"] == ["HF_HUB_OFFLINE=1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"]


def test_a_configured_host_port_is_used() -> None:
    request = create_request(model(host_port=18000), kind="docker", version=(28,),
                             instance="gw1", publish_ip="127.0.0.1")
    assert request["HostConfig"]["PortBindings"]["8000/tcp"][0]["HostPort"] == "18000"


def test_container_models_are_refused_under_trio() -> None:
    config = make_config([{"name": "m", "launcher": "container", "engine": "local",
                           "image": "x"}], engines=ENGINES)

    async def enter() -> None:
        async with ContainerEngines(config).running():
            pass

    with pytest.raises(RuntimeError, match="asyncio"):
        anyio.run(enter, backend="trio")


def test_models_whose_names_differ_get_containers_whose_names_differ() -> None:
    names = {container_name("gw", m) for m in ("org/m", "org-m", "org_m", "org:m", "Org-m")}
    assert len(names) == 5
    assert container_name("gw", "org-m") == "vllm-gateway-gw-org-m"
    assert container_name("gw", "org/m").startswith("vllm-gateway-gw-org-m-")


def test_the_default_instance_is_the_hosts_and_the_configs() -> None:
    def derived(bind: str, source: str = "file a.toml") -> str:
        config = config_from_mapping({"models": [{"name": "c", "launcher": "container",
                                                  "engine": "local", "image": "i"}],
                                      "engines": ENGINES, "gateway": {"bind": bind}},
                                     source=source)
        return ContainerEngines(config).instance

    first = derived("127.0.0.1:8080")
    assert first == derived("127.0.0.1:8080")  # a restarted gateway finds its containers
    assert first.startswith(socket.gethostname()[:8])
    assert first != derived("127.0.0.1:8081")  # a second gateway on this host does not
    assert first != derived("127.0.0.1:8080", source="file b.toml")
    configured = make_config([{"name": "c", "launcher": "container", "engine": "local",
                               "image": "i"}], engines=ENGINES, gateway={"instance": "gw1"})
    assert ContainerEngines(configured).instance == "gw1"


class _Listing:
    """Stands in for an engine's listing of containers: only ``a``, and while it lists, the
    gateway starts to watch ``c``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.meanwhile: anyio.Event | None = None

    async def __call__(self) -> list[DockerContainer]:
        await anyio.sleep(0.01)
        self.meanwhile = self.engine.watch("c")
        return [DockerContainer(None, Id="a", State="running")]  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_container_watched_while_the_engine_lists_is_not_declared_dead(
        anyio_backend: str) -> None:
    table = {"name": "m", "launcher": "container", "engine": "local", "image": "sim"}
    engine = Engine(make_config([table], engines=ENGINES).engines["local"], "gw1")
    running, gone = engine.watch("a"), engine.watch("b")
    listing = engine._labelled = _Listing(engine)  # type: ignore[method-assign]
    await engine.reconcile()
    assert not running.is_set() and gone.is_set()
    assert listing.meanwhile is not None and not listing.meanwhile.is_set()


def test_replicas_take_the_engines_and_gpu_alternatives_in_turn() -> None:
    engines = {"a": {"url": "unix:///a.sock"}, "b": {"url": "unix:///b.sock"}}
    table = {"name": "m", "launcher": "container", "image": "img", "engines": ["a", "b"],
             "gpus": [[0], [1]], "max_replicas": 3}
    config = make_config([table], engines=engines, gateway={"instance": "gw"})
    containers = ContainerEngines(config)
    pool = BackendPool(config, launchers=containers.launcher)
    placed = [(r.replica, r.settings.engine, r.settings.gpus) for r in pool.replicas["m"]]
    assert placed == [(0, "a", (0,)), (1, "a", (1,)), (2, "b", (0,))]
    launchers = [r.launcher for r in pool.replicas["m"]]
    assert [launcher.engine.settings.name for launcher in launchers] == ["a", "a", "b"]
    # A replica after the first has a container, and a label, of its own.
    second = pool.replicas["m"][1].settings
    assert container_name("gw", "m", second.replica) == "vllm-gateway-gw-m-r1"
    request = create_request(second, kind="podman", version=(5, 4, 0), instance="gw",
                             publish_ip="127.0.0.1")
    assert request["Labels"] == {"vllm-gateway.instance": "gw", "vllm-gateway.model": "m",
                                 "vllm-gateway.replica": "1"}
    assert request["HostConfig"]["DeviceRequests"] == [
        {"Driver": "cdi", "DeviceIDs": ["nvidia.com/gpu=1"]}]


def test_a_clusters_containers_are_named_and_labelled_by_its_key_prefix() -> None:
    """Every member of a cluster (any host, any address) labels the pool's containers alike,
    so that a new owner finds the last one's; another cluster on the engine labels its own."""
    table = {"name": "m", "launcher": "container", "engine": "local", "image": "img"}

    def member(bind: str, **cluster: str) -> ContainerEngines:
        return ContainerEngines(make_config([table], engines=ENGINES, gateway={"bind": bind},
                                            cluster={"redis_url": "redis://r", **cluster}))

    one, other = member("127.0.0.1:8080"), member("10.0.0.2:9000")
    assert one.instance == other.instance and one.instance.startswith("cluster-")
    assert member("127.0.0.1:8080", key_prefix="another").instance != one.instance
    request = create_request(make_config([table], engines=ENGINES).models[0], kind="podman",
                             version=(5, 4, 0), instance=one.instance, publish_ip="127.0.0.1",
                             cluster=one.cluster)
    assert request["Labels"] == {"vllm-gateway.instance": one.instance,
                                 "vllm-gateway.model": "m",
                                 "vllm-gateway.cluster": "vllm-gateway:default"}
