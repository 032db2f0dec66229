"""The systems compared, each in front of the same two backends (a fast one and a paced one).

- ``direct``: the client talks to the backend itself; the baseline every "added" figure uses.
- ``nginx``: nginx-light as a plain reverse proxy, one worker, its own prefix directory,
  upstream keep-alive, no response buffering (so SSE is relayed as it comes), access log on
  (buffered), as an operator would run it.
- ``litellm``: LiteLLM's proxy from its own virtualenv (``benchmarks/.venv-litellm``), the two
  backends as OpenAI-compatible models, the master key sent with every request.
- ``gateway``: ``python -m proxy.cli serve --worker uvloop`` with its full middleware stack and
  access log (to a file), the two backends as static models.
- ``gateway-uvicorn``, ``gateway-granian``: the same gateway under uvicorn (``serve --server
  uvicorn``: httptools, uvloop) and under granian (its own command line on ``proxy.asgi:app``:
  its Rust HTTP/1.1, uvloop), one process each: what the server costs, next to hypercorn.
- ``gateway-workers2``: ``serve --workers 2`` (two worker processes on the one port, their
  state in a private redis-server), not pinned: its workers share the cores with the backends
  and the load generator (``benchmarks.workers``).
- ``hypercorn-bare``: not a proxy but a reference for (a): hypercorn answering a canned
  completion itself (``benchmarks/bare_asgi.py``), the ceiling of anything built on hypercorn
  on the proxy core at that moment.

Each proxy but ``gateway-workers2`` runs pinned to core 0; backends and load generators run on
core 1.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .procs import PROXY_CORE, Proc, free_port, start, wait_http

ROOT = Path(__file__).resolve().parent.parent
LITELLM_VENV = ROOT / "benchmarks" / ".venv-litellm"
MASTER_KEY = "sk-bench-master-key"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CHAT = "/v1/chat/completions"


@dataclass
class Target:
    """Where a load generator sends requests for one backend, through one system."""

    host: str
    port: int
    path: str
    model: str
    headers: dict[str, str] = field(default_factory=dict)

    def spec(self) -> dict[str, object]:
        return {"host": self.host, "port": self.port, "path": self.path, "model": self.model,
                "headers": self.headers}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"


@dataclass
class System:
    name: str
    fast: Target
    paced: Target
    proc: Proc | None = None
    startup_s: float = 0.0
    version: str = ""
    # A reference point that answers by itself (no backend): scenario (a) only.
    reference: bool = False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def available(name: str) -> str | None:
    """Why ``name`` cannot run here, or None."""
    if name == "nginx" and not Path(NGINX).exists():
        return "nginx is not installed (apt-get install nginx-light)"
    if name in SERVERS and not _version_of(SERVERS[name][0]):
        return (f"{SERVERS[name][0]} is not installed: scripts/bootstrap.sh installs it "
                "(the test extra)")
    if name == WORKERS and not shutil.which("redis-server"):
        return "redis-server is not installed (Debian: apt-get install redis-server)"
    if name == "litellm" and not (LITELLM_VENV / "bin" / "litellm").exists():
        return ("LiteLLM is not installed: python -m benchmarks.setup_litellm "
                "(makes benchmarks/.venv-litellm)")
    return None


def direct(fast_port: int, paced_port: int) -> System:
    return System("direct", Target("127.0.0.1", fast_port, CHAT, "fast"),
                  Target("127.0.0.1", paced_port, CHAT, "paced"), version="responder")


def nginx(fast_port: int, paced_port: int, work: Path) -> System:
    prefix = work / "nginx"
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    port_fast, port_paced = free_port(), free_port()
    conf = prefix / "nginx.conf"
    location = """
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}"""
    conf.write_text(f"""
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log {prefix}/logs/access.log combined buffer=64k flush=1s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    keepalive_requests 1000000;
    upstream fast {{ server 127.0.0.1:{fast_port}; keepalive 512; keepalive_requests 1000000; }}
    upstream paced {{ server 127.0.0.1:{paced_port}; keepalive 1024; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port_fast} backlog=4096;{location.format(upstream="fast")}
    }}
    server {{
        listen 127.0.0.1:{port_paced} backlog=4096;{location.format(upstream="paced")}
    }}
}}
""")
    proc = start("nginx", [NGINX, "-p", str(prefix), "-c", str(conf), "-e", "stderr"],
                 core=PROXY_CORE, logs=work)
    system = System("nginx", Target("127.0.0.1", port_fast, CHAT, "fast"),
                    Target("127.0.0.1", port_paced, CHAT, "paced"), proc)
    system.startup_s = wait_http(proc, f"http://127.0.0.1:{port_fast}/health")
    return system


def hypercorn_bare(work: Path, *, backends: tuple[int, int] | None = None) -> System:
    """hypercorn answering by itself, or, given the backends' ports, the bare aiohttp
    passthrough (``/paced/...`` goes to the paced backend)."""
    port = free_port()
    name = "hypercorn-bare" if backends is None else "aiohttp-bare"
    extra = [] if backends is None else [
        "--upstream", f"http://127.0.0.1:{backends[0]}",
        "--paced-upstream", f"http://127.0.0.1:{backends[1]}"]
    proc = start(name, [sys.executable, "-m", "benchmarks.bare_asgi", "--bind",
                        f"127.0.0.1:{port}", *extra], core=PROXY_CORE, logs=work, cwd=ROOT)
    fast = Target("127.0.0.1", port, CHAT, "fast")
    paced = Target("127.0.0.1", port, "/paced" + CHAT, "paced")
    system = System(name, fast, paced if backends else fast, proc, reference=backends is None)
    system.startup_s = wait_http(proc, f"http://127.0.0.1:{port}/health")
    return system


def litellm(fast_port: int, paced_port: int, work: Path) -> System:
    port = free_port()
    conf = work / "litellm.yaml"
    models = "".join(f"""
  - model_name: {name}
    litellm_params:
      model: openai/{name}
      api_base: http://127.0.0.1:{backend}/v1
      api_key: unused
