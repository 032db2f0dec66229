"""The per-request record the layers share: one typed object, made by the first layer.

``RequestContext`` (``middleware/request_context.py``) puts a ``RequestState`` in the scope under
``STATE`` before any other layer runs; every later layer reaches it the same way,
``scope[STATE]``, one dict lookup. It is a key of the scope itself, not of ``scope["state"]``:
an application that mounts the gateway keeps its own lifespan state there (``state["model"]``
and the like), untouched. What is recorded here is data only (no callbacks): a layer that must
tell another something about the queue or a slot asks the accounting (``kernel.accounting``).

``ResponseProgress`` is what has gone to the client so far (``middleware.progress`` wraps
``send`` to keep it). Neither record holds a reference to the server's ``send`` or stream: the
scope belongs to the server's stream object, and a reference back to it would make every
request a reference cycle that only the garbage collector frees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: kernel.errors imports this module, keep it light
    from kernel.accounting import Ticket
    from kernel.config import ModelSettings, TenantSettings
    from kernel.types import Message

# The scope's key for the request's RequestState.
STATE = "vllm_gateway"

# The server that made a response: its replica and the run of it (``Backend.starts``).
Server = tuple[int, int]


class ResponseProgress:
    """What has gone to the client so far: the response's start, its first byte, the bytes."""

    __slots__ = ("complete", "error_body", "extra_headers", "fed", "first_byte", "send_failed",
                 "sent", "start")

    def __init__(self) -> None:
        # The ``http.response.start`` message once it went out, with the headers added here.
        self.start: Message | None = None
        # Headers added to the response's own (the request id).
        self.extra_headers: list[tuple[bytes, bytes]] = []
        self.first_byte = 0.0  # perf_counter of the answer's first body message
        self.fed = False  # the start that went out is the loading feedback's
        self.sent = 0
        # The first body message of an error status (it holds the error's code).
        self.error_body: bytes | None = None
        self.complete = False
        # The server raised on a send: the client is gone (servers that raise rather than drop).
        self.send_failed = False

    @property
    def started(self) -> bool:
        return self.start is not None

    @property
    def answered(self) -> bool:
        """Whether some of the answer itself went out (not only the loading feedback)."""
        return self.start is not None and (not self.fed or bool(self.first_byte))

    @property
    def status(self) -> int:
        return self.start["status"] if self.start is not None else 0


@dataclass(slots=True)
class RequestState:
    """One request, as the layers learn it; each field is set by the layer named."""

    # RequestContext: the request's id (the client's x-request-id, or made).
    request_id: str | None = None
    # ClientKeys: the tenant of the request's key (None where no key is needed).
    tenant: TenantSettings | None = None
    # progress(): what went to the client (None until a layer tracks it).
    progress: ResponseProgress | None = None
    # Admission: the model's name as the client wrote it, the model it names, whether the answer
    # streams, the body to forward, the session (a model with replicas); for a stored response,
    # the server run that made it.
    requested_model: str | None = None
    # ... or, for a request that named none, that it went to the default model.
    model_default: bool = False
    model: ModelSettings | None = None
    # ... and the LoRA adapter it named (``model`` is then the adapter's base model).
    adapter: str | None = None
    stream: bool = False
    body_bytes: bytes | None = None
    session: str | None = None
    # ... the prompt's chained block hashes (a model that routes by prefix; empty otherwise).
    prefix: tuple[int, ...] = ()
    pin: Server | None = None
    # QueueDepthLimit: the request's place with the accounting, from joining to leaving.
    ticket: Ticket | None = None
    # ModelConcurrencyLimit: seconds waited for the slot (None: no slot yet, or never).
    queue_wait: float | None = None
    # RetryConnectFailures: attempts repeated.
    retries: int = 0
    # StreamingPassthrough: the replica that answers (a model with replicas) and why it was
    # chosen (``backends.routing``: session, prefix, hash, load), the one whose connect failed
    # (a retry avoids it), and the server run that answered.
    replica: int | None = None
    route: str | None = None
    failed_replica: int | None = None
    server: Server | None = None
    # backends.adapters: while the request waits for its adapter's load on its server.
    adapter_loading: bool = False
    # The code of the gateway's own error answer, or of the way the request ended.
    error: str | None = None
