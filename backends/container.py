"""Container launcher: a model's server in a container, through the Docker-compatible API of
Docker or Podman (aiodocker, so asyncio only).

Every container carries labels naming the gateway instance and the model, so a restarted
gateway finds what it left: it adopts a running one (no cold start) or removes it, by the
engine's ``on_start`` policy, and removes any that stopped. In a ``[cluster]`` the instance is
made from the key prefix (the same in every member; the prefix is a label too), and the pool's
owner does that at the start of each of its terms (``adopt``) rather than at start-up: a new
owner adopts the containers the last one left running. A container outlives the owner that
started it: one that steps down forgets its containers without stopping them (``release``),
and one that stops while other members run hands them over (``begin_shutdown``).

Deaths are seen from the engine's event stream at once, not at the next request. The GPU
request takes the shape the engine understands: Docker wants ``DeviceRequests`` with the nvidia
driver; Podman honours CDI device requests from 5.4 on and ignores GPU requests before that
(containers/podman#22645), so a GPU model on an older Podman is refused with that reason rather
than started without its GPUs. A model with LoRA ``adapters`` gets vLLM's flags for them after
its ``args`` (``--enable-lora --max-loras N --max-lora-rank R``) and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``.

Every API call is bounded by the engine's ``api_timeout`` (a stop by ``stop_timeout`` on top),
and its failure is the model's ``LaunchError``. The event stream is followed again, with a
growing delay, after the engine goes away or restarts; once it is back, the containers watched
are looked up, so one that died meanwhile is noticed and one that still runs is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiodocker
import aiohttp
import anyio
import sniffio
import structlog
from anyio.abc import TaskGroup

from kernel.config import Config, EngineSettings, ModelSettings, parse_size, placement

from .launcher import LaunchError, Supervisor, lora_env, lora_flags

log = structlog.get_logger("gateway.container")

LABEL_INSTANCE = "vllm-gateway.instance"
LABEL_MODEL = "vllm-gateway.model"
# Which replica of the model (absent on the first: a container of an earlier gateway is one).
LABEL_REPLICA = "vllm-gateway.replica"
# The [cluster] key prefix, on the containers of a cluster's pool.
LABEL_CLUSTER = "vllm-gateway.cluster"
LOG_TAIL = 40
PODMAN_CDI_SINCE = (5, 4)
RECONNECT_DELAY = 1.0
RECONNECT_DELAY_MAX = 30.0
# What the engine lists a container as once it no longer runs (and will not by itself).
ENDED = frozenset({"exited", "dead", "stopped"})
T = TypeVar("T")


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def gpu_request(kind: str, version: tuple[int, ...], gpus: tuple[int, ...]) -> dict[str, Any]:
    """The ``DeviceRequests`` entry that gives a container these GPUs on this engine."""
    if kind == "docker":
        return {"Driver": "nvidia", "DeviceIDs": [str(g) for g in gpus],
                "Capabilities": [["gpu"]]}
    if version < PODMAN_CDI_SINCE:
        raise LaunchError(
            f"Podman {'.'.join(map(str, version))} ignores GPU requests made through its "
            "Docker-compatible API (containers/podman#22645); GPU models need Podman 5.4 or "
            "newer, or Docker")
    return {"Driver": "cdi", "DeviceIDs": [f"nvidia.com/gpu={g}" for g in gpus]}


def create_request(model: ModelSettings, *, kind: str, version: tuple[int, ...],
                   instance: str, publish_ip: str, cluster: str | None = None) -> dict[str, Any]:
    """The body of ``POST /containers/create`` for a model."""
    assert model.image is not None
    port = f"{model.container_port}/tcp"
    host_port = str(model.host_port) if model.host_port else ""
    host_config: dict[str, Any] = {
        "PortBindings": {port: [{"HostIp": publish_ip, "HostPort": host_port}]},
        "Binds": list(model.volumes),
    }
    if model.shm_size:
        host_config["ShmSize"] = parse_size(model.shm_size)
    if model.gpus:
        host_config["DeviceRequests"] = [gpu_request(kind, version, model.gpus)]
    return {
        "Image": model.image,
        "Cmd": [*model.args, *lora_flags(model)],
        "Env": [f"{k}={v}" for k, v in {**model.env, **lora_env(model)}.items()],
        "Labels": {LABEL_INSTANCE: instance, LABEL_MODEL: model.name,
                   **({LABEL_REPLICA: str(model.replica)} if model.replica else {}),
                   **({LABEL_CLUSTER: cluster} if cluster is not None else {})},
        "ExposedPorts": {port: {}},
        "HostConfig": host_config,
    }


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def container_name(instance: str, model: str, replica: int = 0) -> str:
    """The model's name where a container name allows it; a model name that had to be changed
    gets a digest of itself, so that ``org/m`` and ``org-m`` are two containers. A replica
    after the first has its number after it (``-r1``)."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "_.-") else "-" for c in model)
    if safe != model:
        safe += "-" + _digest(model)
    return f"vllm-gateway-{instance}-{safe}" + (f"-r{replica}" if replica else "")