""" for name, backend in (("fast", fast_port), ("paced", paced_port)))
    conf.write_text(f"""model_list:{models}
litellm_settings:
  drop_params: true
  telemetry: false
general_settings:
  master_key: {MASTER_KEY}
""")
    env = {"LITELLM_MASTER_KEY": MASTER_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "LITELLM_TELEMETRY": "False", "NO_COLOR": "1"}
    proc = start("litellm", [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(conf),
                             "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
                 core=PROXY_CORE, logs=work, env=env, cwd=work, stop_timeout=15.0)
    auth = {"authorization": f"Bearer {MASTER_KEY}"}
    system = System("litellm", Target("127.0.0.1", port, CHAT, "fast", auth),
                    Target("127.0.0.1", port, CHAT, "paced", auth), proc)
    system.startup_s = wait_http(proc, f"http://127.0.0.1:{port}/health/liveliness",
                                 timeout=90)
    system.version = _litellm_version()
    return system


def _litellm_version() -> str:
    for meta in (LITELLM_VENV / "lib").glob("python*/site-packages/litellm-*.dist-info"):
        return meta.name.removeprefix("litellm-").removesuffix(".dist-info")
    return ""


def model_tables(models: Mapping[str, int | dict[str, object]]) -> dict[str, dict[str, object]]:
    """Each model's ``[[models]]`` table, as ``gateway_config`` takes it: a port is a static
    backend at that local port, a table is used as it is."""
    return {name: model if isinstance(model, dict) else {
        "launcher": "static", "url": f"http://127.0.0.1:{model}", "startup_timeout": 10.0,
        "idle_timeout": 86400.0} for name, model in models.items()}


def gateway_config(models: dict[str, dict[str, object]], *, max_concurrent: int,
                   max_queue_size: int, max_models_concurrent: int | None = None,
                   **gateway: object) -> str:
    """A gateway config with these models (name: the rest of its ``[[models]]`` table) and
    more ``[gateway]`` settings, if given."""
    tables = "".join(f'\n[[models]]\nname = "{name}"\n' + _toml(table)
                     for name, table in models.items())
    return f"""[gateway]
