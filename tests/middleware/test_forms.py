"""The model of a multipart form: found by python-multipart wherever the field is, refused
with 400 when the form is not one."""

from __future__ import annotations

import httpx2
import pytest

from kernel.errors import GatewayError
from middleware.forms import FEED, MAX_MODEL_BYTES, form_model, with_model_field

TYPE = b"multipart/form-data; boundary=XyZ"


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--XyZ\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


def test_the_model_sent_before_the_file_as_the_openai_clients_send_it() -> None:
    request = httpx2.Request("POST", "http://gateway/", data={"model": "whisper"},
                             files={"file": ("a.wav", b"RIFF" + bytes(3 * FEED))})
    body = request.read()
    name, span = form_model(body, request.headers["content-type"].encode())
    assert name == "whisper"
    assert span is not None and body[span] == b"whisper"


def test_the_model_sent_after_a_file_that_looks_like_boundaries() -> None:
    audio = b"\r\n--XyZ-not-quite\r\n-" * (FEED // 8)  # spans slices, lures the parser
    body = part("file", audio, "a.wav") + part("model", b"sim-a") + b"--XyZ--\r\n"
    name, span = form_model(body, TYPE)
    assert name == "sim-a"
    assert span is not None and body[span] == b"sim-a"


def test_a_file_called_model_is_not_the_model_field() -> None:
    body = part("model", b"not-a-name", "model.bin") + part("model", b"sim-b") + b"--XyZ--\r\n"
    assert form_model(body, TYPE)[0] == "sim-b"


@pytest.mark.parametrize("body", [part("file", b"RIFF", "a.wav") + b"--XyZ--\r\n",
                                  part("model", b"") + b"--XyZ--\r\n"], ids=["absent", "empty"])
def test_a_form_without_a_model_or_with_an_empty_one_names_none(body: bytes) -> None:
    assert form_model(body, TYPE) == (None, None)


def test_a_model_field_is_added_after_the_last_part() -> None:
    body = part("file", b"RIFF", "a.wav") + b"--XyZ--\r\n"
    assert with_model_field(body, TYPE, "org/m") == (part("file", b"RIFF", "a.wav")
                                                     + part("model", b"org/m") + b"--XyZ--\r\n")


@pytest.mark.parametrize(("body", "content_type", "code"), [
    (part("model", b"x" * (MAX_MODEL_BYTES + 1)) + b"--XyZ--\r\n", TYPE, "invalid_form"),
    (part("model", b"\xff\xfe") + b"--XyZ--\r\n", TYPE, "invalid_form"),
    (b"not a form at all", TYPE, "invalid_form"),
    (part("model", b"sim-a"), b"multipart/form-data", "invalid_form"),
])
def test_what_is_not_a_form_with_a_model_is_400(body: bytes, content_type: bytes,
                                                 code: str) -> None:
    with pytest.raises(GatewayError) as caught:
        form_model(body, content_type)
    assert (caught.value.status, caught.value.code) == (400, code)