def instance_name(config: Config) -> str:
    """``gateway.instance``, or one made from the host and the configuration (its source and
    address), so that two gateways on one engine never take each other's containers, and a
    restarted one finds its own. In a ``[cluster]``: one made from the key prefix, the same in
    every member (whose hosts and addresses differ), and another in another cluster."""
    if config.cluster.enabled:
        assert config.cluster.key_prefix is not None
        return f"cluster-{_digest(config.cluster.key_prefix)}"
    if config.gateway.instance is not None:
        return config.gateway.instance
    host = "".join(c if c.isascii() and (c.isalnum() or c in "_.-") else "-"
                   for c in socket.gethostname()).strip("-._") or "host"
    instance = f"{host}-{_digest(f'{config.source} {config.gateway.bind}')}"
    log.info("gateway instance derived from the host and the configuration; set "
             "gateway.instance to choose it", instance=instance)
    return instance


def _field(container: aiodocker.containers.DockerContainer, key: str) -> Any:
    """A field of the engine's listing of a container, or None where it has none."""
    return container[key] if key in container else None


class Engine:
    """One engine's API, shared by the models that name it, and its event stream."""

    def __init__(self, settings: EngineSettings, instance: str,
                 cluster: str | None = None) -> None:
        self.settings = settings
        self.instance = instance
        self.cluster = cluster
        self.kind = "docker"
        self.version: tuple[int, ...] = ()
        self.docker: aiodocker.Docker | None = None
        self.shutting_down = False
        # Why the containers are left running when the gateway stops, if they are.
        self.leave_running: str | None = None
        # The ids of the running containers an earlier run left, by model and replica.
        self.adoptable: dict[tuple[str, int], str] = {}
        self._deaths: dict[str, anyio.Event] = {}
        self._exit_codes: dict[str, str] = {}

    @property
    def api(self) -> aiodocker.Docker:
        assert self.docker is not None, "the engine is not connected"
        return self.docker

    @contextlib.contextmanager
    def bounded(self, what: str, limit: float) -> Iterator[None]:
        try:
            with anyio.fail_after(limit):
                yield
        except TimeoutError:
            raise LaunchError(f"engine {self.settings.name!r} did not answer ({what}) within "
                              f"{limit:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise LaunchError(f"engine {self.settings.name!r} failed ({what}): "
                              f"{type(exc).__name__}") from None
        except aiodocker.DockerError as exc:
            if exc.status != 900:  # the caller's to judge (404, 409, ...)
                raise
            raise LaunchError(f"engine {self.settings.name!r} cannot be reached ({what})") \
                from None

    async def call(self, what: str, request: Awaitable[T], *, extra: float = 0.0) -> T:
        """An API call, bounded by ``api_timeout`` (plus ``extra``); a timeout or a lost
        connection as a LaunchError that names the engine (never its address)."""
        with self.bounded(what, self.settings.api_timeout + extra):
            return await request

    def label_filter(self) -> dict[str, list[str]]:
        return {"label": [f"{LABEL_INSTANCE}={self.instance}"]}

    async def connect(self) -> None:
        self.docker = aiodocker.Docker(url=self.settings.url)
        try:
            info = await self.call("version", self.api.version())
        except (aiodocker.DockerError, LaunchError) as exc:
            await self.close()
            raise RuntimeError(f"engine {self.settings.name!r} at {self.settings.url} does not "
                               f"answer: {exc}") from None
        names = [c.get("Name", "") for c in info.get("Components") or []]
        podman = next((c for c in info.get("Components") or [] if c.get("Name") ==
                       "Podman Engine"), None)
        self.kind = "podman" if podman else "docker"
        self.version = _version_tuple((podman or info).get("Version", ""))
        log.info("engine connected", engine=self.settings.name, kind=self.kind,
                 version=".".join(map(str, self.version)), components=names)

    async def leave(self) -> None:
        """At the gateway's stop, after the pool's: the containers found to adopt that no run
        adopted yet go as the others went, unless they are left running."""
        if not self.shutting_down or self.leave_running is not None:
            return
        for container_id in self.adoptable.values():
            with contextlib.suppress(LaunchError):
                await self.remove(container_id)
                log.info("container removed", container=container_id[:12],
                         why="found to adopt, the gateway stopped before it adopted it")
        self.adoptable.clear()

    async def close(self) -> None:
        if self.docker is not None:
            await self.docker.close()
            self.docker = None

    async def tidy(self, models: dict[str, ModelSettings]) -> None:
        """Adopt or remove the labelled containers an earlier run (or owner) left, by policy;
        those this process watches are its own already."""
        self.adoptable.clear()
        for container in await self._labelled():
            if container.id in self._deaths:
                continue
            labels = _field(container, "Labels") or {}
            model = labels.get(LABEL_MODEL, "")
            replica = labels.get(LABEL_REPLICA, "0")
            running = _field(container, "State") == "running"
            keep = (self.settings.on_start == "adopt" and running and model in models
                    and replica.isdigit() and int(replica) < models[model].max_replicas
                    and self._places(models[model], int(replica)))
            if keep:
                self.adoptable[model, int(replica)] = container.id
                log.info("adopting container", engine=self.settings.name, model=model,
                         container=container.id[:12])
            else:
                log.info("removing container left by an earlier run",
                         engine=self.settings.name, model=model, container=container.id[:12])
                await self.remove(container.id)

    def _places(self, model: ModelSettings, replica: int) -> bool:
        """Whether the model's replica runs on this engine (``BackendPool``'s placement)."""
        return placement(model, replica)[0] == self.settings.name

    async def _labelled(self) -> list[aiodocker.containers.DockerContainer]:
        return await self.call("list containers", self.api.containers.list(
            all=True, filters=self.label_filter()))

    async def remove(self, container_id: str) -> None:
        try:
            await self.call("remove a container",
                            self.api.containers.container(container_id).delete(force=True))
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise LaunchError(f"the engine did not remove the container: {exc.message}") \
                    from None

    def watch(self, container_id: str) -> anyio.Event:
        event = self._deaths[container_id] = anyio.Event()
        return event

    def forget(self, container_id: str) -> None:
        self._deaths.pop(container_id, None)
        self._exit_codes.pop(container_id, None)

    def exit_code(self, container_id: str) -> str:
        return self._exit_codes.get(container_id, "unknown")

    async def follow_events(self) -> None:
        """Mark watched containers dead as the engine reports them; follows the stream again
        when it ends or fails (after a delay that doubles while the engine stays away),
        replaying from the last event seen, and looks the watched containers up once it is
        back, so a death in between is not lost even when the engine forgot its events."""
        since = time.time()
        delay = RECONNECT_DELAY
        while True:
            events = aiodocker.Docker(url=self.settings.url)
            error: BaseException | None = None
            try:
                # No "event" filter: Podman 4.3 then sends nothing; _on_event keeps the deaths.
                subscriber = events.events.subscribe(
                    since=str(int(since)), filters={**self.label_filter(), "type": ["container"]})
                await self.reconcile()
                delay = RECONNECT_DELAY
                while (event := await subscriber.get()) is not None:
                    since = max(since, event.get("timeNano", 0) / 1e9 or time.time())
                    self._on_event(event)
            except Exception as exc:
                error = exc
            finally:
                with anyio.CancelScope(shield=True):
                    try:
                        # Raises what ended the stream (its task's error) again.
                        await events.events.stop()
                    except Exception as exc:
                        error = error or exc
                    with contextlib.suppress(Exception):
                        await events.close()
            log.warning("engine event stream lost; following it again", retry_in_s=delay,
                        engine=self.settings.name, error=repr(error) if error else "it ended")
            await anyio.sleep(delay)
            delay = min(2 * delay, RECONNECT_DELAY_MAX)

    async def reconcile(self) -> None:
        """A watched container that the engine lists as ended, or no longer lists, is dead."""
        # Only those watched before the listing: one created meanwhile is not in it.
        watched = [(cid, death) for cid, death in self._deaths.items() if not death.is_set()]
        if not watched:
            return
        states = {c.id: _field(c, "State") for c in await self._labelled()}
        for container_id, death in watched:
            state = states.get(container_id)
            if not death.is_set() and (state is None or state in ENDED):
                log.warning("container ended while the engine's events were lost",
                            engine=self.settings.name, container=container_id[:12],
                            state=state or "gone")
                self._exit_codes[container_id] = "unknown (it ended while the events were lost)"
                death.set()

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("Action", event.get("status")) != "die":
            return
        container_id = event.get("id") or event.get("Actor", {}).get("ID", "")
        death = self._deaths.get(container_id)
        if death is not None and not death.is_set():
            attributes = event.get("Actor", {}).get("Attributes", {})
            self._exit_codes[container_id] = str(attributes.get("exitCode", "unknown"))
            death.set()