max_concurrent = {max_concurrent}
max_queue_size = {max_queue_size}
max_models_concurrent = {max_models_concurrent or len(models)}
queue_timeout = 60.0
log_format = "json"
{_toml(gateway)}{tables}"""


def _toml(table: dict[str, object]) -> str:
    """Keys and values, one a line: a JSON string, number or list of them is the same in TOML."""
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())


# ``serve --workers 2``: see the module's docstring.
WORKERS = "gateway-workers2"
PACKAGES = ("kernel", "cluster", "telemetry", "backends", "relay", "middleware", "proxy")


def snapshot(work: Path) -> tuple[Path, str]:
    """Copy the gateway's packages as they are now, so every gateway of one run runs the same
    code while others keep editing the tree; returns the copy and a hash of its sources."""
    src = work / "src"
    digest = hashlib.sha256()
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for path in sorted((src / package).rglob("*.py")):
            digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    return src, digest.hexdigest()[:12]


# The same gateway under other ASGI servers, each on uvloop, one process (the queues and slots
# are one process's state), access log off (the gateway writes its own), limits past anything
# the scenarios reach: on uvicorn as `vllm-gateway serve --server uvicorn` runs it (httptools),
# on granian as its own command line runs ``proxy.asgi:app``.
SERVERS = {
    "gateway-uvicorn": ("uvicorn", [
        "-m", "proxy.cli", "serve", "--config", "{conf}", "--bind", "127.0.0.1:{port}",
        "--worker", "uvloop", "--server", "uvicorn"]),
    "gateway-granian": ("granian", [
        "-m", "granian", "--interface", "asgi", "--loop", "uvloop", "--http", "1",
        "--workers", "1", "--runtime-threads", "1", "--backlog", "4096", "--backpressure",
        "4096", "--log-level", "warning", "--host", "127.0.0.1", "--port", "{port}",
        "proxy.asgi:app"]),
}


def gateway(models: Mapping[str, int | dict[str, object]], work: Path, *, src: Path,
            name: str = "gateway", max_concurrent: int = 1000, max_queue_size: int = 5000,
            server: str = "hypercorn", core: int | None = PROXY_CORE,
            env: dict[str, str] | None = None,
            settings: dict[str, object] | None = None, workers: int = 1) -> System:
    """The gateway under ``vllm-gateway serve`` (hypercorn; ``--workers`` if more than one),
    or, with ``server`` one of ``SERVERS``, under that server; ``models`` as ``model_tables``
    takes them, ``settings`` more of ``[gateway]``."""
    port = free_port()
    conf = work / f"{name}.toml"
    conf.write_text(gateway_config(model_tables(models), max_concurrent=max_concurrent,
                                   max_queue_size=max_queue_size, **(settings or {})))
    if server == "hypercorn":
        argv = ["-m", "proxy.cli", "serve", "--config", str(conf), "--bind",
                f"127.0.0.1:{port}", "--worker", "uvloop", "--workers", str(workers)]
    else:
        argv = [arg.format(port=port, conf=conf) for arg in SERVERS[server][1]]
    proc = start(name, [sys.executable, *argv], core=core, logs=work, cwd=src,
                 env={"GATEWAY_CONFIG": str(conf), **(env or {})})
    names = list(models)
    system = System(name, Target("127.0.0.1", port, CHAT, names[0]),
                    Target("127.0.0.1", port, CHAT, names[-1]), proc)
    system.startup_s = wait_http(proc, f"http://127.0.0.1:{port}/ready")
    system.version = _git_describe() + ("" if server == "hypercorn"
                                        else f" on {server} {_version_of(server)}")
    return system


def _version_of(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return ""


def _git_describe() -> str:
    import subprocess

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=5).stdout
    except OSError:
        return ""
    return rev + ("+dirty" if dirty.strip() else "")
