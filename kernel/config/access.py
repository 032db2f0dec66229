"""The ``[admin]`` and ``[auth]`` sections: who may call the gateway. The admin token and the
clients' API keys (listed, or one per line in ``auth.api_keys_file``, read once at start-up),
each as an HTTP bearer token allows it; and the bounds of the admin API's live stream."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from .validation import HOUR, MASK, ConfigError, _fail, _show, _Sources, _spec


@dataclasses.dataclass(frozen=True, slots=True)
class AdminSettings:
    token: str | None = _spec(None, secret=True)
    # The dashboard's live stream (GET /admin/events): request summaries kept for one
    # subscriber that reads slower than they come (the oldest are dropped beyond it), streams
    # open at once, and seconds one write to a subscriber may take before its stream is ended
    # (checked every quarter of it: a shorter one would spin).
    events_buffer: int = _spec(256, lo=1, hi=100_000)
    events_streams: int = _spec(8, lo=1, hi=1_000)
    events_send_timeout: float = _spec(30.0, lo=0.1, hi=HOUR)


@dataclasses.dataclass(frozen=True, slots=True)
class AuthSettings:
    # Client API keys: the OpenAI routes answer only requests that carry one of them. The
    # file holds one key per line and is read once, at start-up (``Config.client_keys``).
    api_keys: tuple[str, ...] = _spec((), secret=True)
    api_keys_file: str | None = _spec(None)


# A token as HTTP's bearer scheme allows it (RFC 6750), so that any client can send it as is.
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
TOKEN_RULE = "letters, digits and - . _ ~ + / (then = padding), as in an HTTP bearer token"


def _check_token(path: str, token: str | None, sources: _Sources) -> None:
    if token is not None and not _TOKEN.fullmatch(token):
        _fail(path, MASK, sources, TOKEN_RULE)


def _client_keys(auth: AuthSettings, sources: _Sources) -> frozenset[str]:
    """The keys of ``auth.api_keys`` and of ``auth.api_keys_file``."""
    for i, key in enumerate(auth.api_keys):
        _check_token(f"auth.api_keys[{i}]", key, sources)
    return frozenset(auth.api_keys) | _keys_file("auth.api_keys_file", auth.api_keys_file,
                                                 sources)


def _keys_file(path: str, file: str | None, sources: _Sources) -> frozenset[str]:
    """The keys of a key file: one per line; blank lines and ``#`` comments are skipped. A file
    that holds no key is refused: it would lock out every client it is meant for."""
    if file is None:
        return frozenset()
    where = f"{path} = {_show(file)} (from {sources.of(path)})"
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: is not UTF-8 text") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    found = [(n, key) for n, key in lines if key and not key.startswith("#")]
    if not found:
        raise ConfigError(f"{where}: holds no API key; write one key per line")
    for n, key in found:
        if not _TOKEN.fullmatch(key):
            raise ConfigError(f"{where}: line {n} is not an API key: must be {TOKEN_RULE}")
    return frozenset(key for _, key in found)