class ContainerEngines:
    """The engines named in the configuration, connected for as long as the gateway runs."""

    def __init__(self, config: Config) -> None:
        self.models = {m.name: m for m in config.models if m.launcher == "container"}
        used = {engine for m in self.models.values() for engine, _ in m.placements}
        self.instance = instance_name(config) if used else ""
        # [cluster]: the pool's owner adopts, at the start of its term, not every member.
        self.cluster = config.cluster.key_prefix if config.cluster.enabled else None
        self.engines = {name: Engine(settings, self.instance, self.cluster)
                        for name, settings in config.engines.items() if name in used}
        self.supervisor = Supervisor()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ContainerEngines]:
        if not self.engines:
            yield self
            return
        if sniffio.current_async_library() != "asyncio":
            raise RuntimeError("container models need the asyncio (or uvloop) worker: aiodocker, "
                               "the container engine client, runs on asyncio only")
        try:
            for engine in self.engines.values():
                await engine.connect()
                if self.cluster is None:
                    await engine.tidy(self.models)
            async with anyio.create_task_group() as tg:
                for name, engine in self.engines.items():
                    tg.start_soon(self.supervisor.run, f"the event stream of engine {name!r}",
                                  engine.follow_events)
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                for engine in self.engines.values():
                    await engine.leave()
                    await engine.close()

    async def adopt(self) -> None:
        """A new pool owner's look at what the last one left ([cluster]): the containers that
        still run are adopted, the others removed (a ``LaunchError`` if an engine fails)."""
        for engine in self.engines.values():
            await engine.tidy(self.models)

    def begin_shutdown(self, *, hand_over: bool = False) -> None:
        """The gateway stops: its containers are stopped, unless the engine keeps them
        (``on_shutdown = "keep"``) or, with ``hand_over``, another member of the cluster is
        there to adopt them as the pool's next owner."""
        for engine in self.engines.values():
            engine.shutting_down = True
            if hand_over:
                engine.leave_running = "handed over to the pool's next owner"
            elif engine.settings.on_shutdown == "keep":
                engine.leave_running = "on_shutdown = keep"

    def launcher(self, model: ModelSettings) -> ContainerLauncher:
        assert model.engine is not None
        return ContainerLauncher(model, self.engines[model.engine])


