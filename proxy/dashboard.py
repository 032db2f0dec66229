"""The operator's dashboard, ``GET /admin/ui``: one self-contained page (``dashboard.html``).

No build step and nothing from outside (the gateway often runs where nothing outside is
reachable): its style and script are inline, and the Content-Security-Policy allows exactly
those two (by their hashes) and requests to the gateway itself, so nothing else can load or
run in it. The page asks for the admin token, keeps it for the tab (``sessionStorage``), and
reads the live state from ``GET /admin/events`` with it.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib.resources import files

from kernel.types import Send

_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


def _hash(source: bytes) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source).digest()).decode() + "'"


@cache
def _page() -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = files(__package__).joinpath("dashboard.html").read_bytes()
    sources: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for tag, source in _INLINE.findall(body):
        sources[tag].append(_hash(source))
    policy = (f"default-src 'none'; script-src {' '.join(sources[b'script'])}; "
              f"style-src {' '.join(sources[b'style'])}; connect-src 'self'; img-src 'self' data:; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    headers = [(b"content-type", b"text/html; charset=utf-8"),
               (b"content-length", str(len(body)).encode()),
               (b"content-security-policy", policy.encode()),
               (b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"),
               (b"referrer-policy", b"no-referrer")]
    return body, headers


async def page(send: Send) -> None:
    body, headers = _page()
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
