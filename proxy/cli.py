"""The command line: ``vllm-gateway serve`` and ``vllm-gateway check-config``.

The configuration is validated before anything binds a port; a bad value exits with status 2
and one line that names the key, the value, where it came from and what is allowed. So does an
address the gateway cannot listen on (in use, not this host's), before any model is touched.

SIGHUP reloads the configuration (``proxy.reload``: read as at the start, with the same
``--config`` and ``--bind``), and so does a change of its file under ``--watch-config``
(watchfiles, on the file's folder: a rename into place is seen; a burst of writes is read once).

``serve --workers N`` (N > 1) runs N such processes on one port under a supervisor
(``proxy.workers``), as one ``[cluster]``: on ``cluster.redis_url``, else on a private
redis-server it starts (``cluster.private_redis``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import importlib.util
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import structlog
from hypercorn.config import Config as HypercornConfig

from kernel.config import Config, ConfigError, config_path, effective, load_config
from kernel.errors import GatewayError
from kernel.types import ASGIApp

from .app import Gateway, build_app, shutdown_allowance
from .forwarded import behind_proxies
from .logs import SERVER_LOGGER, configure_logging, log_configuration

EXIT_CONFIG = 2
# Seconds the server gives the connections still open after the wind-down (an admin call, a
# scrape) before it cancels them and the lifespan stops the models.
CLOSE_TIMEOUT = 5.0
WORKERS = ("asyncio", "uvloop", "trio")
SERVERS = ("hypercorn", "uvicorn")
# uvloop where it is installed (a dependency everywhere but Windows): measured on one core, ~7%
# less CPU per request than asyncio's own loop (benchmarks/).
DEFAULT_WORKER = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
# Milliseconds a changed config file must be quiet before it is read (--watch-config): an
# editor's truncate-then-write, or a write then a rename into place, is read once, complete.
WATCH_QUIET_MS = 300


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-gateway", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="TOML file (default: $GATEWAY_CONFIG or ./config.toml)")
    serve.add_argument("--bind", help="HOST:PORT, overrides gateway.bind")
    serve.add_argument("--worker", choices=WORKERS, default=DEFAULT_WORKER,
                       help=f"event loop (default: {DEFAULT_WORKER})")
    serve.add_argument("--server", choices=SERVERS, default="hypercorn",
                       help="HTTP server (default: hypercorn; uvicorn needs the uvicorn extra, "
                            "asyncio or uvloop, and serves HTTP/1.1 only)")
    serve.add_argument("--watch-config", action="store_true",
                       help="reload the configuration when its file changes (as SIGHUP does)")
    serve.add_argument("--workers", type=_worker_count, default=1, metavar="N",
                       help="gateway processes on the one port, sharing their state in Redis "
                            "(cluster.redis_url, else a private redis-server); default 1: one "
                            "process, no Redis")
    # A worker of ``--workers``: binds the address with SO_REUSEPORT, beside the others.
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    check = commands.add_parser("check-config", help="validate and print the configuration")
    check.add_argument("--config", help="TOML file (default: $GATEWAY_CONFIG or ./config.toml)")
    return parser


def _worker_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return count


def loader(path: str | None = None, bind: str | None = None) -> Callable[[], Config]:
    """Reads the configuration as the command line names it (for the start and each reload)."""
    return partial(load_config, path,
                   options={"gateway.bind": bind} if bind is not None else None)


def load_or_exit(path: str | None = None, bind: str | None = None) -> Config:
    """The validated configuration, or exit with status 2 and its one-line message."""
    try:
        return loader(path, bind)()
    except ConfigError as exc:
        print(f"vllm-gateway: config error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _listener(port: int) -> str | None:
    """Which process listens on the TCP port, as far as /proc lets this user see (Linux)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                argv = (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
                return f"pid {proc.name}: {' '.join(a.decode(errors='replace') for a in argv)}"
        except OSError:  # gone, or not ours to look at
            continue
    return None


def _listen(bind: str, hc: HypercornConfig, reuse_port: bool = False) -> list[socket.socket]:
    """Bind the gateway's address now, before the lifespan starts (or adopts, or removes) any
    model; exit 2 with one line if it cannot be bound. ``reuse_port``: with SO_REUSEPORT (the
    workers of ``--workers`` and their supervisor)."""
    hc.bind = [bind]
    try:
        # hypercorn sets SO_REUSEPORT on what it binds where it counts more than one worker;
        # its serve() warns unless it counts one.
        hc.workers = 2 if reuse_port else 1
        sockets = hc.create_sockets()
        hc.workers = 1
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            user = _listener(int(bind.rpartition(":")[2]))
            reason = f"the address is in use{f' (by {user})' if user else ''}"
        print(f"vllm-gateway: cannot listen on {bind}: {reason}; choose another with --bind "
              "or gateway.bind", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    return sockets.insecure_sockets


def _hypercorn_config(config: Config, reuse_port: bool = False) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [f"fd://{sock.detach()}" for sock in _listen(config.gateway.bind, hc, reuse_port)]
    # The gateway winds down by itself first (``_serve``): what is left is closed quickly.
    hc.graceful_timeout = CLOSE_TIMEOUT
    # The lifespan's shutdown stops the models: never cut short (hypercorn's default is 60 s).
    hc.shutdown_timeout = max(hc.shutdown_timeout, shutdown_allowance(config))
    hc.backlog = config.gateway.backlog
    hc.keep_alive_timeout = config.gateway.keep_alive_timeout
    hc.accesslog = None
    hc.errorlog = logging.getLogger(SERVER_LOGGER)
    return hc


def _uvicorn_server(config: Config, app: ASGIApp) -> Any:
    """uvicorn's server for the app (httptools), with the settings hypercorn gets and its own
    signal handling left out: the gateway winds down first, then tells it to exit."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    server_log = logging.getLogger(SERVER_LOGGER)
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = server_log.handlers, False
        logger.setLevel(server_log.level)
    return Server(uvicorn.Config(
        app, loop="none", http="httptools", ws="none", lifespan="on", log_config=None,
        access_log=False, server_header=False, backlog=config.gateway.backlog,
        timeout_keep_alive=config.gateway.keep_alive_timeout,
        timeout_graceful_shutdown=CLOSE_TIMEOUT))


def _reload(gateway: Gateway, trigger: str) -> None:
    log = structlog.get_logger("gateway")
    log.info("reloading the configuration", trigger=trigger)
    with contextlib.suppress(GatewayError):  # logged and counted by the reload
        gateway.reloads.reload()


async def _reload_on_hangup(gateway: Gateway) -> None:
    with anyio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            _reload(gateway, "SIGHUP")


async def _reload_on_change(gateway: Gateway, path: Path) -> None:
    """Reload when the file (an absolute path) changes: its folder is watched, so that a file
    renamed into place (a new inode) is seen; changes closer than ``WATCH_QUIET_MS`` are one (an
    editor's truncate and write), read once the file is quiet."""
    import watchfiles

    async for _ in watchfiles.awatch(path.parent, step=WATCH_QUIET_MS,
                                     watch_filter=lambda _, changed: Path(changed) == path):
        _reload(gateway, f"{path} changed")


async def _reload_triggers(gateway: Gateway, watch: Path | None, stop: anyio.Event) -> None:
    """SIGHUP and the watch, until ``stop``: ended from within, in a group of their own (as
    ``on_signals`` in ``_serve``, this task must end by itself)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_reload_on_hangup, gateway)
        if watch is not None:
            tg.start_soon(_reload_on_change, gateway, watch)
        await stop.wait()
        tg.cancel_scope.cancel()


async def _serve(config: Config, worker: str, listen: HypercornConfig | list[socket.socket],
                 load: Callable[[], Config] | None = None, watch: Path | None = None) -> None:
    """Serve until the signals' wind-down is over: on hypercorn (``listen`` its config) or on
    uvicorn (``listen`` the bound sockets). SIGHUP (and with ``watch``, a change of that file)
    reloads the configuration (``load``)."""
    gateway = build_app(config, load)
    app = behind_proxies(gateway, config.gateway.trusted_proxies)
    stop = anyio.Event()
    log = structlog.get_logger("gateway")
    uvicorn_server = _uvicorn_server(config, app) if isinstance(listen, list) else None

    async def on_signals() -> None:
        # The first signal winds down within the grace (the server keeps answering meanwhile:
        # /ready and new requests get 503, so a balancer moves on); a second one ends the
        # requests still in flight at once. This task ends by itself once the server may stop:
        # cancelling a task still running here would cancel _serve on Python 3.11, whose
        # asyncio.TaskGroup (in hypercorn) leaves the task marked as cancelling.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("shutting down", signal=signum.name, in_flight=gateway.in_flight,
                         grace_s=config.gateway.shutdown_grace)
                break

            async def end_at_once() -> None:
                async for signum in signals:
                    log.warning("shutting down now", signal=signum.name,
                                in_flight=gateway.in_flight)
                    gateway.end_in_flight()

            async with anyio.create_task_group() as tg:
                tg.start_soon(end_at_once)
                await gateway.wind_down()
                tg.cancel_scope.cancel()
        stop.set()
        if uvicorn_server is not None:
            uvicorn_server.should_exit = True

    # Everything made so far (modules, configuration, the app) lives as long as the process:
    # out of the collector's sight, its full passes no longer walk it (~50 ms each before).
    gc.freeze()
    async with anyio.create_task_group() as tg:
        tg.start_soon(on_signals)
        tg.start_soon(_reload_triggers, gateway, watch, stop)
        if uvicorn_server is not None:
            assert isinstance(listen, list)
            await uvicorn_server.serve(sockets=listen)
        elif worker == "trio":
            from hypercorn.trio import serve as hypercorn_serve
            await hypercorn_serve(app, listen, shutdown_trigger=stop.wait)
        else:
            from hypercorn.asyncio import serve as hypercorn_serve
            await hypercorn_serve(app, listen, shutdown_trigger=stop.wait)
        tg.cancel_scope.cancel()


def _is_loopback(bind: str) -> bool:
    host = bind.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return host == "localhost"


def log_start_up(config: Config) -> None:
    """The effective configuration, secrets masked, and a loud warning when any client that
    can reach the gateway may use it: it listens beyond loopback with no client API keys."""
    log = structlog.get_logger("gateway")
    log_configuration(config)
    if config.client_keys:
        log.info("client API keys required", keys=len(config.client_keys))
    elif not _is_loopback(config.gateway.bind):
        log.warning("ANYONE WHO CAN REACH THIS ADDRESS CAN USE EVERY MODEL: the gateway listens "
                    "beyond loopback with no client API keys; set [auth] api_keys or "
                    "api_keys_file", bind=config.gateway.bind)


def serve(config: Config, worker: str, server: str = "hypercorn",
          load: Callable[[], Config] | None = None, watch: Path | None = None,
          reuse_port: bool = False) -> None:
    listen: HypercornConfig | list[socket.socket]
    if server == "uvicorn":
        listen = _listen(config.gateway.bind, HypercornConfig(), reuse_port)
    else:
        listen = _hypercorn_config(config, reuse_port)
    configure_logging(config.gateway.log_format)
    log_start_up(config)
    if config.cluster.enabled:
        from cluster.members import refusal

        refused = anyio.run(refusal, config)
        if refused is not None:
            print(f"vllm-gateway: config error: {refused}", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG)
    if worker == "trio":
        anyio.run(_serve, config, worker, listen, load, watch, backend="trio")
    else:
        anyio.run(_serve, config, worker, listen, load, watch, backend="asyncio",
                  backend_options={"use_uvloop": worker == "uvloop"})
    structlog.get_logger("gateway").info("gateway stopped", exit_status=0)


def supervise(args: argparse.Namespace, config: Config) -> int:
    """``serve --workers N``: the shared state's Redis (configured, or a private one started
    here), the address bound, then the workers under ``proxy.workers.Supervisor``."""
    from cluster import private_redis

    from .workers import Supervisor, tied_to_parent, worker_argv

    problem = None
    if not importlib.util.find_spec("coredis"):
        problem = ("the workers share their state in Redis through coredis, which is not "
                   "installed: pip install 'vllm-gateway[cluster]'")
    elif not config.cluster.enabled and shutil.which(private_redis.BINARY) is None:
        problem = ("the workers share their state in Redis: install redis-server (Debian: "
                   "apt-get install redis-server) or set cluster.redis_url")
    if problem:
        print(f"vllm-gateway: --workers {args.workers}: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if not config.cluster.enabled:
        # What a [cluster] refuses (LoRA adapters, ...) is refused before anything starts.
        try:
            load_config(args.config, options={"gateway.bind": config.gateway.bind,
                                              "cluster.redis_url": "unix:///private"})
        except ConfigError as exc:
            print(f"vllm-gateway: config error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    # Bound (not listening) for as long as the supervisor runs: the address is checked once,
    # a port 0 is chosen once, and no other program takes it while a worker restarts.
    (held,) = _listen(config.gateway.bind, HypercornConfig(), reuse_port=True)
    host = config.gateway.bind.rpartition(":")[0]
    bind = f"{host}:{held.getsockname()[1]}"
    configure_logging(config.gateway.log_format)
    log = structlog.get_logger("gateway")
    env = dict(os.environ)
    redis = None
    with held, contextlib.ExitStack() as stack:
        if not config.cluster.enabled:
            try:
                redis = stack.enter_context(private_redis.running(preexec=tied_to_parent))
            except private_redis.RedisUnavailable as exc:
                print(f"vllm-gateway: --workers {args.workers}: {exc}", file=sys.stderr)
                return 1
            env["GATEWAY_CLUSTER_REDIS_URL"] = redis.url
            log.info("private redis-server started", socket=str(redis.socket))
        log.info("serving with workers", workers=args.workers, bind=bind,
                 redis="private" if not config.cluster.enabled else "cluster.redis_url")
        supervisor = Supervisor(
            worker_argv(args.config, bind, args.worker, args.server, args.watch_config),
            args.workers, env=env, redis=redis,
            drain_s=config.gateway.shutdown_grace + shutdown_allowance(config) + CLOSE_TIMEOUT)
        status = supervisor.run()
    log.info("gateway stopped", exit_status=status)
    return status


def check_config(config: Config) -> None:
    """Print the effective configuration as JSON."""
    try:
        print(json.dumps(effective(config), indent=2), flush=True)
    except BrokenPipeError:
        # The reader (``| head``) has gone: the configuration is still valid, so exit 0, and
        # point stdout at /dev/null so the interpreter's last flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        check_config(load_or_exit(args.config))
        return 0
    config = load_or_exit(args.config, args.bind)
    containers = [m.name for m in config.models if m.launcher == "container"]
    if args.worker == "trio" and containers:
        print("vllm-gateway: config error: the trio worker cannot run container models "
              f"({', '.join(containers)}): their engine client, aiodocker, runs on asyncio "
              "only; use --worker asyncio or uvloop", file=sys.stderr)
        return EXIT_CONFIG
    if args.server == "uvicorn":
        problem = None
        if args.worker == "trio":
            problem = "uvicorn runs on asyncio only; use --worker asyncio or uvloop"
        elif not importlib.util.find_spec("uvicorn") or not importlib.util.find_spec("httptools"):
            problem = "uvicorn is not installed: pip install 'vllm-gateway[uvicorn]'"
        if problem:
            print(f"vllm-gateway: --server uvicorn: {problem}", file=sys.stderr)
            return EXIT_CONFIG
    if args.workers > 1:
        return supervise(args, config)
    watch = config_path(args.config, os.environ)[0].resolve() if args.watch_config else None
    serve(config, args.worker, args.server, loader(args.config, args.bind), watch,
          args.reuse_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