class ContainerLauncher:
    def __init__(self, model: ModelSettings, engine: Engine) -> None:
        self.model = model
        self.engine = engine
        self.address: str | None = None
        # [cluster]: asked just before a container is made (after a pull, which may be long),
        # so that an owner that went stale meanwhile makes none (``OwnerLease.fence``).
        self.fence: Callable[[], Awaitable[object]] | None = None
        self._id: str | None = None
        self._death: anyio.Event | None = None

    def has_running(self) -> bool:
        return (self.model.name, self.model.replica) in self.engine.adoptable

    async def start(self, task_group: TaskGroup) -> str:
        adopted = self.engine.adoptable.pop((self.model.name, self.model.replica), None)
        if adopted is not None:
            container_id = adopted
            self._death = self.engine.watch(container_id)
            self._id = container_id
        else:
            await self._ensure_image()
            container_id = await self._create_and_start()
        port = await self._published_port(container_id)
        self.address = f"http://{self.engine.settings.host}:{port}"
        return self.address

    async def _ensure_image(self) -> None:
        image = self.model.image
        assert image is not None
        try:
            await self.engine.call("inspect the image", self.engine.api.images.inspect(image))
            return
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise LaunchError(
                    f"the engine cannot inspect image {image}: {exc.message}") from None
        if self.model.pull == "never":
            raise LaunchError(f"image {image} is not present on engine "
                              f"{self.engine.settings.name!r} and pull = \"never\"")
        log.info("pulling image", model=self.model.name, image=image)
        try:
            # Bounded by the model's startup_timeout (the pool's): a pull takes what it takes.
            with self.engine.bounded("pull the image", limit=float("inf")):
                async for progress in self.engine.api.images.pull(image, stream=True):
                    if "status" in progress and "progressDetail" not in progress:
                        log.info("pull progress", model=self.model.name, image=image,
                                 status=progress["status"], id=progress.get("id"))
        except aiodocker.DockerError as exc:
            raise LaunchError(f"pulling image {image} failed: {exc.message}") from None

    async def _create_and_start(self) -> str:
        engine = self.engine
        request = create_request(self.model, kind=engine.kind, version=engine.version,
                                 instance=engine.instance,
                                 publish_ip=engine.settings.publish_ip, cluster=engine.cluster)
        name = container_name(engine.instance, self.model.name, self.model.replica)
        if self.fence is not None:
            await self.fence()
        await engine.remove(name)
        try:
            container = await engine.call("create the container",
                                          engine.api.containers.create(request, name=name))
        except aiodocker.DockerError as exc:
            raise LaunchError(f"the engine refused to create the container: {exc.message}") \
                from None
        self._id = container.id
        self._death = engine.watch(container.id)
        try:
            await engine.call("start the container", container.start())
        except aiodocker.DockerError as exc:
            raise LaunchError(f"the container did not start: {exc.message}") from None
        log.info("container started", model=self.model.name, container=container.id[:12])
        return container.id

    async def _published_port(self, container_id: str) -> str:
        try:
            info = await self.engine.call(
                "inspect the container", self.engine.api.containers.container(container_id).show())
        except aiodocker.DockerError as exc:
            raise LaunchError(f"the engine cannot inspect the container: {exc.message}") \
                from None
        bindings = (info.get("NetworkSettings", {}).get("Ports") or {}).get(
            f"{self.model.container_port}/tcp") or []
        for binding in bindings:
            if binding.get("HostPort"):
                return binding["HostPort"]
        raise LaunchError(f"the container publishes no host port for {self.model.container_port}")

    def is_alive(self) -> bool:
        return self._death is not None and not self._death.is_set()

    async def wait_exit(self) -> str:
        assert self._death is not None and self._id is not None
        await self._death.wait()
        return f"the container exited with status {self.engine.exit_code(self._id)}"

    async def output_tail(self) -> str:
        if self._id is None:
            return ""
        try:
            lines = await self.engine.call("read the logs", self.engine.api.containers.container(
                self._id).log(stdout=True, stderr=True, tail=LOG_TAIL))
        except aiodocker.DockerError as exc:
            return f"(no logs: {exc.message})"
        except LaunchError as exc:
            return f"(no logs: {exc})"
        return "".join(lines)

    def release(self, why: str) -> str | None:
        """Forget the container without stopping it (it runs on, for whoever adopts it by its
        labels: the pool's next owner, or the gateway's next run); its id."""
        container_id, self._id = self._id, None
        self.address = None
        if container_id is not None:
            self.engine.forget(container_id)
            log.info("leaving container running", model=self.model.name,
                     container=container_id[:12], why=why)
        return container_id

    async def stop(self) -> None:
        if self.engine.shutting_down and self.engine.leave_running is not None:
            self.release(self.engine.leave_running)
            return
        container_id, self._id = self._id, None
        self.address = None
        if container_id is None:
            return
        with anyio.CancelScope(shield=True):
            self.engine.forget(container_id)
            container = self.engine.api.containers.container(container_id)
            stop_timeout = self.engine.settings.stop_timeout
            try:
                await self.engine.call("stop the container",
                                       container.stop(t=int(stop_timeout)), extra=stop_timeout)
            except aiodocker.DockerError as exc:
                if exc.status not in (304, 404):
                    log.warning("container stop failed; removing it by force",
                                model=self.model.name, error=exc.message)
            except LaunchError as exc:
                log.warning("container stop failed; removing it by force",
                            model=self.model.name, error=str(exc))
            await self.engine.remove(container_id)
            log.info("container removed", model=self.model.name, container=container_id[:12])
